"""`localserve bench --serving --in-process`: the serving workload driven straight into an
in-process LLMEngine (no HTTP, no server process), timed the way the HTTP client times it, so the
two figures can be read side by side.

Same prompts (text is tokenized as `/v1/completions` tokenizes it: special tokens added; chat
prompts the same, without the template's few tokens), same output lengths (greedy, EOS ignored),
same send times and concurrency limit. The engine is stepped on this thread; a request is
"sent" when the loop adds it, and its tokens "arrive" when the step that made them returns.
Loads torch and the model in this process: on a GPU, the running server must leave room
(`localserve up --kv-memory`), or measure without a server.
"""

from __future__ import annotations

import time

from localserve.bench.serving_data import Workload
from localserve.bench.serving_metrics import RequestResult

perf_counter = time.perf_counter


def run_in_process(work: Workload, warmup: Workload, *, model: str | None, backend: str, threads: int | None,
                   max_num_seqs: int, max_concurrency: int | None, log=print) -> tuple[list[RequestResult], float, dict]:
    """(results, CPU seconds of this process over the timed run, what was loaded)."""
    runs, described = run_workloads([(work, max_concurrency)], warmup, model=model, backend=backend,
                                    threads=threads, max_num_seqs=max_num_seqs, log=log)
    return runs[0][0], runs[0][1], described


def run_workloads(works: list[tuple[Workload, int | None]], warmup: Workload, *, model: str | None, backend: str,
                  threads: int | None, max_num_seqs: int, weight_format: str = "auto",
                  log=print) -> tuple[list[tuple[list[RequestResult], float]], dict]:
    """Each (workload, its concurrency limit) in turn on one loaded engine, the warm-up first:
    [(results, CPU seconds)] and what was loaded. The prefix cache is emptied between them."""
    from localserve.backends import select_backend
    from localserve.bench.engine_runner import EngineRunner, greedy
    from localserve.engine.backend import BackendConfig
    from localserve.engine.llm_engine import EngineConfig
    from localserve.runtime.loader import load_model, warm_up

    defaults = select_backend(backend).serving_defaults()
    # the server's shape: its batch and its memory share for the KV pool
    engine_cfg = EngineConfig(max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max(defaults.max_num_batched_tokens, max_num_seqs))
    backend_cfg = BackendConfig(num_threads=threads, max_num_seqs=engine_cfg.max_num_seqs,
                                max_num_batched_tokens=engine_cfg.max_num_batched_tokens, weight_format=weight_format,
                                memory_utilization=defaults.memory_utilization)
    log(f"loading {model or 'the default model'} in-process ({backend}, {threads or 'default'} threads, "
        f"{max_num_seqs} sequences at once)")
    loaded = load_model(model, backend=backend, backend_cfg=backend_cfg, engine_cfg=engine_cfg)
    runner = EngineRunner(loaded)
    try:
        warm_up(loaded.engine)
        tok = loaded.tokenizer

        def ids(prompts: list) -> list[list[int]]:
            if prompts and isinstance(prompts[0], str):
                if tok is None:
                    raise RuntimeError("text prompts need a tokenizer; this model has none")
                return [list(tok.encode(p, add_special_tokens=True)) for p in prompts]
            return prompts

        engine = loaded.engine
        for p, m in zip(ids(warmup.prompts), warmup.output_lens):
            engine.add_request(p, greedy(m))
        while engine.has_unfinished():
            engine.step()
        runs = []
        for work, max_concurrency in works:
            engine.reset_prefix_cache()
            runs.append(_drive(engine, ids(work.prompts), work, max_concurrency, greedy))
        return runs, runner.describe()
    finally:
        runner.close()


def _drive(engine, prompts, work: Workload, max_concurrency, params) -> tuple[list[RequestResult], float]:
    n = len(prompts)
    results = [RequestResult(m) for m in work.output_lens]
    by_id: dict[str, RequestResult] = {}
    nxt = in_flight = 0
    t0 = perf_counter()
    cpu0 = time.process_time()
    while nxt < n or engine.has_unfinished():
        now = perf_counter()
        while nxt < n and t0 + work.arrivals[nxt] <= now and (not max_concurrency or in_flight < max_concurrency):
            rec = results[nxt]
            rec.start = now
            rec.prompt_tokens = len(prompts[nxt])
            try:
                by_id[engine.add_request(prompts[nxt], params(work.output_lens[nxt]))] = rec
                in_flight += 1
            except Exception as exc:  # e.g. a prompt over the context: a failed request, as over HTTP
                rec.error, rec.end = f"{type(exc).__name__}: {exc}", now
            nxt += 1
        if not engine.has_unfinished():
            if nxt < n:
                time.sleep(max(0.0, t0 + work.arrivals[nxt] - perf_counter()))
            continue
        deltas = engine.step()
        now = perf_counter()
        for d in deltas:
            rec = by_id[d.request_id]
            if d.token_ids:
                rec.chunk_times.append(now)
                rec.output_tokens += len(d.token_ids)
            if d.finished:
                rec.end = now
                in_flight -= 1
    cpu = time.process_time() - cpu0
    for r in results:
        r.check(True)
    return results, cpu
