"""The CUDA backend's recommended batch shape for offline / high-load serving.

The engine's own defaults (EngineConfig: 64 sequences, 2,048 tokens a step) suit a small CPU.
On a GPU, what decides throughput once the host is hidden (overlap scheduling, pinned staging)
is how the work is batched: how many sequences decode together and how many prompt tokens a
mixed step may carry. `recommend_batch_shape` is what the loader and the benchmarks apply when
the user gave no value; it never overrides an explicit one. Measured on the H100 with
llama-3.1-8b (benchmarks/GPU_NOTES.md "Batch shape", BENCHMARKS.md "### Batch shape").

Invariant: max_num_seqs never exceeds what the KV pool can hold at `min_tokens_per_seq` tokens
a sequence (more running sequences than that only preempt), nor MAX_NUM_SEQS. Decode graphs
stop at MAX_GRAPH_BATCH whatever max_num_seqs is: larger decode steps run eager, which measured
no slower per token there (40.4 µs eager at 513-1,024 rows vs 40.7 µs for the bs-512 graph),
because at that size the GPU, not the launch, is the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from localserve import envs

# the largest decode graph (LOCALSERVE_MAX_GRAPH_BATCH overrides): FlashInfer's tensor-core
# decode plan at bs 1,024 needs 335 MB of split-KV scratch (batch_prefill_tmp_v), so graphs
# past 512 get a 512 MiB workspace (`workspace_bytes`) instead of 256 MiB
MAX_GRAPH_BATCH = envs.MAX_GRAPH_BATCH.get()
MAX_NUM_SEQS = 1024  # the most sequences recommended (measured up to here)

# measured best on the H100 for Show b (1,000 prompts, 4-400 in, 4-358 out), run 6:
# 512 x 8,192 12.6k out tok/s, 1,024 x 8,192 13.47k (+6.9%), 1,024 x 16,384 13.3k
RECOMMENDED_MAX_NUM_SEQS = 1024
RECOMMENDED_MAX_NUM_BATCHED_TOKENS = 8192


def workspace_bytes(max_graph_batch: int) -> int:
    """FlashInfer's float workspace for decode graphs up to max_graph_batch rows."""
    return (512 << 20) if max_graph_batch > 512 else (256 << 20)


@dataclass(slots=True, frozen=True)
class BatchShape:
    max_num_seqs: int
    max_num_batched_tokens: int


def recommend_batch_shape(kv_tokens: int | None = None, min_tokens_per_seq: int = 256,
                          max_num_seqs: int = RECOMMENDED_MAX_NUM_SEQS,
                          max_num_batched_tokens: int = RECOMMENDED_MAX_NUM_BATCHED_TOKENS
                          ) -> BatchShape:
    """The batch shape to run with. `kv_tokens`, when known (blocks x block_size after the
    KV pool is sized), caps the sequences at what fits at `min_tokens_per_seq` each; the result
    is a multiple of 64 (a graph bucket) and at least 64."""
    seqs = min(int(max_num_seqs), MAX_NUM_SEQS)
    if kv_tokens is not None and kv_tokens > 0:
        fit = int(kv_tokens) // max(1, int(min_tokens_per_seq))
        seqs = min(seqs, max(64, fit // 64 * 64))
    tokens = max(int(max_num_batched_tokens), seqs)  # a step must fit every running decode
    return BatchShape(max_num_seqs=seqs, max_num_batched_tokens=tokens)
