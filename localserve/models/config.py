"""ModelConfig: the architecture facts every backend's model code is written against.

Built from GGUF metadata (`from_gguf_metadata`) or a Hugging Face `config.json`
(`from_hf_config`) by `localserve.models.config_loaders`; random-weight presets live in
`localserve.models.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "mistral", "qwen2", "qwen3")


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("llama3"), or plain "linear" position scaling."""

    kind: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    rms_norm_eps: float
    rope_theta: float
    # gemma3: sliding layers use their own rope base; None elsewhere
    rope_local_theta: float | None = None
    # applies to global (non-sliding) layers only
    rope_scaling: RopeScaling | None = None
    # tokens a sliding layer sees, the query's own position included; None: no sliding layers
    sliding_window: int | None = None
    # per layer: True where the layer attends through the sliding window
    layer_is_sliding: tuple[bool, ...] = ()
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    # gemma: the input embedding is multiplied by sqrt(hidden_size); None: no scaling
    embedding_scale: float | None = None
    # softmax scale of attention; default 1/sqrt(head_dim) (gemma: query_pre_attn_scalar**-0.5)
    attn_scale: float | None = None
    # gemma "sandwich" norms: post_attention_norm and post_ffw_norm around each block
    post_norms: bool = False
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs num_heads % num_kv_heads == 0"
        if self.layer_is_sliding:
            assert len(self.layer_is_sliding) == self.num_layers
        else:
            object.__setattr__(self, "layer_is_sliding", (False,) * self.num_layers)

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes
