// y[M, N] = x[M, K] @ W[N, K]^T with W in GGML Q8_0 layout (int8 codes, one float scale per
// 32 inputs) and x quantized on the fly the same way (llama.cpp's Q8_0 x Q8_0 vec_dot):
// per block b of 32, y += (sum_i xq_i * wq_i) * dx_b * dw_b, the integer sum exact.
//
// Paths: 3 = AVX-512 VNNI (vpdpbusd), 2 = AVX2 (maddubs sign trick), 1 = plain C++.
// act_bits 16 quantizes x to int16 per block instead (vpdpwssd / pmaddwd): same weights,
// float-like activations.
// Weight codes must lie in [-127, 127] (Q8_0 never writes -128; the AVX2 sign trick needs it).
// Plain C ABI (loaded with ctypes), no torch headers: it builds in ~2 s instead of ~30 s.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;

// f(begin, end) over [0, n) in at most `threads` contiguous chunks of at least `grain`.
template <class F>
void parallel_rows(int64_t n, int64_t grain, int threads, const F& f) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(grain, 1)));
  if (chunks <= 1) {
    f(0, n);
    return;
  }
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static, 1)
  for (int64_t c = 0; c < chunks; ++c) f(n * c / chunks, n * (c + 1) / chunks);
}

// Quantized activations. Rows are padded to `stride` = a multiple of 64 bytes with zero codes,
// so the 64-byte (two block) loads of the AVX-512 path never need a mask on the x side.
struct QuantX {
  int64_t M, K, KB, KB2, stride;
  std::vector<int8_t> q;      // [M, stride]
  std::vector<float> d;       // [M, KB]
  std::vector<int32_t> sum;   // [M, KB]  sum of codes per block

  QuantX(const float* x, int64_t M_, int64_t K_) : M(M_), K(K_), KB(K_ / QK) {
    KB2 = (KB + 1) / 2;
    stride = KB2 * 64;
    q.assign(M * stride, 0);
    d.assign(M * KB, 0.f);
    sum.assign(M * KB, 0);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < KB; ++b) {
        const float* xb = x + m * K + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
        const float dd = amax / 127.f;
        const float id = dd != 0.f ? 1.f / dd : 0.f;
        int32_t s = 0;
        int8_t* qb = q.data() + m * stride + b * QK;
        for (int i = 0; i < QK; ++i) {
          // nearbyint: round half to even, as torch.round in the reference
          const int v = static_cast<int>(std::nearbyint(xb[i] * id));
          qb[i] = static_cast<int8_t>(v);
          s += v;
        }
        d[m * KB + b] = dd;
        sum[m * KB + b] = s;
      }
    }
  }
};

void rows_scalar(const QuantX& X, const int8_t* wq, const float* ws, float* y, int64_t N,
                 int64_t n0, int64_t n1) {
  const int64_t K = X.K, KB = X.KB;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* dw = ws + n * KB;
    for (int64_t m = 0; m < X.M; ++m) {
      const int8_t* xr = X.q.data() + m * X.stride;
      float acc = 0.f;
      for (int64_t b = 0; b < KB; ++b) {
        int32_t dot = 0;
        for (int i = 0; i < QK; ++i) dot += int32_t(xr[b * QK + i]) * int32_t(wr[b * QK + i]);
        acc += float(dot) * (X.d[m * KB + b] * dw[b]);
      }
      y[m * N + n] = acc;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void rows_avx2(const QuantX& X, const int8_t* wq, const float* ws, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  const int64_t K = X.K, KB = X.KB;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* dw = ws + n * KB;
    for (int64_t m = 0; m < X.M; ++m) {
      const int8_t* xr = X.q.data() + m * X.stride;
      const float* dx = X.d.data() + m * KB;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < KB; ++b) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * QK));
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * QK));
        // |x| (unsigned) times w carrying x's sign: pairs sum to at most 2*127*127, no saturation
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc = _mm256_fmadd_ps(p, _mm256_set1_ps(dx[b] * dw[b]), acc);
      }
      y[m * N + n] = hsum256(acc);
    }
  }
}
#define HAVE_AVX2 1
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
// Per activation row, per pair of blocks j (one 64-byte register, block 2j in lanes 0-7 and
// 2j+1 in lanes 8-15): the dx scales spread over their 8 lanes, and the int32 start value
// -128 * sum(xq) that cancels the +128 bias of reading w ^ 0x80 as unsigned in vpdpbusd.
struct VnniX {
  std::vector<float> dxe;     // [M, KB2, 16]
  std::vector<int32_t> init;  // [M, KB2, 16]
  explicit VnniX(const QuantX& X) : dxe(X.M * X.KB2 * 16, 0.f), init(X.M * X.KB2 * 16, 0) {
    for (int64_t m = 0; m < X.M; ++m)
      for (int64_t b = 0; b < X.KB; ++b) {
        const int64_t base = (m * X.KB2 + b / 2) * 16 + (b % 2) * 8;
        for (int l = 0; l < 8; ++l) dxe[base + l] = X.d[m * X.KB + b];
        init[base] = -128 * X.sum[m * X.KB + b];
      }
  }
};

