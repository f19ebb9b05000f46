// Paged attention for the CPU backend, reading K/V through each sequence's block table.
//
// Layout (backends/torch_common/attention.py): k/v cache [num_slots, Hkv, D]; position j of
// sequence b lives in slot block_tables[b][j / bs] * bs + j % bs. The batch is the flattened
// token rows of a step: sequence b owns query rows qsl[b] .. qsl[b+1]-1, the last ones of its
// seq_lens[b] tokens, so query row i of b sits at position p = seq_len - qlen + i and sees
// keys lo(p) .. p, lo = 0 (full) or max(0, p - W + 1) (sliding window W).
//
// Batch invariance (the reason this exists): a query row's output is a pure function of its
// q vector, its key range and the cache contents, never of the other rows of the step, the
// padding, the tiling or the thread count:
//  * keys are cut into chunks of KC at ABSOLUTE positions (c*KC .. c*KC+KC-1); per chunk a
//    row gets a partial state (m = max score, l = sum exp(s - m), acc = sum exp(s - m) v)
//    computed by one fixed sequence of operations; the partials are left-folded in ascending
//    chunk order. Splitting the chunks of one row over threads (split mode) or looping over
//    them in one task gives the same bits: both run the same per-chunk and fold code.
//  * each (query, key) dot product has its own accumulator (16 lanes over d, then one
//    fixed horizontal reduction), whatever tile of rows and keys it is computed in.
//  * a row's masked (row, key) pairs of its tile contribute exact zeros (p = 0, and
//    acc + 0 * v == acc since acc starts at +0 and never becomes -0).
//  * built with -ffp-contract=off: no compiler-chosen FMA contraction that could differ
//    between two inlined copies of the same code; the FMAs that exist are explicit.
// Plain C ABI, no torch headers (loaded with ctypes, like q8_linear.cpp).
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t KC = 256;  // keys per chunk, aligned to absolute positions
constexpr int64_t TQ = 8;    // query rows per tile of a multi-token (prefill) sequence
// (query row, key, dim) products per thread below which fewer threads run: ~150 us of work.
// A parallel region costs a barrier, and on a busy machine a barrier can wait a time slice.
constexpr int64_t GRAIN = int64_t(1) << 22;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

enum KvType { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };

struct Problem {
  const float* q;  // [T, H, D]
  float* out;      // [T, H, D]
  const char* k;   // [num_slots, Hkv, D] of kv_type
  const char* v;
  int64_t elem;  // bytes per cache element
  const int32_t* bt;
  int64_t bt_stride;
  const int32_t* qsl;
  const int32_t* seq_lens;
  int64_t H, Hkv, G, D, bs, window;
  float scale;
};

struct Tile {
  int64_t b, t0, t1, kvh;  // sequence, its token rows [t0, t1), kv head
  int64_t c0, c1;          // key chunks [c0, c1) that any of its rows sees
  int64_t part;            // split mode: offset of its first chunk's partial states
};

struct Task {
  int64_t tile, c0, c1;
};

// Per-row key range [lo, hi] of token row t of sequence b.
inline void key_range(const Problem& P, int64_t b, int64_t t, int64_t& lo, int64_t& hi) {
  const int64_t qlen = P.qsl[b + 1] - P.qsl[b];
  const int64_t p = P.seq_lens[b] - qlen + (t - P.qsl[b]);
  hi = p;
  lo = P.window > 0 ? std::max<int64_t>(0, p - P.window + 1) : 0;
}

// Per-thread buffers, sized for the largest tile.
struct Work {
  std::vector<float> s;     // [R, KC] scores, then probabilities (0 outside a row's range)
  std::vector<float> pacc;  // [R, D] this chunk's sum p v
  std::vector<float> pm, pl;  // [R] this chunk's max and sum
  std::vector<float> A, M, S;  // folded state [R, D], [R], [R]
  std::vector<char> has;       // [R] folded state non-empty
  std::vector<char> live;      // [R] row sees this chunk
  std::vector<const char*> kp, vp;  // [KC] key / value row of each position of the chunk
  void size(int64_t R, int64_t D) {
    if (static_cast<int64_t>(s.size()) >= R * KC && static_cast<int64_t>(pacc.size()) >= R * D) return;
    s.resize(R * KC);
    pacc.resize(R * D);
    pm.resize(R);
    pl.resize(R);
    A.resize(R * D);
    M.resize(R);
    S.resize(R);
    has.resize(R);
    live.resize(R);
    kp.resize(KC);
    vp.resize(KC);
  }
};

