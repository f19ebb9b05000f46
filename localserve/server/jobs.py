"""Background jobs of the server (pull, quantize): a thread each, progress, cancel.

A job's work function receives the Job and reports through `job.progress(done, total)` (an
absolute count) or `job.advance(n)`; both raise JobCancelled once `cancel()` was asked, which
unwinds the store's own cleanup (its partial files), so a cancelled job leaves the store as it
was. Every state change, and progress at most every PROGRESS_INTERVAL, becomes a `job` event.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from localserve.server.events import EventBus

log = logging.getLogger("localserve.server.jobs")

PROGRESS_INTERVAL = 0.2
MAX_KEPT = 50  # finished jobs kept for GET /api/jobs


class JobCancelled(Exception):
    pass


@dataclass(slots=True, eq=False)
class Job:
    id: str
    kind: str  # "pull" | "quantize"
    target: str  # the pull reference or the quantize source
    params: dict
    unit: str = "B"  # what done/total count: bytes (pull) or weights (quantize)
    state: str = "running"
    done: int = 0
    total: int | None = None
    message: str = ""
    result: dict | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    _rate_mark: tuple[float, int] = (0.0, 0)  # (monotonic time, done) where the rate is measured from
    _end: float | None = None  # monotonic time it ended: the rate stays what it was
    _cancel: threading.Event = field(default_factory=threading.Event)
    _publish: Callable[["Job"], None] | None = None
    _last_publish: float = 0.0

    def progress(self, done: int, total: int | None = None) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"{self.kind} cancelled")
        if done < self.done:  # a new file of a multi-file pull starts at zero
            self._rate_mark = (time.monotonic(), done)
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if self._publish is not None and now - self._last_publish >= PROGRESS_INTERVAL:
            self._last_publish = now
            self._publish(self)

    def advance(self, n: int) -> None:
        self.progress(self.done + n)

    def note(self, message: str) -> None:
        self.message = message
        if self._publish is not None:
            self._publish(self)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def to_dict(self) -> dict:
        t0, d0 = self._rate_mark
        elapsed = (self._end or time.monotonic()) - t0 if t0 else 0.0
        rate = (self.done - d0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total and self.state == "running" else None
        return {
            "id": self.id, "kind": self.kind, "target": self.target, "params": self.params, "unit": self.unit,
            "state": self.state, "done": self.done, "total": self.total,
            "fraction": round(self.done / self.total, 6) if self.total else None,
            "rate": round(rate, 3), "eta_s": round(eta, 3) if eta is not None else None,
            "message": self.message, "result": self.result, "error": self.error,
            "started": self.started, "finished": self.finished,
        }


class JobManager:
    def __init__(self, bus: EventBus | None = None) -> None:
        self.bus = bus
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, target: str, params: dict, work: Callable[[Job], dict], unit: str = "B") -> Job:
        """Runs `work(job)` on a thread; what it returns becomes job.result."""
        with self._lock:
            job = Job(f"{kind}-{next(self._ids)}", kind, target, params, unit=unit)
            self._jobs[job.id] = job
            self._trim()
        job._rate_mark = (time.monotonic(), 0)
        job._publish = self._emit
        self._emit(job)
        threading.Thread(target=self._run, args=(job, work), name=f"localserve-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None and job.state == "running":
            job._cancel.set()
            job.note("cancelling...")
        return job

    def _run(self, job: Job, work: Callable[[Job], dict]) -> None:
        try:
            result = work(job)
            if job.cancel_requested:  # the work ended before it saw the cancel: it stands
                job.message = "finished before the cancel took effect"
            job.result, job.state = result, "done"
        except JobCancelled:
            job.state, job.message = "cancelled", "cancelled; the store is unchanged"
        except Exception as exc:  # a job's failure is its result, never the server's
            if job.cancel_requested:
                job.state, job.message = "cancelled", "cancelled; the store is unchanged"
            else:
                job.state, job.error = "failed", str(exc) or type(exc).__name__
                log.info("%s failed: %s", job.id, job.error)
        finally:
            job.finished, job._end = time.time(), time.monotonic()
            self._emit(job)

    def _emit(self, job: Job) -> None:
        if self.bus is not None:
            self.bus.publish("job", **job.to_dict())

    def _trim(self) -> None:
        done = [j for j in self._jobs.values() if j.state != "running"]
        for j in done[: max(0, len(done) - MAX_KEPT)]:
            del self._jobs[j.id]