template <int MT>
inline void tile_vnni(const QuantX& X, const VnniX& V, int64_t m0, const int8_t* wr,
                      const float* dw, float* y, int64_t N, int64_t n) {
  const int64_t KB = X.KB, KB2 = X.KB2;
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < KB2; ++j) {
    __m512i w;
    __m512 dwe;
    if (2 * j + 1 < KB) {
      w = _mm512_loadu_si512(wr + j * 64);
      const __m512 pair = _mm512_castpd_ps(_mm512_castpd128_pd512(_mm_load_sd(
          reinterpret_cast<const double*>(dw + 2 * j))));
      dwe = _mm512_permutexvar_ps(pair_idx, pair);
    } else {  // odd block count: last block alone; its upper lanes meet zero x codes and dx
      w = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, wr + j * 64);
      dwe = _mm512_set1_ps(dw[2 * j]);
    }
    w = _mm512_xor_si512(w, bias);  // w + 128 as unsigned bytes
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const __m512i x = _mm512_loadu_si512(X.q.data() + m * X.stride + j * 64);
      const __m512i s0 = _mm512_loadu_si512(V.init.data() + (m * KB2 + j) * 16);
      const __m512i dot = _mm512_dpbusd_epi32(s0, w, x);
      const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(V.dxe.data() + (m * KB2 + j) * 16), dwe);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[t]);
    }
  }
  for (int t = 0; t < MT; ++t) y[(m0 + t) * N + n] = _mm512_reduce_add_ps(acc[t]);
}

void rows_vnni(const QuantX& X, const VnniX& V, const int8_t* wq, const float* ws, float* y,
               int64_t N, int64_t n0, int64_t n1) {
  const int64_t K = X.K, KB = X.KB, M = X.M;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* dw = ws + n * KB;
    // the weight row (K bytes) stays in L1 across the activation tiles
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile_vnni<4>(X, V, m0, wr, dw, y, N, n);
    switch (M - m0) {
      case 3: tile_vnni<3>(X, V, m0, wr, dw, y, N, n); break;
      case 2: tile_vnni<2>(X, V, m0, wr, dw, y, N, n); break;
      case 1: tile_vnni<1>(X, V, m0, wr, dw, y, N, n); break;
      default: break;
    }
  }
}
#define HAVE_VNNI 1
#endif

// int16 activations (scale max|x|/32767 per block): the activation rounding is ~256x finer
// than Q8_0's, which keeps greedy decoding of models with outlier activations (gemma 3) on
// the float path; the weights are the same Q8_0 codes, sign-extended to int16 in registers.
struct QuantX16 {
  int64_t M, K, KB;
  std::vector<int16_t> q;  // [M, K]
  std::vector<float> d;    // [M, KB]
  QuantX16(const float* x, int64_t M_, int64_t K_) : M(M_), K(K_), KB(K_ / QK), q(M_ * K_), d(M_ * (K_ / QK)) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < KB; ++b) {
        const float* xb = x + m * K + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
        const float dd = amax / 32767.f;
        const float id = dd != 0.f ? 1.f / dd : 0.f;
        for (int i = 0; i < QK; ++i)
          q[m * K + b * QK + i] = static_cast<int16_t>(std::nearbyint(xb[i] * id));
        d[m * KB + b] = dd;
      }
  }
};

