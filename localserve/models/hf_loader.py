"""Load a Hugging Face model folder (config.json + *.safetensors) into LoadedWeights.

safetensors files are parsed here (8-byte header length, JSON header, raw data) and mapped
read-only: numpy has no bfloat16, so bf16 tensors stay raw as GGMLTensor("BF16") and are
widened only where they are used. F32/F16 tensors are numpy views of the mapping.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from localserve.errors import MissingTensorError, ModelLoadError
from localserve.models.config import ModelConfig
from localserve.models.config_loaders import config_from_hf
from localserve.models.gguf_loader import expected_tensor_names
from localserve.models.weights import GGMLTensor, HostTensor, LoadedWeights

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
# prefixes multimodal checkpoints put before the text model's names
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_SKIP = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
# the HF name of the norm before the MLP differs between gemma's sandwich layout and llama's
_GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_LLAMA_NORMS = {"post_attention_layernorm": "ffn_norm"}


def load_hf_folder(path: str | os.PathLike) -> LoadedWeights:
    folder = Path(path)
    src = str(folder)
    config_json = _read_json(folder / "config.json", src, required=True)
    gen_json = _read_json(folder / "generation_config.json", src, required=False)
    cfg = config_from_hf(config_json, gen_json, src)
    raw = _read_all_safetensors(folder, src)
    tensors = _canonical(raw, cfg)
    if cfg.tie_word_embeddings:
        tensors.pop("output.weight", None)
    for name in expected_tensor_names(cfg):
        if name not in tensors:
            raise MissingTensorError(src, f"missing tensor {name}")
    if cfg.architecture == "gemma3":
        # gemma checkpoints store RMSNorm weights as w - 1 (the norm computes x * (1 + w))
        for name in [n for n in tensors if n.endswith("norm.weight")]:
            tensors[name] = _dense(tensors[name]) + np.float32(1.0)
    return LoadedWeights(
        config=cfg,
        tensors=tensors,
        source=src,
        meta={"format": "hf", "hf_config": config_json, "generation_config": gen_json, "folder": src},
    )


def hf_to_canonical(hf_name: str, architecture: str) -> str | None:
    """Canonical name of an HF tensor name; None for tensors the text model does not use."""
    if hf_name.startswith(_SKIP):
        return None
    if hf_name == "lm_head.weight" or hf_name == "language_model.lm_head.weight":
        return "output.weight"
    name = hf_name
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    m = _LAYER.match(name)
    if not m:
        return None
    module, _, kind = m.group(2).rpartition(".")
    norms = _GEMMA_NORMS if architecture == "gemma3" else _LLAMA_NORMS
    short = _LAYER_NAMES.get(module) or norms.get(module)
    if short is None:
        return None
    return f"blk.{m.group(1)}.{short}.{kind}"


def _canonical(raw: dict[str, HostTensor], cfg: ModelConfig) -> dict[str, HostTensor]:
    out: dict[str, HostTensor] = {}
    for hf_name, t in raw.items():
        name = hf_to_canonical(hf_name, cfg.architecture)
        if name is not None:
            out[name] = t
    return out


def _dense(t: HostTensor) -> np.ndarray:
    if isinstance(t, GGMLTensor):
        return t.dequantize()
    return np.asarray(t, dtype=np.float32)


def _read_json(p: Path, src: str, required: bool) -> dict[str, Any] | None:
    if not p.is_file():
        if required:
            raise ModelLoadError(src, f"no {p.name} in the folder")
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(src, f"cannot read {p.name}: {e}") from None


def _read_all_safetensors(folder: Path, src: str) -> dict[str, HostTensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = (_read_json(index, src, required=True) or {}).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(src, "no *.safetensors files in the folder")
    tensors: dict[str, HostTensor] = {}
    for name in files:
        tensors.update(read_safetensors(folder / name))
    return tensors


def read_safetensors(path: str | os.PathLike) -> dict[str, HostTensor]:
    """Zero-copy views of every tensor of one .safetensors file (BF16 as GGMLTensor)."""
    src = str(path)
    try:
        with open(src, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelLoadError(src, "not a safetensors file (too short)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(src, f"cannot read file ({e.strerror or e})") from None
    (header_len,) = struct.unpack_from("<Q", mm, 0)
    if 8 + header_len > size:
        raise ModelLoadError(src, "truncated or corrupt safetensors header")
    try:
        header = json.loads(mm[8 : 8 + header_len])
    except ValueError as e:
        raise ModelLoadError(src, f"corrupt safetensors header ({e})") from None
    data = np.frombuffer(mm, dtype=np.uint8)
    base = 8 + header_len
    out: dict[str, HostTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (base + int(o) for o in info["data_offsets"])
        shape = tuple(int(s) for s in info["shape"])
        dtype = info["dtype"]
        if end > size:
            raise ModelLoadError(src, f"truncated: tensor {name} ends at byte {end}, file has {size}")
        raw = data[start:end]
        if dtype == "BF16":
            if end - start != 2 * prod(shape):
                raise ModelLoadError(src, f"tensor {name}: {end - start} bytes for shape {shape}")
            rows = prod(shape[:-1]) if len(shape) > 1 else 1
            out[name] = GGMLTensor("BF16", raw.reshape(rows, -1), shape)
        elif dtype in _DTYPES:
            np_dtype = np.dtype(_DTYPES[dtype])
            if end - start != np_dtype.itemsize * prod(shape):
                raise ModelLoadError(src, f"tensor {name}: {end - start} bytes for shape {shape}")
            out[name] = raw.view(np_dtype).reshape(shape)
        else:
            raise ModelLoadError(src, f"tensor {name} has unsupported dtype {dtype}")
    return out