// Folds the partial (m, l, acc) into the state (M, S, A). The only place partials combine.
__attribute__((noinline)) void fold(float& M, float& S, float* A, char& has, float m, float l,
                                    const float* acc, int64_t D) {
  if (!has) {
    M = m;
    S = l;
    std::memcpy(A, acc, D * sizeof(float));
    has = 1;
    return;
  }
  const float mn = std::max(M, m);
  const float a = std::exp(M - mn);
  const float c = std::exp(m - mn);
  S = S * a + l * c;
  for (int64_t d = 0; d < D; ++d) A[d] = A[d] * a + acc[d] * c;
  M = mn;
}

// ---- one chunk of one tile: scores, probabilities, p @ V ----------------------------------

inline float to_f32(const char* base, int64_t i, int kv) {
  if (kv == KV_F32) return reinterpret_cast<const float*>(base)[i];
  const uint16_t h = reinterpret_cast<const uint16_t*>(base)[i];
  if (kv == KV_BF16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // IEEE half: sign, 5-bit exponent (bias 15), 10-bit mantissa
  const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff;
  float f;
  if (e == 0) {
    f = std::ldexp(static_cast<float>(man), -24);  // zero / subnormal
  } else if (e == 31) {
    f = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    const uint32_t u = ((e + 112) << 23) | (man << 13);
    std::memcpy(&f, &u, 4);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
#define HAVE_AVX512 1

template <int KV>
inline __m512 load16(const char* base, int64_t i) {
  if constexpr (KV == KV_F32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(base) + i);
  } else if constexpr (KV == KV_BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
        reinterpret_cast<const uint16_t*>(base) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
        reinterpret_cast<const uint16_t*>(base) + i));
    return _mm512_cvtph_ps(h);
  }
}

// exp(x) for x <= 0 (scores minus their max): 2^n * poly(r), |r| <= ln2/2, ~1 ulp.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// s[r][k] = scale * <q_r, key k> for NR rows x NK keys; each pair its own accumulator.
template <int KV, int NR, int NK>
inline void dots(const float* const* q, const char* const* kp, int64_t D, float scale,
                 float* s, int64_t ld) {
  __m512 acc[NR][NK];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NK; ++k) acc[r][k] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __m512 kv[NK];
    for (int k = 0; k < NK; ++k) kv[k] = load16<KV>(kp[k], d);
    for (int r = 0; r < NR; ++r) {
      const __m512 qv = _mm512_loadu_ps(q[r] + d);
      for (int k = 0; k < NK; ++k) acc[r][k] = _mm512_fmadd_ps(qv, kv[k], acc[r][k]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NK; ++k) s[r * ld + k] = _mm512_reduce_add_ps(acc[r][k]) * scale;
}

template <int KV, int NR>
inline void dots_rows(const float* const* q, const char* const* kp, int64_t n, int64_t D,
                      float scale, float* s) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) dots<KV, NR, 4>(q, kp + k, D, scale, s + k, KC);
  for (; k < n; ++k) dots<KV, NR, 1>(q, kp + k, D, scale, s + k, KC);
}

// acc[r][d] = sum_j p[r][j] v_j[d] over j ascending, NR rows x NB*16 columns at d0.
template <int KV, int NR, int NB>
inline void pv_block(const float* const* p, const char* const* vp, int64_t n, int64_t d0,
                     float* const* acc) {
  __m512 a[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NB; ++c) a[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[NB];
    for (int c = 0; c < NB; ++c) vv[c] = load16<KV>(vp[j], d0 + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r][j]);
      for (int c = 0; c < NB; ++c) a[r][c] = _mm512_fmadd_ps(pj, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NB; ++c) _mm512_storeu_ps(acc[r] + d0 + 16 * c, a[r][c]);
}

