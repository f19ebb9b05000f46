"""Tiny Hugging Face model folders (config.json, model.safetensors, tokenizer.json) for the
HF -> GGUF tests: random weights in HF names and layout, real trained BPE tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from localserve.models.gguf_tokenizer import PRE_TOKENIZER_SPLITS, load_gguf_tokenizer
from tests.models.tokenizer_builders import BYTE_LEVEL_SPECIALS, CORPUS, write_sentencepiece_gguf

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 4, 2, 16


def _llama3_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return tok


def _hf_names(arch: str, layers: int) -> dict[str, tuple[int, ...]]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, q),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        }
        if arch == "gemma3":
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (HIDDEN,), p + "post_feedforward_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
            }
    return shapes


def write_hf_folder(folder: Path, arch: str) -> Path:
    """arch: "llama" (byte-level llama3 tokenizer, llama3 rope scaling, separate lm_head) or
    "gemma3" (SentencePiece-style tokenizer, sliding layers, tied embeddings)."""
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "llama":
        tok = _llama3_tokenizer()
        bos, eos = "<|begin_of_text|>", "<|endoftext|>"
        layers = 2
    else:
        sp = write_sentencepiece_gguf(folder / "sp.gguf", architecture="gemma3")
        tok, _ = load_gguf_tokenizer(sp)
        sp.unlink()
        bos, eos = "<s>", "</s>"
        layers = 6
    tok.save(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": bos, "eos_token": eos, "add_bos_token": True, "chat_template": "{{ messages }}"})
    )
    common = dict(
        hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048,
        rms_norm_eps=1e-6, bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos),
    )
    if arch == "llama":
        config = dict(common, model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=256))
    else:
        config = dict(common, model_type="gemma3_text", rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                      sliding_window=16, sliding_window_pattern=6, query_pre_attn_scalar=HEAD_DIM,
                      tie_word_embeddings=True, pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(1)
    shapes = _hf_names(arch, layers) | {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if arch == "llama":
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):  # gemma stores w - 1, llama w
            base = 0.0 if arch == "gemma3" else 1.0
            tensors[name] = (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
