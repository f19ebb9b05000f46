"""The load generator of `localserve bench --serving`: streamed OpenAI requests from one asyncio
event loop (uvloop where installed), each sent at its time, timed event by event.

Built to stay off the critical path: request bodies are encoded before the clock starts, the
streams are read by a lean HTTP/1.1 client (serving_http) and scanned without JSON for token
events (serving_sse). The client measures its own CPU time; when one process is not enough,
`procs` > 1 spreads the requests over that many processes (request i to process i % procs, the
same send times, the concurrency limit split between them), and the results are merged.
Imports no torch and nothing of the server.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass, field

from localserve.bench.serving_http import sender
from localserve.bench.serving_metrics import RequestResult

perf_counter = time.perf_counter


@dataclass(slots=True)
class ClientJob:
    """One client process's share of a run (picklable: it crosses to --client-procs children)."""

    base_url: str
    path: str
    chat: bool
    bodies: list[bytes]
    expected: list[int]
    arrivals: list[float]
    max_concurrency: int | None = None
    http_client: str = "builtin"
    headers: dict = field(default_factory=dict)
    warmup: list[tuple[bytes, int]] = field(default_factory=list)  # (body, max_tokens), untimed
    timeout_s: float = 3600.0


async def _one(send, body: bytes, rec: RequestResult, sem: asyncio.Semaphore | None) -> None:
    if sem is not None:
        await sem.acquire()  # as vLLM: a request's clock starts when it is sent, not when it is due
    try:
        scan = await send(body, rec)
        got_usage = scan.got_usage
    except Exception as exc:  # a failed request is a figure, not a crash
        rec.error = f"{type(exc).__name__}: {exc}".rstrip(": ") or type(exc).__name__
        got_usage = False
    finally:
        rec.end = perf_counter()
        if sem is not None:
            sem.release()
    rec.check(got_usage)


async def _drive(job: ClientJob, ready=None) -> tuple[list[RequestResult], float, list[str]]:
    """Warm-up, then the timed run; `ready()` (multi-process) returns the shared start time."""
    n = len(job.bodies)
    client = sender(job.http_client, job, max(1, min(job.max_concurrency or n, n), len(job.warmup)))
    try:
        warm = [RequestResult(m) for _, m in job.warmup]
        await asyncio.gather(*(_one(client.send, b, r, None) for (b, _), r in zip(job.warmup, warm)))
        warm_errors = [r.error for r in warm if not r.ok]
        t0 = ready() if ready is not None else perf_counter()
        cpu0 = time.process_time()
        sem = asyncio.Semaphore(job.max_concurrency) if job.max_concurrency else None
        results = [RequestResult(m) for m in job.expected]
        tasks = []
        for body, rec, at in zip(job.bodies, results, job.arrivals):
            delay = t0 + at - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client.send, body, rec, sem)))
        await asyncio.gather(*tasks)
        cpu = time.process_time() - cpu0
    finally:
        await client.close()
    return results, cpu, warm_errors


def _run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _raise_fd_limit() -> None:
    """1,000+ open streams need 1,000+ sockets: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


@dataclass(slots=True)
class ClientRun:
    results: list[RequestResult]
    cpu_s: float  # all client processes, the timed part only
    proc_cpu_s: list[float]
    warmup_errors: list[str]
    total_cpu_s: float = 0.0  # all client processes from start to end: start-up and warm-up too


def run_client(job: ClientJob, procs: int = 1) -> ClientRun:
    _raise_fd_limit()
    procs = max(1, min(procs, len(job.bodies), job.max_concurrency or procs))
    cpu0 = time.process_time()
    if procs == 1:
        results, cpu, warm = _run_loop(_drive(job))
        run = ClientRun(results, cpu, [cpu], warm)
    else:
        run = _run_procs(job, procs)
    run.total_cpu_s += time.process_time() - cpu0
    return run


def _split(job: ClientJob, k: int, procs: int) -> ClientJob:
    """Process k's requests; a concurrency limit C is split exactly (C // procs, one more for the
    first C % procs), so that the processes together never exceed it."""
    c = job.max_concurrency
    share = None if not c else c // procs + (k < c % procs)
    return ClientJob(job.base_url, job.path, job.chat, job.bodies[k::procs], job.expected[k::procs],
                     job.arrivals[k::procs], share, job.http_client, job.headers,
                     job.warmup if k == 0 else [], job.timeout_s)


def _child(job: ClientJob, conn) -> None:
    _raise_fd_limit()

    def ready() -> float:
        conn.send("ready")
        return conn.recv()

    try:
        results, cpu, warm = _run_loop(_drive(job, ready))
        conn.send(([_pack(r) for r in results], cpu, warm, time.process_time()))
    except BaseException as exc:  # the parent must not wait forever
        conn.send(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        conn.close()


def _pack(r: RequestResult) -> tuple:
    return (r.expected_output, r.start, r.end, r.chunk_times, r.prompt_tokens, r.output_tokens, r.error)


def _run_procs(job: ClientJob, procs: int) -> ClientRun:
    ctx = mp.get_context("spawn")
    pipes, children = [], []
    for k in range(procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child, args=(_split(job, k, procs), child), daemon=True)
        p.start()
        child.close()
        pipes.append(parent)
        children.append(p)
    try:
        for conn in pipes:  # every child warmed up and waiting
            msg = conn.recv()
            if msg != "ready":
                raise RuntimeError(f"a client process failed: {msg}")
        t0 = perf_counter() + 0.05  # CLOCK_MONOTONIC: the same clock in every process
        for conn in pipes:
            conn.send(t0)
        parts = [conn.recv() for conn in pipes]
    except BaseException:
        for p in children:
            p.kill()
        raise
    finally:
        for p in children:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    bad = [m for m in parts if isinstance(m, str)]
    if bad:
        raise RuntimeError(f"a client process failed: {bad[0]}")
    # back in the original order: request i ran in process i % procs as its (i // procs)-th
    merged: list[RequestResult | None] = [None] * len(job.bodies)
    for k, (packed, _, _, _) in enumerate(parts):
        for j, t in enumerate(packed):
            merged[k + j * procs] = RequestResult(*t)
    cpus = [c for _, c, _, _ in parts]
    return ClientRun(merged, sum(cpus), cpus, parts[0][2], sum(total for *_, total in parts))
