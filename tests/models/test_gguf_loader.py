"""GGUF parsing, validation, config extraction and canonical tensors (incl. llama q/k un-permutation)."""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from localserve.errors import MissingTensorError, ModelLoadError, UnsupportedArchitectureError
from localserve.models.config import RopeScaling
from localserve.models.gguf_file import GGUFFile
from localserve.models.gguf_loader import llama3_freq_divisors, load_gguf
from localserve.models.loader import load_weights
from localserve.models.presets import load_preset
from localserve.models.weights import GGMLTensor
from tests.models._fixtures import gemma_gguf  # noqa: F401  (fixture)
from tests.models.gguf_writing import llama_cpp_permute, write_gguf
from tests.models.numpy_reference import forward

# -- the embedded default model --------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(gemma_gguf):  # noqa: F811
    return load_gguf(gemma_gguf)


@pytest.mark.slow
def test_default_model_config(gemma):
    c = gemma.config
    assert c.architecture == "gemma3"
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (18, 640, 2048)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (4, 1, 256, 262144)
    assert c.sliding_window == 512
    assert [i for i, s in enumerate(c.layer_is_sliding) if not s] == [5, 11, 17]
    assert (c.rope_local_theta, c.rope_theta, c.rope_scaling) == (10_000.0, 1_000_000.0, None)
    assert c.qk_norm and c.post_norms and c.tie_word_embeddings and not c.qkv_bias
    assert c.hidden_act == "gelu_tanh"
    assert c.embedding_scale == pytest.approx(math.sqrt(640))
    assert c.scale == pytest.approx(256**-0.5)
    assert c.max_context == 32768 and c.rms_norm_eps == 1e-6
    tokens = gemma.meta["gguf_metadata"]["tokenizer.ggml.tokens"]
    assert c.eos_token_ids == (1, tokens.index("<end_of_turn>")) == (1, 106)
    assert (c.bos_token_id, c.pad_token_id) == (2, 0)


@pytest.mark.slow
def test_default_model_tensors_stay_quantized(gemma, gemma_gguf):  # noqa: F811
    emb = gemma.tensors["token_embd.weight"]
    assert isinstance(emb, GGMLTensor) and emb.ggml_type == "Q8_0"
    assert emb.shape == (262144, 640) and emb.raw.shape == (262144, 680)
    assert not emb.raw.flags.owndata  # a view of the mapped file, not a copy
    assert "output.weight" not in gemma.tensors
    norm = gemma.tensors["blk.0.attn_norm.weight"]
    assert isinstance(norm, np.ndarray) and norm.dtype == np.float32 and norm.shape == (640,)
    assert gemma.tensors["blk.0.attn_q.weight"].shape == (1024, 640)
    assert gemma.tensors["blk.0.attn_k_norm.weight"].shape == (256,)
    kinds = {t.ggml_type for t in gemma.tensors.values() if isinstance(t, GGMLTensor)}
    assert kinds == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    t0 = time.perf_counter()
    load_weights(str(gemma_gguf))
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(gemma):
    """End to end through loader + dequantization: the base model continues sensibly."""
    tokens = gemma.meta["gguf_metadata"]["tokenizer.ggml.tokens"]
    ids = {t: i for i, t in enumerate(tokens)}
    prompt = [2] + [ids[t] for t in ["The", "▁capital", "▁of", "▁France", "▁is"]]
    logits = forward(gemma, prompt)[-1]
    top5 = [tokens[i] for i in np.argsort(-logits)[:5]]
    assert "▁Paris" in top5, top5


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_default_model_is_rejected(gemma_gguf, tmp_path, keep):  # noqa: F811
    bad = tmp_path / "cut.gguf"
    size = gemma_gguf.stat().st_size
    with open(gemma_gguf, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(int(size * keep)))
    with pytest.raises(ModelLoadError) as e:
        load_weights(str(bad))
    assert str(bad) in str(e.value) and "truncated" in e.value.reason


# -- small synthetic files -------------------------------------------------------------------


@pytest.fixture()
def tiny_llama_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny-llama.gguf", load_preset("tiny-llama"))


def _expect_load_error(path: Path, *words: str, cls=ModelLoadError) -> ModelLoadError:
    with pytest.raises(cls) as e:
        load_weights(str(path))
    assert str(path) in str(e.value)
    for w in words:
        assert w in e.value.reason, e.value.reason
    return e.value


