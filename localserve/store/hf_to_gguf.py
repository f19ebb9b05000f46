"""A Hugging Face folder (config.json, *.safetensors, tokenizer.json) as one GGUF file.

Weights come through `load_hf_folder`, so they already follow the canonical names and the
GGUF conventions (Gemma norms hold 1 + w); llama/mistral q/k rows get llama.cpp's rotary
interleave, which the GGUF loader undoes. The metadata is what `config_from_gguf` and
`gguf_tokenizer` read back, and the converter checks that: the written file must give the
same model config and encode sample text to the same ids as the folder, or it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from localserve.errors import ModelLoadError
from localserve.models.config import ModelConfig
from localserve.models.gguf_loader import PERMUTED_QK_ARCHS, llama3_freq_divisors
from localserve.models.gguf_tokenizer import PRE_TOKENIZER_SPLITS
from localserve.models.hf_loader import load_hf_folder
from localserve.store.gguf_kv import KV
from localserve.store.gguf_writer import TensorJob, write_gguf
from localserve.store.quantize import ConvertResult, _job, _result, check_target, file_type_of, tensor_type
from localserve.store.store import StoreError

T = gguf.GGUFValueType
SAMPLE_TEXTS = ("Hello world! The quick brown fox, 12345.", "def f(x):\n    return x * 2\n", "  café — 中文 😀")
# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def convert_hf_folder(
    folder: str | os.PathLike, dst: str | os.PathLike, target: str, on_values: Callable[[int], None] | None = None
) -> ConvertResult:
    target = check_target(target, hf=True)
    folder = Path(folder)
    w = load_hf_folder(folder)
    cfg = w.config
    kvs = model_kvs(cfg) + tokenizer_kvs(folder, cfg)
    kvs += [
        KV("general.quantization_version", T.UINT32, gguf.GGML_QUANT_VERSION),
        KV("general.file_type", T.UINT32, file_type_of(target)),
    ]
    jobs = _tensor_jobs(w.tensors, cfg, target)
    src_bytes = sum(_nbytes(t) for t in w.tensors.values())
    write_gguf(dst, cfg.architecture, kvs, jobs, on_values=on_values)
    verify_roundtrip(folder, Path(dst), cfg)
    return _result(dst, target, src_bytes, jobs)


# -- tensors ------------------------------------------------------------------------------


def _order(name: str) -> tuple:
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name == "token_embd.weight" else 2, 0, name)


def _tensor_jobs(tensors, cfg: ModelConfig, target: str) -> list[TensorJob]:
    jobs = []
    for name in sorted(tensors, key=_order):
        t = tensors[name]
        is_head = name == "output.weight" or (cfg.tie_word_embeddings and name == "token_embd.weight")
        kind = tensor_type(name, tuple(t.shape), target, is_head)
        perm = None
        if cfg.architecture in PERMUTED_QK_ARCHS and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
            perm = llama_cpp_row_order(t.shape[0], heads)
            if len(t.shape) == 1:  # a bias: permute its values directly
                t, perm = np.asarray(_dense(t))[perm], None
        jobs.append(_job(name, t, kind, perm))
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        freqs = llama3_freq_divisors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        jobs.append(_job("rope_freqs.weight", freqs, "F32"))
    return jobs


def llama_cpp_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's `permute` as a row gather: GGUF row (h, j, s) = HF row (h, s, j)."""
    return np.arange(n_rows).reshape(n_heads, 2, n_rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


def _dense(t) -> np.ndarray:
    return t.dequantize() if hasattr(t, "dequantize") else np.asarray(t, dtype=np.float32)


def _nbytes(t) -> int:
    return t.raw.nbytes if hasattr(t, "raw") else np.asarray(t).nbytes


# -- model metadata -----------------------------------------------------------------------


def model_kvs(cfg: ModelConfig) -> list[KV]:
    a = cfg.architecture
    kvs = [
        KV("general.name", T.STRING, cfg.name or a),
        KV(f"{a}.context_length", T.UINT32, cfg.max_context),
        KV(f"{a}.embedding_length", T.UINT32, cfg.hidden_size),
        KV(f"{a}.block_count", T.UINT32, cfg.num_layers),
        KV(f"{a}.feed_forward_length", T.UINT32, cfg.intermediate_size),
        KV(f"{a}.attention.head_count", T.UINT32, cfg.num_heads),
        KV(f"{a}.attention.head_count_kv", T.UINT32, cfg.num_kv_heads),
        KV(f"{a}.attention.key_length", T.UINT32, cfg.head_dim),
        KV(f"{a}.attention.value_length", T.UINT32, cfg.head_dim),
        KV(f"{a}.attention.layer_norm_rms_epsilon", T.FLOAT32, cfg.rms_norm_eps),
        KV(f"{a}.rope.freq_base", T.FLOAT32, cfg.rope_theta),
        KV(f"{a}.vocab_size", T.UINT32, cfg.vocab_size),
    ]
    rs = cfg.rope_scaling
    if rs is not None and rs.kind == "linear":
        kvs += [KV(f"{a}.rope.scaling.type", T.STRING, "linear"), KV(f"{a}.rope.scaling.factor", T.FLOAT32, rs.factor)]
    elif rs is not None and rs.kind != "llama3":  # llama3 travels as rope_freqs.weight
        raise StoreError(f"rope scaling {rs.kind!r} cannot be written to GGUF")
    if cfg.sliding_window:
        kvs.append(KV(f"{a}.attention.sliding_window", T.UINT32, cfg.sliding_window))
    if a == "gemma3":
        kvs.append(KV(f"{a}.rope.freq_base_swa", T.FLOAT32, cfg.rope_local_theta or 10_000.0))
        kvs.append(KV(f"{a}.attention.sliding_window_pattern", T.ARRAY, list(cfg.layer_is_sliding), T.BOOL))
        if cfg.final_logit_softcapping:
            kvs.append(KV(f"{a}.final_logit_softcapping", T.FLOAT32, cfg.final_logit_softcapping))
    return kvs


# -- tokenizer metadata -------------------------------------------------------------------


def tokenizer_kvs(folder: Path, cfg: ModelConfig) -> list[KV]:
    """tokenizer.json (a BPE model: SentencePiece-style or byte-level) as tokenizer.ggml.*."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise StoreError(f"{folder}: no tokenizer.json; the GGUF would have no tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise StoreError(f"{folder}: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    tc = _read_json(folder / "tokenizer_config.json")
    byte_level = "ByteLevel" in json.dumps(tj.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tj.get("decoder"))

    ids: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        ids[content] = t["id"]
    size = max(cfg.vocab_size, max(ids.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for token, i in ids.items():
        tokens[i] = token
        types[i] = NORMAL
    unk = model.get("unk_token")
    for content, t in added.items():
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    for i, token in enumerate(tokens):
        if not byte_level and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = BYTE
    if unk in ids:
        types[ids[unk]] = UNKNOWN

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kvs = [
        KV("tokenizer.ggml.model", T.STRING, "gpt2" if byte_level else "llama"),
        KV("tokenizer.ggml.pre", T.STRING, _pre_name(tj) if byte_level else "default"),
        KV("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING),
        KV("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32),
    ]
    if not byte_level:
        kvs.append(KV("tokenizer.ggml.scores", T.ARRAY, [float(-i) for i in range(size)], T.FLOAT32))
    if merges and all(len(m.split(" ")) == 2 for m in merges):
        kvs.append(KV("tokenizer.ggml.merges", T.ARRAY, merges, T.STRING))
    for key, field_name, fallback in (
        ("bos", "bos_token", cfg.bos_token_id),
        ("eos", "eos_token", cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        ("unknown", "unk_token", ids.get(unk) if unk else None),
        ("padding", "pad_token", cfg.pad_token_id),
    ):
        tid = ids.get(_token_text(tc.get(field_name)) or "", fallback)
        if tid is not None:
            kvs.append(KV(f"tokenizer.ggml.{key}_token_id", T.UINT32, int(tid)))
    add_bos = tc.get("add_bos_token", _post_adds(tj, tokens, cfg.bos_token_id))
    kvs.append(KV("tokenizer.ggml.add_bos_token", T.BOOL, bool(add_bos)))
    kvs.append(KV("tokenizer.ggml.add_eos_token", T.BOOL, bool(tc.get("add_eos_token", False))))
    template = tc.get("chat_template")
    if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        kvs.append(KV("tokenizer.chat_template", T.STRING, template))
    return kvs


def _pre_name(tj: dict) -> str:
    """The tokenizer.ggml.pre name whose split regex tokenizer.json uses ("default": ByteLevel's own)."""
    text = json.dumps(tj.get("pre_tokenizer"))
    for name, regex in PRE_TOKENIZER_SPLITS.items():
        if json.dumps(regex)[1:-1] in text:
            return name
    return "default"


def _post_adds(tj: dict, tokens: list[str], bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS before each sequence."""
    if bos_id is None or not 0 <= bos_id < len(tokens):
        return False
    return f'"{tokens[bos_id]}"' in json.dumps((tj.get("post_processor") or {}).get("single", ""))


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except ValueError:
        return {}


# -- check --------------------------------------------------------------------------------


def verify_roundtrip(folder: Path, gguf_path: Path, cfg: ModelConfig) -> None:
    """The written file must describe the same model and tokenize like the folder."""
    from localserve.models.gguf_loader import load_gguf
    from localserve.models.tokenizer import Tokenizer

    try:
        written = load_gguf(gguf_path)  # config as the loader sees it (llama3 rope from its table)
        back = written.config
        ignore = dict(name="", eos_token_ids=(), bos_token_id=None, pad_token_id=None, rope_scaling=None)
        a, b = dataclasses.replace(cfg, **ignore), dataclasses.replace(back, **ignore)
        diff = [k.name for k in dataclasses.fields(a) if getattr(a, k.name) != getattr(b, k.name)]
        if not _same_rope(cfg, back):
            diff.append("rope_scaling")
        if diff:
            raise StoreError(f"{folder}: GGUF metadata cannot express this model's {', '.join(diff)}")
        gguf_tok = Tokenizer.from_gguf(written.meta["gguf_metadata"])
        del written
    except (ModelLoadError, ValueError) as e:
        raise StoreError(f"{folder}: the converted file does not read back ({e})") from None
    hf_tok = Tokenizer.from_hf_folder(folder)
    for text in SAMPLE_TEXTS:
        want = hf_tok.encode(text)
        got = gguf_tok.encode(text)
        if list(want) != list(got):
            raise StoreError(
                f"{folder}: the converted tokenizer encodes {text!r} differently ({got[:8]}... vs {list(want)[:8]}...)"
            )


def _same_rope(a: ModelConfig, b: ModelConfig) -> bool:
    """llama3 scaling travels as a divisor table: equal tables are the same rope."""
    ra, rb = a.rope_scaling, b.rope_scaling
    if ra is None or rb is None or ra.kind != "llama3" or rb.kind != "llama3":
        return ra == rb
    return bool(
        np.allclose(llama3_freq_divisors(a.head_dim, a.rope_theta, ra), llama3_freq_divisors(b.head_dim, b.rope_theta, rb), rtol=1e-4)
    )