template <int KV, int NR>
inline void pv_rows(const float* const* p, const char* const* vp, int64_t n, int64_t D,
                    float* const* acc) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) pv_block<KV, NR, 4>(p, vp, n, d, acc);
  for (; d < D; d += 16) pv_block<KV, NR, 1>(p, vp, n, d, acc);
}

template <int KV>
void scores_avx512(const float* const* q, int64_t R, const char* const* kp, int64_t n,
                   int64_t D, float scale, float* s) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) dots_rows<KV, 4>(q + r, kp, n, D, scale, s + r * KC);
  switch (R - r) {
    case 3: dots_rows<KV, 3>(q + r, kp, n, D, scale, s + r * KC); break;
    case 2: dots_rows<KV, 2>(q + r, kp, n, D, scale, s + r * KC); break;
    case 1: dots_rows<KV, 1>(q + r, kp, n, D, scale, s + r * KC); break;
    default: break;
  }
}

template <int KV>
void pv_avx512(const float* const* p, int64_t R, const char* const* vp, int64_t n, int64_t D,
               float* const* acc) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pv_rows<KV, 4>(p + r, vp, n, D, acc + r);
  switch (R - r) {
    case 3: pv_rows<KV, 3>(p + r, vp, n, D, acc + r); break;
    case 2: pv_rows<KV, 2>(p + r, vp, n, D, acc + r); break;
    case 1: pv_rows<KV, 1>(p + r, vp, n, D, acc + r); break;
    default: break;
  }
}

// Row r's probabilities over its valid offsets [a, b] of the chunk (zeros elsewhere in
// [0, KC)), its max and sum; lanes of the sum are absolute positions mod 16.
void softmax_avx512(float* s, int64_t a, int64_t b, float& m_out, float& l_out) {
  float m = NEG_INF;
  for (int64_t j = a; j <= b; ++j) m = std::max(m, s[j]);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < KC; j0 += 16) {
    if (j0 + 15 < a || j0 > b) {
      _mm512_storeu_ps(s + j0, _mm512_setzero_ps());
      continue;
    }
    const int64_t lo = std::max<int64_t>(a - j0, 0), hi = std::min<int64_t>(b - j0, 15);
    const __mmask16 mask = static_cast<__mmask16>(((1u << (hi + 1)) - 1) & ~((1u << lo) - 1));
    const __m512 x = _mm512_maskz_loadu_ps(mask, s + j0);
    const __m512 e = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(x, mv)));
    _mm512_storeu_ps(s + j0, e);
    sum = _mm512_add_ps(sum, e);
  }
  m_out = m;
  l_out = _mm512_reduce_add_ps(sum);
}
#endif  // __AVX512F__

// Portable path (no AVX-512, or head_dim not a multiple of 16): the same structure in plain
// loops written so the compiler vectorizes them without reassociating anything: a dot
// product keeps 16 independent lane sums (lane = d mod 16) reduced by one fixed tree, and
// p @ V runs along d. KV: the cache type, a template argument so the loops stay branch-free.
template <int KV>
inline float elem(const char* base, int64_t i) {
  if constexpr (KV == KV_F32) {
    return reinterpret_cast<const float*>(base)[i];
  } else if constexpr (KV == KV_BF16) {
    const uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(base)[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return to_f32(base, i, KV_F16);
  }
}

template <int KV>
float dot_lanes(const float* q, const char* k, int64_t D) {
  float lane[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int l = 0; l < 16; ++l) lane[l] += q[d + l] * elem<KV>(k, d + l);
  for (; d < D; ++d) lane[d % 16] += q[d] * elem<KV>(k, d);
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

template <int KV>
void scores_scalar(const float* const* q, int64_t R, const char* const* kp, int64_t n,
                   int64_t D, float scale, float* s) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j) s[r * KC + j] = dot_lanes<KV>(q[r], kp[j], D) * scale;
}

