"""`localserve bench`: the in-process engine measured side by side with llama.cpp (llama-cpp-python)
on the same GGUF, the same token ids and the same method, in one run."""

from localserve.bench.config import FIGURE_GROUPS, BenchConfig
from localserve.bench.suite import BenchResult, run_bench

__all__ = ["FIGURE_GROUPS", "BenchConfig", "BenchResult", "run_bench"]