void rows16_scalar(const QuantX16& X, const int8_t* wq, const float* ws, float* y, int64_t N,
                   int64_t n0, int64_t n1) {
  const int64_t K = X.K, KB = X.KB;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* dw = ws + n * KB;
    for (int64_t m = 0; m < X.M; ++m) {
      const int16_t* xr = X.q.data() + m * K;
      float acc = 0.f;
      for (int64_t b = 0; b < KB; ++b) {
        int32_t dot = 0;
        for (int i = 0; i < QK; ++i) dot += int32_t(xr[b * QK + i]) * int32_t(wr[b * QK + i]);
        acc += float(dot) * (X.d[m * KB + b] * dw[b]);
      }
      y[m * N + n] = acc;
    }
  }
}

#ifdef HAVE_AVX2
void rows16_avx2(const QuantX16& X, const int8_t* wq, const float* ws, float* y, int64_t N,
                 int64_t n0, int64_t n1) {
  const int64_t K = X.K, KB = X.KB;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* dw = ws + n * KB;
    for (int64_t m = 0; m < X.M; ++m) {
      const int16_t* xr = X.q.data() + m * K;
      const float* dx = X.d.data() + m * KB;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < KB; ++b) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + b * QK)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + b * QK + 16)));
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * QK));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * QK + 16));
        // |x| <= 32767, |w| <= 127: each madd pair sum < 2^23, the 4-term lane sum < 2^25 fits
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(x0, w0), _mm256_madd_epi16(x1, w1));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dx[b] * dw[b]), acc);
      }
      y[m * N + n] = hsum256(acc);
    }
  }
}
#endif

#ifdef HAVE_VNNI
template <int MT>
inline void tile16_vnni(const QuantX16& X, int64_t m0, const int8_t* wr, const float* dw,
                        float* y, int64_t N, int64_t n) {
  const int64_t K = X.K, KB = X.KB;
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * QK)));
    const float dwb = dw[b];
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const __m512i x = _mm512_loadu_si512(X.q.data() + m * K + b * QK);
      // 16 lanes of two products each: |lane| < 2 * 32767 * 127 < 2^24, exact in float
      const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), x, w);
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(X.d[m * KB + b] * dwb), acc[t]);
    }
  }
  for (int t = 0; t < MT; ++t) y[(m0 + t) * N + n] = _mm512_reduce_add_ps(acc[t]);
}

void rows16_vnni(const QuantX16& X, const int8_t* wq, const float* ws, float* y, int64_t N,
                 int64_t n0, int64_t n1) {
  const int64_t K = X.K, KB = X.KB, M = X.M;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* dw = ws + n * KB;
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) tile16_vnni<4>(X, m0, wr, dw, y, N, n);
    switch (M - m0) {
      case 3: tile16_vnni<3>(X, m0, wr, dw, y, N, n); break;
      case 2: tile16_vnni<2>(X, m0, wr, dw, y, N, n); break;
      case 1: tile16_vnni<1>(X, m0, wr, dw, y, N, n); break;
      default: break;
    }
  }
}
#endif