template <int KV>
void pv_scalar(const float* const* p, int64_t R, const char* const* vp, int64_t n, int64_t D,
               float* const* acc) {
  for (int64_t r = 0; r < R; ++r) {
    float* a = acc[r];
    std::fill(a, a + D, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[r][j];
      for (int64_t d = 0; d < D; ++d) a[d] += pj * elem<KV>(vp[j], d);
    }
  }
}

void softmax_scalar(float* s, int64_t a, int64_t b, float& m_out, float& l_out) {
  float m = NEG_INF;
  for (int64_t j = a; j <= b; ++j) m = std::max(m, s[j]);
  float l = 0.f;
  for (int64_t j = 0; j < KC; ++j) {
    const float e = (j >= a && j <= b) ? std::exp(s[j] - m) : 0.f;
    s[j] = e;
    l += e;
  }
  m_out = m;
  l_out = l;
}

struct Kernels {
  bool simd;
  int kv;
};

// Partials of chunk c for every row of the tile: pm/pl/pacc/live in w.
void chunk_partials(const Problem& P, const Tile& T, int64_t c, Work& w, const Kernels& K) {
  const int64_t nq = T.t1 - T.t0, R = nq * P.G, D = P.D;
  const int64_t cs = c * KC, ce = cs + KC - 1;
  int64_t lo0, hi0, lo1, hi1;
  key_range(P, T.b, T.t0, lo0, hi0);
  key_range(P, T.b, T.t1 - 1, lo1, hi1);
  // ranges only move forward with the row: the union is [lo of the first, hi of the last]
  const int64_t ulo = std::max(lo0, cs), uhi = std::min(hi1, ce);
  const int64_t n = uhi - ulo + 1;
  const int32_t* table = P.bt + T.b * P.bt_stride;
  const int64_t row_bytes = P.Hkv * D * P.elem, head_off = T.kvh * D * P.elem;
  for (int64_t j = ulo; j <= uhi; ++j) {
    const int64_t slot = int64_t(table[j / P.bs]) * P.bs + j % P.bs;
    w.kp[j - ulo] = P.k + slot * row_bytes + head_off;
    w.vp[j - ulo] = P.v + slot * row_bytes + head_off;
  }
  const float* qrow[TQ * 64];
  float* srow[TQ * 64];
  float* arow[TQ * 64];
  const float* prow[TQ * 64];
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = T.t0 + r / P.G, h = T.kvh * P.G + r % P.G;
    qrow[r] = P.q + (t * P.H + h) * D;
    srow[r] = w.s.data() + r * KC;
    arow[r] = w.pacc.data() + r * D;
    prow[r] = srow[r] + (ulo - cs);
  }
  float* s0 = w.s.data() + (ulo - cs);
#ifdef HAVE_AVX512
  if (K.simd) {
    switch (K.kv) {
      case KV_F32: scores_avx512<KV_F32>(qrow, R, w.kp.data(), n, D, P.scale, s0); break;
      case KV_BF16: scores_avx512<KV_BF16>(qrow, R, w.kp.data(), n, D, P.scale, s0); break;
      default: scores_avx512<KV_F16>(qrow, R, w.kp.data(), n, D, P.scale, s0); break;
    }
  } else
#endif
    switch (K.kv) {
      case KV_F32: scores_scalar<KV_F32>(qrow, R, w.kp.data(), n, D, P.scale, s0); break;
      case KV_BF16: scores_scalar<KV_BF16>(qrow, R, w.kp.data(), n, D, P.scale, s0); break;
      default: scores_scalar<KV_F16>(qrow, R, w.kp.data(), n, D, P.scale, s0); break;
    }
  for (int64_t r = 0; r < R; ++r) {
    int64_t lo, hi;
    key_range(P, T.b, T.t0 + r / P.G, lo, hi);
    lo = std::max(lo, cs);
    hi = std::min(hi, ce);
    w.live[r] = lo <= hi;
    float* s = srow[r];
    if (!w.live[r]) {
      std::fill(s, s + KC, 0.f);
      continue;
    }
#ifdef HAVE_AVX512
    if (K.simd)
      softmax_avx512(s, lo - cs, hi - cs, w.pm[r], w.pl[r]);
    else
#endif
      softmax_scalar(s, lo - cs, hi - cs, w.pm[r], w.pl[r]);
  }
