"""llama.cpp through llama-cpp-python's Llama object, as a bench runner.

A Llama object holds one sequence: N requests run back to back, as its Python server serves
them. Between calls it keeps the KV of the previous prompt + output and reuses the longest
common prefix with the next prompt (the prefix-hit case).
"""

from __future__ import annotations

import time

from localserve.bench.timing import BatchTiming, StreamTiming


class LlamaCppRunner:
    name = "llama.cpp"
    batch_mode = "sequential (one Llama object serves one sequence at a time, like its Python server)"

    def __init__(self, model_path: str, threads: int, n_ctx: int = 8192, n_batch: int = 512) -> None:
        import llama_cpp

        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=n_batch,
            verbose=False,
        )
        self.load_seconds = time.perf_counter() - t0
        self._info = {
            "engine": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "model_path": str(model_path),
            "n_threads": threads,
            "n_ctx": n_ctx,
            "n_batch": n_batch,
            "swa_full": bool(self.llm.context_params.swa_full),
            "batch_mode": self.batch_mode,
        }

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def _cached_prefix(self, prompt: list[int]) -> int:
        # what Llama.generate will reuse: the common prefix with the evaluated tokens,
        # at most len(prompt) - 1 (the last prompt token is always evaluated for its logits)
        n = 0
        for a, b in zip(self.llm._input_ids[: self.llm.n_tokens], prompt):
            if a != b:
                break
            n += 1
        return min(n, len(prompt) - 1)

    def stream(self, prompt: list[int], max_tokens: int) -> StreamTiming:
        cached = self._cached_prefix(prompt)
        times: list[float] = []
        start = time.perf_counter()
        # temp=0 is greedy; generate never stops at EOS by itself (ignore_eos), we stop at max_tokens
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            if len(times) >= max_tokens:
                break
        return StreamTiming(start, times, len(prompt), cached)

    def batch(self, prompts: list[list[int]], max_tokens: int) -> BatchTiming:
        start = time.perf_counter()
        per = [len(self.stream(p, max_tokens).token_times) for p in prompts]
        return BatchTiming(time.perf_counter() - start, sum(per), len(prompts), per)

    def describe(self) -> dict:
        return {**self._info, "load_seconds": round(self.load_seconds, 3)}

    def close(self) -> None:
        self.llm.close()
