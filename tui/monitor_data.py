"""What the TUI keeps from the event stream: rolling series for the plots, the request log,
the jobs. Plain data, fed one event at a time by the app."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

HISTORY = 120  # points per series: two minutes of one-second stats
LOG_SIZE = 200


@dataclass(slots=True)
class Series:
    values: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def add(self, v: float) -> None:
        self.values.append(float(v))

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    def peak(self) -> float:
        return max(self.values, default=0.0)


@dataclass
class MonitorData:
    tok_s: Series = field(default_factory=Series)
    ttft_ms: Series = field(default_factory=Series)  # one point per finished request
    queue: Series = field(default_factory=Series)  # peak running + waiting in each second
    kv_usage: Series = field(default_factory=Series)  # peak percent of the KV pool held by requests
    prefix_hit: Series = field(default_factory=Series)  # percent of looked-up prompt tokens found cached
    requests: deque = field(default_factory=lambda: deque(maxlen=LOG_SIZE))  # request_finish events, newest last
    jobs: dict[str, dict] = field(default_factory=dict)  # job id -> its latest job event
    last_stats: dict | None = None
    model_events: deque = field(default_factory=lambda: deque(maxlen=20))  # model_load / model_unload
    events_seen: int = 0
    num_requests: int = 0  # request_finish events ever received (the log keeps the last LOG_SIZE)
    version: int = 0  # bumps on every change; views redraw when it moved

    def apply(self, type: str, data: dict) -> None:
        self.events_seen += 1
        if type == "stats":
            self._stats(data)
        elif type == "request_finish":
            self.requests.append(data)
            self.num_requests += 1
            if data.get("ttft") is not None:
                self.ttft_ms.add(1000.0 * data["ttft"])
        elif type == "job":
            self.jobs[data["id"]] = data
        elif type in ("model_load", "model_unload"):
            self.model_events.append({"type": type, **data})
        else:
            return
        self.version += 1

    def _stats(self, s: dict) -> None:
        self.last_stats = s
        self.tok_s.add(s.get("tok_s", 0.0))
        self.queue.add(s.get("queue_peak", s.get("running", 0) + s.get("waiting", 0)))
        self.kv_usage.add(100.0 * s.get("kv_usage_peak", s.get("kv", {}).get("usage", 0.0)))
        # an interval without prompt lookups says nothing about the cache: hold the last rate
        if s.get("prefix_query_tokens_recent", 0) > 0 or self.prefix_hit.last is None:
            self.prefix_hit.add(100.0 * s.get("prefix_hit_rate_recent", 0.0))
        else:
            self.prefix_hit.add(self.prefix_hit.last)