#ifdef HAVE_AVX512
  if (K.simd) {
    switch (K.kv) {
      case KV_F32: pv_avx512<KV_F32>(prow, R, w.vp.data(), n, D, arow); break;
      case KV_BF16: pv_avx512<KV_BF16>(prow, R, w.vp.data(), n, D, arow); break;
      default: pv_avx512<KV_F16>(prow, R, w.vp.data(), n, D, arow); break;
    }
    return;
  }
#endif
  switch (K.kv) {
    case KV_F32: pv_scalar<KV_F32>(prow, R, w.vp.data(), n, D, arow); break;
    case KV_BF16: pv_scalar<KV_BF16>(prow, R, w.vp.data(), n, D, arow); break;
    default: pv_scalar<KV_F16>(prow, R, w.vp.data(), n, D, arow); break;
  }
}

// Chunks [c0, c1) of a tile: folded into the output (part == nullptr) or, one chunk per
// call in split mode, stored as that chunk's partial states [R, D + 3] (m, l, live, acc).
void run_task(const Problem& P, const Tile& T, int64_t c0, int64_t c1, float* part, Work& w,
              const Kernels& K) {
  const int64_t R = (T.t1 - T.t0) * P.G, D = P.D;
  std::fill(w.has.begin(), w.has.begin() + R, 0);
  for (int64_t c = c0; c < c1; ++c) {
    chunk_partials(P, T, c, w, K);
    for (int64_t r = 0; r < R; ++r) {
      if (part != nullptr) {
        float* dst = part + r * (D + 3);
        dst[0] = w.pm[r];
        dst[1] = w.pl[r];
        dst[2] = w.live[r] ? 1.f : 0.f;
        std::memcpy(dst + 3, w.pacc.data() + r * D, D * sizeof(float));
      } else if (w.live[r]) {
        fold(w.M[r], w.S[r], w.A.data() + r * D, w.has[r], w.pm[r], w.pl[r],
             w.pacc.data() + r * D, D);
      }
    }
  }
}

void write_rows(const Problem& P, const Tile& T, const float* A, const float* S) {
  const int64_t R = (T.t1 - T.t0) * P.G, D = P.D;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = T.t0 + r / P.G, h = T.kvh * P.G + r % P.G;
    float* o = P.out + (t * P.H + h) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = A[r * D + d] / S[r];
  }
}

}  // namespace