def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _expect_load_error(p, "not a GGUF")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _expect_load_error(p, "not a GGUF")


def test_bad_version(tiny_llama_gguf):
    data = bytearray(tiny_llama_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    tiny_llama_gguf.write_bytes(bytes(data))
    _expect_load_error(tiny_llama_gguf, "version")


def test_corrupt_counts(tiny_llama_gguf):
    data = bytearray(tiny_llama_gguf.read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 60)  # metadata count
    tiny_llama_gguf.write_bytes(bytes(data))
    _expect_load_error(tiny_llama_gguf, "corrupt")


def test_corrupt_value_type(tiny_llama_gguf):
    data = bytearray(tiny_llama_gguf.read_bytes())
    # first key: u64 length + "general.architecture", then the u32 value type
    (n,) = struct.unpack_from("<Q", data, 24)
    data[32 + n : 36 + n] = struct.pack("<I", 77)
    tiny_llama_gguf.write_bytes(bytes(data))
    _expect_load_error(tiny_llama_gguf, "corrupt", "type 77")


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_file(tiny_llama_gguf, cut):
    data = tiny_llama_gguf.read_bytes()
    tiny_llama_gguf.write_bytes(data[: int(len(data) * cut)])
    _expect_load_error(tiny_llama_gguf, "truncated")


def test_truncated_header(tiny_llama_gguf):
    tiny_llama_gguf.write_bytes(tiny_llama_gguf.read_bytes()[:200])
    _expect_load_error(tiny_llama_gguf, "truncated")


def test_missing_tensor(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", load_preset("tiny-llama"), drop=("blk.1.ffn_up.weight",))
    err = _expect_load_error(p, "missing tensor blk.1.ffn_up.weight", cls=MissingTensorError)
    assert err.path == str(p)


def test_unsupported_architecture(tmp_path):
    p = write_gguf(tmp_path / "gpt2.gguf", load_preset("tiny-llama"), arch="gpt2")
    _expect_load_error(p, "architecture 'gpt2' is not supported", "gemma3", cls=UnsupportedArchitectureError)


def test_parser_agrees_with_gguf_reader(tmp_path):
    p = write_gguf(tmp_path / "q.gguf", load_preset("tiny-qwen2"), quant={"blk.0.ffn_up.weight": "Q8_0"})
    mine = GGUFFile(p)
    ref = gguf.GGUFReader(str(p))
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            want = field.contents()
            assert mine.metadata[key] == (pytest.approx(want) if isinstance(want, float) else want), key
    assert set(mine.tensor_infos) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        got = mine.tensor(t.name)
        raw = got if isinstance(got, np.ndarray) else got.raw
        assert raw.tobytes() == np.asarray(t.data).tobytes(), t.name
        assert mine.tensor_infos[t.name].shape == tuple(reversed(t.shape.tolist()))


def test_qwen_family_configs(tmp_path):
    q2 = load_gguf(write_gguf(tmp_path / "q2.gguf", load_preset("tiny-qwen2")))
    assert q2.config.qkv_bias and not q2.config.qk_norm and q2.config.tie_word_embeddings
    assert q2.tensors["blk.0.attn_q.bias"].shape == (64,)
    q3 = load_gguf(write_gguf(tmp_path / "q3.gguf", load_preset("tiny-qwen3")))
    assert q3.config.qk_norm and not q3.config.qkv_bias
    # qwen2 without bias tensors: no bias
    nob = load_preset("tiny-qwen2")
    p = write_gguf(tmp_path / "q2nb.gguf", nob, drop=tuple(n for n in nob.tensors if n.endswith(".bias")))
    assert not load_gguf(p).config.qkv_bias


def test_llama_family_eos_adds_chat_terminators(tmp_path):
    w = load_preset("tiny-llama")
    tokens = [f"<t{i}>" for i in range(512)]
    tokens[300], tokens[301] = "<|eot_id|>", "<|im_end|>"
    cfg = load_gguf(write_gguf(tmp_path / "l.gguf", w, tokens=tokens)).config
    assert cfg.eos_token_ids == (2, 300, 301)


def test_gemma3_gguf_config_and_tensors(tmp_path):
    w = load_preset("tiny-gemma3")
    tokens = [f"<t{i}>" for i in range(512)]
    tokens[7] = "<end_of_turn>"
    got = load_gguf(write_gguf(tmp_path / "g.gguf", w, tokens=tokens, quant={"token_embd.weight": "Q8_0"}))
    c = got.config
    assert c.layer_is_sliding == (True,) * 5 + (False,) and c.sliding_window == 16
    assert c.eos_token_ids == (2, 7) and c.rope_local_theta == 10_000.0
    assert c.scale == pytest.approx(16**-0.5) and c.embedding_scale == pytest.approx(8.0)
    # gemma3 q/k are not permuted
    np.testing.assert_array_equal(got.dense("blk.0.attn_q.weight"), w.dense("blk.0.attn_q.weight"))


# -- llama q/k un-permutation ------------------------------------------------------------------


def test_llama_qk_rows_are_unpermuted(tmp_path):
    w = load_preset("tiny-llama")
    quant = {"blk.0.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "Q4_0"}
    got = load_gguf(write_gguf(tmp_path / "l.gguf", w, quant=quant))
    assert got.config.num_kv_heads != got.config.num_heads  # k uses the kv head count
    for name in ("blk.0.attn_k.weight", "blk.1.attn_q.weight", "blk.0.ffn_up.weight"):
        np.testing.assert_array_equal(got.dense(name), w.dense(name))
    # quantized q/k stay quantized; their rows are moved as whole blocks
    for name, kind in quant.items():
        t = got.tensors[name]
        assert isinstance(t, GGMLTensor) and t.ggml_type == kind
        want = gguf.quants.dequantize(
            gguf.quants.quantize(w.dense(name), gguf.GGMLQuantizationType[kind]),
            gguf.GGMLQuantizationType[kind],
        )
        np.testing.assert_array_equal(t.dequantize(), want)


def test_permutation_helper_is_the_one_llama_cpp_uses():
    w = np.arange(4 * 8).reshape(8, 4)
    # one head of dim 8: HF rows (0..3 | 4..7) become interleaved pairs (0,4), (1,5), ...
    np.testing.assert_array_equal(llama_cpp_permute(w, 1)[:, 0], [0, 16, 4, 20, 8, 24, 12, 28])


def test_llama3_rope_recovered_from_rope_freqs(tmp_path):
    w = load_preset("tiny-llama")
    want = w.config.rope_scaling
    table = llama3_freq_divisors(w.config.head_dim, w.config.rope_theta, want)
    p = write_gguf(tmp_path / "l.gguf", w, extra_tensors={"rope_freqs.weight": table})
    got = load_gguf(p).config.rope_scaling
    assert got.kind == "llama3" and got.factor == want.factor
    np.testing.assert_allclose(llama3_freq_divisors(16, w.config.rope_theta, got), table, rtol=1e-5)
    assert "rope_freqs.weight" not in load_gguf(p).tensors


def test_llama3_rope_table_matches_llama_cpp_for_llama_3_1():
    # convert_hf_to_gguf's table for Llama 3.1 8B: first entries unscaled, last ones / 8
    s = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    t = llama3_freq_divisors(128, 500000.0, s)
    assert t[0] == 1.0 and t[-1] == 8.0 and np.all(np.diff(t) >= 0)


@pytest.mark.slow
def test_hf_llama_through_gguf_matches_transformers(tmp_path):
    """transformers model -> (llama.cpp-style permuted) GGUF -> load -> same logits."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from localserve.models.hf_loader import load_hf_folder

    torch.manual_seed(0)
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=65536,
        rope_theta=500000.0,
        rope_scaling=rope,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    hf = load_hf_folder(tmp_path / "hf")
    table = llama3_freq_divisors(16, 500000.0, hf.config.rope_scaling)
    w = load_gguf(write_gguf(tmp_path / "l.gguf", hf, extra_tensors={"rope_freqs.weight": table}))
    assert w.config.rope_scaling == hf.config.rope_scaling
    toks = list(range(3, 20))
    with torch.no_grad():
        ref = model(torch.tensor([toks])).logits[0].double().numpy()
    np.testing.assert_allclose(forward(w, toks), ref, atol=1e-5)
