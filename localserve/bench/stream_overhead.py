"""`localserve bench --stream-overhead`: the server's streaming overhead, the same greedy stream
in-process and through `localserve up`.

The in-process side steps an LLMEngine directly (EngineRunner). The server side starts
`localserve up` on the same model, backend and threads in a subprocess on a free 127.0.0.1 port
and streams `/v1/completions` over HTTP with SSE, timing each chunk as the client receives it.
Both get the same prompt ids and decode the same number of tokens (greedy, EOS ignored); the
runs alternate, so load from elsewhere hits both alike.

Per token, two views: wall time (decode span / (tokens - 1), prefill excluded, as the decode
figure of `localserve bench`) and CPU time of the process doing the serving (this process's
CPU time for the in-process run; the server process's, from /proc, for the HTTP run). CPU time
barely moves with other processes on the machine, so it separates the server's own cost
(HTTP, JSON, SSE, the async hop) from a neighbour's noise.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localserve.bench.cpu_load import proc_cpu_seconds
from localserve.bench.prompts import DECODE_TEXT


@dataclass(slots=True)
class OverheadRun:
    wall_ms_per_token: float
    cpu_ms_per_token: float


@dataclass(slots=True)
class OverheadResult:
    model: str
    threads: int
    tokens: int
    prompt_tokens: int
    in_process: list[OverheadRun] = field(default_factory=list)
    server: list[OverheadRun] = field(default_factory=list)
    date: str = ""

    def median(self, side: str, what: str) -> float:
        return statistics.median(getattr(r, what) for r in getattr(self, side))

    def overhead(self, what: str) -> float:
        return self.median("server", what) - self.median("in_process", what)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["median"] = {side: {w: self.median(side, w) for w in ("wall_ms_per_token", "cpu_ms_per_token")}
                       for side in ("in_process", "server")}
        d["overhead_ms_per_token"] = {w: self.overhead(w) for w in ("wall_ms_per_token", "cpu_ms_per_token")}
        return d

    def table(self) -> str:
        rows = [("wall ms/token (decode)", "wall_ms_per_token"), ("CPU ms/token (serving process)", "cpu_ms_per_token")]
        lines = ["| figure | in-process engine | server (HTTP + SSE) | overhead per token |", "|---|---:|---:|---:|"]
        for label, key in rows:
            lines.append(f"| {label} | {self.median('in_process', key):.2f} | {self.median('server', key):.2f} "
                         f"| {self.overhead(key):+.2f} |")
        lines.append("")
        lines.append(f"{self.model}, {self.threads} threads, {self.tokens} tokens greedy after a "
                     f"{self.prompt_tokens}-token prompt, medians of {len(self.server)} alternating runs, {self.date}.")
        return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`localserve up MODEL` in a subprocess; stop() ends it with SIGTERM."""

    def __init__(self, model: str | None, backend: str, threads: int, ready_timeout: float = 600) -> None:
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "localserve", "up", *([model] if model else []), "--backend", backend,
               "--threads", str(threads), "--port", str(self.port), "--log-level", "warning"]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="localserve-up-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"localserve up exited with {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"localserve up was not ready in {ready_timeout:.0f} s")

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[float, float]:
        """One streamed completion: its decode wall seconds per token and the server's CPU seconds."""
        import httpx

        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        cpu0 = proc_cpu_seconds(self.proc.pid)
        times: list[float] = []
        usage = None
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]
        cpu = proc_cpu_seconds(self.proc.pid) - cpu0
        if usage is None or usage["completion_tokens"] != max_tokens:
            raise RuntimeError(f"asked {max_tokens} tokens, the server reported {usage}")
        # a chunk per token (a token whose text is held back, e.g. half a UTF-8 character, goes
        # out with the next one): the decode span is first chunk to last over max_tokens - 1
        return (times[-1] - times[0]) / (max_tokens - 1), cpu

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_stream_overhead(model: str | None, backend: str, threads: int, tokens: int = 128,
                         repeats: int = 5, warmup: int = 1, log=print) -> OverheadResult:
    from localserve.bench.config import BenchConfig
    from localserve.bench.engine_runner import EngineRunner
    from localserve.bench.prompts import TextEncoder
    from localserve.bench.suite import _plain_encode, load_localserve

    cfg = BenchConfig(model=model, backend=backend, threads=threads, decode_tokens=tokens, concurrency=(1,))
    log(f"loading {model or 'the default model'} in-process ({backend}, {threads} threads)")
    loaded = load_localserve(cfg)
    inproc = EngineRunner(loaded)
    enc = TextEncoder(_plain_encode(loaded.tokenizer), loaded.config.vocab_size, loaded.config.bos_token_id)
    prompt = enc(DECODE_TEXT)
    log("starting localserve up")
    server = ServerProcess(model, backend, threads)
    result = OverheadResult(model or "default (gemma3:270m)", threads, tokens, len(prompt),
                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        for i in range(warmup + repeats):
            # prefix caching would make later prompts cheaper on one side only: both see the same
            # prompt every run and both cache it, so each run after the first is a hit on both
            c0 = time.process_time()
            t = inproc.stream(prompt, tokens)
            local = OverheadRun(1000 / t.decode_rate, 1000 * (time.process_time() - c0) / tokens)
            per_token, cpu = server.stream(prompt, tokens)
            remote = OverheadRun(1000 * per_token, 1000 * cpu / tokens)
            if i >= warmup:
                result.in_process.append(local)
                result.server.append(remote)
            log(f"  run {i + 1 - warmup if i >= warmup else 'warm-up'}: in-process {local.wall_ms_per_token:.2f} ms/tok "
                f"({local.cpu_ms_per_token:.2f} CPU), server {remote.wall_ms_per_token:.2f} ms/tok "
                f"({remote.cpu_ms_per_token:.2f} CPU)")
    finally:
        server.stop()
        inproc.close()
    return result