#ifdef HAVE_VNNI
// Packed layout for int8 activations: output rows in groups of 16 across the register lanes,
// so one int32 lane holds one output's block sum and the float scaling is one cvt + fma per
// 16 outputs x 32 inputs (the row layout pays that per 2 blocks of one output).
// wp: [N/16, KB, 8, 16, 4] int8 (8 quads of inputs, 16 outputs, 4 inputs); sp: [N/16, KB, 16].
template <int MT>
inline void ptile_vnni(const QuantX& X, int64_t m0, const int8_t* wp, const float* sp, float* y,
                       int64_t N, int64_t nb) {
  const int64_t KB = X.KB;
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const int8_t* wb = wp + (nb * KB + b) * 512;
    __m512i w[8];
    for (int q = 0; q < 8; ++q) w[q] = _mm512_xor_si512(_mm512_loadu_si512(wb + 64 * q), bias);
    const __m512 dwv = _mm512_loadu_ps(sp + (nb * KB + b) * 16);
    for (int t = 0; t < MT; ++t) {
      const int64_t m = m0 + t;
      const int8_t* xb = X.q.data() + m * X.stride + b * QK;
      // w ^ 0x80 read as unsigned is w + 128: start from -128 * sum(x) to cancel it
      __m512i a = _mm512_set1_epi32(-128 * X.sum[m * KB + b]);
      for (int q = 0; q < 8; ++q) {
        int32_t quad;
        std::memcpy(&quad, xb + 4 * q, 4);
        a = _mm512_dpbusd_epi32(a, w[q], _mm512_set1_epi32(quad));
      }
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(dwv, _mm512_set1_ps(X.d[m * KB + b])), acc[t]);
    }
  }
  const int64_t n0 = nb * 16;
  const __mmask16 keep = N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
  for (int t = 0; t < MT; ++t) _mm512_mask_storeu_ps(y + (m0 + t) * N + n0, keep, acc[t]);
}

void prows_vnni(const QuantX& X, const int8_t* wp, const float* sp, float* y, int64_t N,
                int64_t nb0, int64_t nb1) {
  const int64_t M = X.M;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) ptile_vnni<4>(X, m0, wp, sp, y, N, nb);
    switch (M - m0) {
      case 3: ptile_vnni<3>(X, m0, wp, sp, y, N, nb); break;
      case 2: ptile_vnni<2>(X, m0, wp, sp, y, N, nb); break;
      case 1: ptile_vnni<1>(X, m0, wp, sp, y, N, nb); break;
      default: break;
    }
  }
}
#endif

#ifdef HAVE_VNNI
// int16 activations on weights packed by 16 rows in pairs of inputs: wp [N/16, KB, 16, 16, 2]
// (16 input pairs, 16 outputs, 2 inputs), sign-extended to int16 lanes for vpdpwssd. A lane's
// block sum is < 32 * 32767 * 127 < 2^31; its float conversion rounds (2^-24 relative).
template <int MT>
inline void ptile16_vnni(const QuantX16& X, int64_t m0, const int8_t* wp, const float* sp,
                         float* y, int64_t N, int64_t nb) {
  const int64_t K = X.K, KB = X.KB;
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const int8_t* wb = wp + (nb * KB + b) * 512;
    __m512i a[MT];
    for (int t = 0; t < MT; ++t) a[t] = _mm512_setzero_si512();
    for (int p = 0; p < 16; ++p) {
      const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * p)));
      for (int t = 0; t < MT; ++t) {
        int32_t pair;
        std::memcpy(&pair, X.q.data() + (m0 + t) * K + b * QK + 2 * p, 4);
        a[t] = _mm512_dpwssd_epi32(a[t], w, _mm512_set1_epi32(pair));
      }
    }
    const __m512 dwv = _mm512_loadu_ps(sp + (nb * KB + b) * 16);
    for (int t = 0; t < MT; ++t)
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[t]), _mm512_mul_ps(dwv, _mm512_set1_ps(X.d[(m0 + t) * KB + b])), acc[t]);
  }
  const int64_t n0 = nb * 16;
  const __mmask16 keep = N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
  for (int t = 0; t < MT; ++t) _mm512_mask_storeu_ps(y + (m0 + t) * N + n0, keep, acc[t]);
}

