"""What a model file is (architecture, size, quantization, context, shapes) and what it needs
in memory: weights plus the KV cache at a given context.

Read from the GGUF header or an HF folder's config.json only; no tensor data is touched.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from localserve.models.gguf_file import GGUFFile
from localserve.store.names import file_type_label

KV_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(slots=True)
class ModelSummary:
    format: str
    architecture: str
    parameters: int
    quantization: str
    context: int
    weight_bytes: int
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    sliding_window: int | None = None
    num_sliding_layers: int = 0
    name: str = ""
    chat_template: str | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensor count
    matrix_params: int = 0  # weights of 2-D tensors (what backends quantize)

    def kv_bytes(self, ctx: int, dtype: str = "float32", window_aware: bool = False) -> int:
        """K and V for `ctx` tokens over every layer. The paged KV pool keeps the full context
        on every layer; `window_aware` gives the floor where sliding layers keep only their window."""
        per_token_layer = 2 * self.num_kv_heads * self.head_dim * KV_DTYPE_BYTES[dtype]
        if not window_aware or not self.sliding_window:
            return per_token_layer * self.num_layers * ctx
        full = self.num_layers - self.num_sliding_layers
        return per_token_layer * (full * ctx + self.num_sliding_layers * min(ctx, self.sliding_window))

    def cpu_weight_bytes(self) -> int:
        """What the CPU backend holds: matrices as Q8_0 (34 bytes per 32 weights), vectors F32."""
        return self.matrix_params * 34 // 32 + (self.parameters - self.matrix_params) * 4


def summarize_gguf(path: str | os.PathLike) -> ModelSummary:
    f = GGUFFile(path)
    try:
        md = f.metadata
        arch = str(md.get("general.architecture", ""))

        def key(name: str, default=0):
            return md.get(f"{arch}.{name}", default)

        infos = f.tensor_infos.values()
        counts = Counter(i.ggml_type for i in infos)
        heads = int(key("attention.head_count") or 0)
        hidden = int(key("embedding_length") or 0)
        layers = int(key("block_count") or 0)
        window = key("attention.sliding_window", None)
        pattern = key("attention.sliding_window_pattern", None)
        if isinstance(pattern, list):
            n_sliding = sum(bool(p) for p in pattern)
        elif window and arch == "gemma3":
            every = int(pattern or 6)
            n_sliding = sum((i + 1) % every != 0 for i in range(layers))
        else:
            n_sliding = layers if window else 0
        tokens = md.get("tokenizer.ggml.tokens") or []
        embd = f.tensor_infos.get("token_embd.weight")
        return ModelSummary(
            format="gguf",
            architecture=arch,
            parameters=sum(prod(i.shape) for i in infos),
            quantization=file_type_label(md.get("general.file_type")) or _dominant_type(f),
            context=int(key("context_length") or 0),
            weight_bytes=sum(i.n_bytes for i in infos),
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads) or heads),
            head_dim=int(key("attention.key_length", hidden // heads if heads else 0) or 0),
            vocab_size=int(key("vocab_size", 0) or (embd.shape[0] if embd else len(tokens))),
            sliding_window=int(window) if window else None,
            num_sliding_layers=n_sliding,
            name=str(md.get("general.name", "")),
            chat_template=md.get("tokenizer.chat_template"),
            tensor_types=dict(counts),
            matrix_params=sum(prod(i.shape) for i in infos if len(i.shape) >= 2),
        )
    finally:
        f.close()


def _dominant_type(f: GGUFFile) -> str:
    """The type holding most bytes among matrices (what llama.cpp's file type would say)."""
    by_bytes: Counter[str] = Counter()
    for i in f.tensor_infos.values():
        if len(i.shape) >= 2:
            by_bytes[i.ggml_type] += i.n_bytes
    return by_bytes.most_common(1)[0][0] if by_bytes else "F32"


def summarize_hf_folder(folder: str | os.PathLike) -> ModelSummary:
    from localserve.models.config_loaders import config_from_hf
    from localserve.models.hf_loader import read_safetensors

    folder = Path(folder)
    cfg_json = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(cfg_json, None, str(folder))
    params, matrices, nbytes, dtypes = 0, 0, 0, Counter()
    for st in sorted(folder.glob("*.safetensors")):
        for name, t in read_safetensors(st).items():
            n = prod(t.shape)
            params += n
            matrices += n if len(t.shape) >= 2 else 0
            dtype = getattr(t, "ggml_type", None) or str(getattr(t, "dtype", "")).upper().replace("FLOAT", "F")
            nbytes += t.raw.nbytes if hasattr(t, "raw") else t.nbytes
            dtypes[dtype] += 1
    template = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        template = json.loads(tc.read_text()).get("chat_template")
        template = template if isinstance(template, str) else None
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return ModelSummary(
        format="hf",
        architecture=cfg.architecture,
        parameters=params,
        quantization=dtypes.most_common(1)[0][0] if dtypes else "",
        context=cfg.max_context,
        weight_bytes=nbytes,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        sliding_window=cfg.sliding_window,
        num_sliding_layers=sum(cfg.layer_is_sliding),
        name=cfg.name,
        chat_template=template,
        tensor_types=dict(dtypes),
        matrix_params=matrices,
    )


def available_memory() -> int:
    """Bytes the OS says a new process can use (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