extern "C" {

int pa_simd() {
#ifdef HAVE_AVX512
  return 1;
#else
  return 0;
#endif
}

// out [T, H, D] float32 = attention of q [T, H, D] float32 over the paged cache.
// kv_type 0 float32, 1 bfloat16, 2 float16; window 0 = full attention.
// simd: 1 AVX-512 where compiled, 0 the portable loops. split: -1 auto, 0 never, 1 always
// (split the key chunks of a tile over threads; the result is bitwise the same either way).
// Returns 0, or -1 on bad arguments.
int paged_attention(const float* q, float* out, const void* k_cache, const void* v_cache,
                    int kv_type, const int32_t* block_tables, int64_t bt_stride,
                    const int32_t* query_start_loc, const int32_t* seq_lens, int64_t num_seqs,
                    int64_t H, int64_t Hkv, int64_t D, int64_t block_size, int64_t window,
                    float scale, int threads, int simd, int split) {
  if (Hkv <= 0 || H % Hkv || D <= 0 || block_size <= 0 || kv_type < 0 || kv_type > 2) return -1;
  const int64_t G = H / Hkv;
  if (G > 64) return -1;  // the row pointer arrays of chunk_partials hold TQ * 64
  Kernels K{false, kv_type};
#ifdef HAVE_AVX512
  K.simd = simd != 0 && D % 16 == 0;
#endif
  Problem P{q, out, static_cast<const char*>(k_cache), static_cast<const char*>(v_cache),
            kv_type == KV_F32 ? 4 : 2, block_tables, bt_stride, query_start_loc, seq_lens,
            H, Hkv, G, D, block_size, window, scale};
  std::vector<Tile> tiles;
  int64_t chunks = 0, work = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q0 = query_start_loc[b], q1 = query_start_loc[b + 1];
    if (q1 <= q0) continue;
    if (seq_lens[b] < q1 - q0) return -1;
    for (int64_t t0 = q0; t0 < q1; t0 += TQ) {
      const int64_t t1 = std::min(t0 + TQ, q1);
      int64_t lo, hi, lo1, hi1;
      key_range(P, b, t0, lo, hi);
      key_range(P, b, t1 - 1, lo1, hi1);
      for (int64_t h = 0; h < Hkv; ++h) {
        tiles.push_back(Tile{b, t0, t1, h, lo / KC, hi1 / KC + 1, -1});
        chunks += hi1 / KC + 1 - lo / KC;
        work += (t1 - t0) * G * (hi1 - lo + 1) * D;
      }
    }
  }
  if (tiles.empty()) return 0;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, work / GRAIN)));
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  const bool do_split = split == 1 || (split == -1 && threads > 1 && ntiles < 2 * threads &&
                                       chunks > ntiles);
  std::vector<Task> tasks;
  int64_t part_floats = 0;
  for (int64_t i = 0; i < ntiles; ++i) {
    Tile& T = tiles[i];
    if (do_split) {
      T.part = part_floats;
      part_floats += (T.c1 - T.c0) * (T.t1 - T.t0) * G * (D + 3);
      for (int64_t c = T.c0; c < T.c1; ++c) tasks.push_back(Task{i, c, c + 1});
    } else {
      tasks.push_back(Task{i, T.c0, T.c1});
    }
  }
  // kept across calls (a long context's partials are ~0.5 MB: no mmap + page faults per call)
  static thread_local std::vector<float> part_store;
  if (static_cast<int64_t>(part_store.size()) < part_floats) part_store.resize(part_floats);
  float* const parts = part_store.data();  // (the workers see the caller's buffer, not theirs)
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const int nt = static_cast<int>(std::min<int64_t>(threads, ntasks));
  const int64_t rmax = TQ * G;
#pragma omp parallel num_threads(nt)
  {
    // kept per OpenMP thread across calls: no allocation (and page faults) per call
    static thread_local Work w;
    w.size(rmax, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ntasks; ++i) {
      const Task& k = tasks[i];
      const Tile& T = tiles[k.tile];
      if (do_split) {
        const int64_t R = (T.t1 - T.t0) * G;
        run_task(P, T, k.c0, k.c1, parts + T.part + (k.c0 - T.c0) * R * (D + 3), w, K);
      } else {
        run_task(P, T, k.c0, k.c1, nullptr, w, K);
        write_rows(P, T, w.A.data(), w.S.data());
      }
    }
    if (do_split) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < ntiles; ++i) {
        const Tile& T = tiles[i];
        const int64_t R = (T.t1 - T.t0) * G;
        std::fill(w.has.begin(), w.has.begin() + R, 0);
        for (int64_t c = T.c0; c < T.c1; ++c) {
          const float* base = parts + T.part + (c - T.c0) * R * (D + 3);
          for (int64_t r = 0; r < R; ++r) {
            const float* src = base + r * (D + 3);
            if (src[2] != 0.f)
              fold(w.M[r], w.S[r], w.A.data() + r * D, w.has[r], src[0], src[1], src + 3, D);
          }
        }
        write_rows(P, T, w.A.data(), w.S.data());
      }
    }
  }
  return 0;
}

}  // extern "C"