void prows16_vnni(const QuantX16& X, const int8_t* wp, const float* sp, float* y, int64_t N,
                  int64_t nb0, int64_t nb1) {
  const int64_t M = X.M;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) ptile16_vnni<4>(X, m0, wp, sp, y, N, nb);
    switch (M - m0) {
      case 3: ptile16_vnni<3>(X, m0, wp, sp, y, N, nb); break;
      case 2: ptile16_vnni<2>(X, m0, wp, sp, y, N, nb); break;
      case 1: ptile16_vnni<1>(X, m0, wp, sp, y, N, nb); break;
      default: break;
    }
  }
}
#endif

}  // namespace

extern "C" {

// Bit p set: path p compiled in (1 plain C++, 2 AVX2, 3 AVX-512 VNNI).
int q8_paths() {
  int bits = 1 << 1;
#ifdef HAVE_AVX2
  bits |= 1 << 2;
#endif
#ifdef HAVE_VNNI
  bits |= 1 << 3;
#endif
  return bits;
}

// y[M, N] = x[M, K] @ (w[N, K] * s[N, K/32]).T; the caller checks shapes (K % 32 == 0).
// Returns 0, or -1 when `path` is not compiled in (0 = the best one).
int q8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* s, int64_t N,
              float* y, int path, int act_bits, int threads) {
  if (path == 0) path = q8_paths() & (1 << 3) ? 3 : q8_paths() & (1 << 2) ? 2 : 1;
  if (!(q8_paths() & (1 << path))) return -1;
  if (M == 0 || N == 0) return 0;
  // ~64 KiB of weights per task at least, so small layers do not pay for a thread barrier
  const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / K);
  if (act_bits == 16) {
    const QuantX16 X(x, M, K);
#ifdef HAVE_VNNI
    if (path == 3) { parallel_rows(N, grain, threads, [&](int64_t a, int64_t b) { rows16_vnni(X, w, s, y, N, a, b); }); return 0; }
#endif
#ifdef HAVE_AVX2
    if (path == 2) { parallel_rows(N, grain, threads, [&](int64_t a, int64_t b) { rows16_avx2(X, w, s, y, N, a, b); }); return 0; }
#endif
    parallel_rows(N, grain, threads, [&](int64_t a, int64_t b) { rows16_scalar(X, w, s, y, N, a, b); });
    return 0;
  }
  const QuantX X(x, M, K);
#ifdef HAVE_VNNI
  if (path == 3) {
    const VnniX V(X);
    parallel_rows(N, grain, threads, [&](int64_t a, int64_t b) { rows_vnni(X, V, w, s, y, N, a, b); });
    return 0;
  }
#endif
#ifdef HAVE_AVX2
  if (path == 2) { parallel_rows(N, grain, threads, [&](int64_t a, int64_t b) { rows_avx2(X, w, s, y, N, a, b); }); return 0; }
#endif
  parallel_rows(N, grain, threads, [&](int64_t a, int64_t b) { rows_scalar(X, w, s, y, N, a, b); });
  return 0;
}

// The same on weights packed by 16 rows: act_bits 8 wp [ceil(N/16), K/32, 8, 16, 4] (see
// ptile_vnni), act_bits 16 wp [ceil(N/16), K/32, 16, 16, 2] (ptile16_vnni); sp
// [ceil(N/16), K/32, 16]. Returns -1 without VNNI.
int q8_linear_packed(const float* x, int64_t M, int64_t K, const int8_t* wp, const float* sp,
                     int64_t N, float* y, int act_bits, int threads) {
#ifdef HAVE_VNNI
  if (M == 0 || N == 0) return 0;
  const int64_t NB = (N + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (16 * K));
  if (act_bits == 16) {
    const QuantX16 X(x, M, K);
    parallel_rows(NB, grain, threads, [&](int64_t a, int64_t b) { prows16_vnni(X, wp, sp, y, N, a, b); });
    return 0;
  }
  const QuantX X(x, M, K);
  parallel_rows(NB, grain, threads, [&](int64_t a, int64_t b) { prows_vnni(X, wp, sp, y, N, a, b); });
  return 0;
#else
  (void)x; (void)M; (void)K; (void)wp; (void)sp; (void)N; (void)y; (void)act_bits; (void)threads;
  return -1;
#endif
}

}  // extern "C"
