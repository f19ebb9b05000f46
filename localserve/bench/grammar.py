"""The cost of grammar-constrained decoding (issue 5): `localserve bench --grammar`.

Three figures, in-process:

* mask time: every GrammarState.fill_bitmask call (the host fills the packed mask of each
  constrained sequence after accepting its token, in Scheduler._advance_grammar, called from
  Scheduler.update), every _advance_grammar call (accept + jump-forward + fill), and every
  apply_token_bitmask call (the backend sets the disallowed logits to -inf before sampling),
  timed one by one over real constrained generations, in wall time and in the calling thread's
  CPU time (which leaves out the time a busy machine kept the thread descheduled). They are
  wrapped with a timer only for this pass (`_timing`), never during the throughput runs.
* decode throughput, json_schema vs unconstrained, at each concurrency: two engines on the same
  model, one serving the constrained requests, the other their unconstrained twins, stepped
  alternately (one engine step each in turn), so that load from other processes, which comes
  and goes over seconds, hits both alike. Each unconstrained request decodes exactly the output
  length its constrained twin had in the warm-up (greedy, EOS ignored); constrained requests
  stop where their JSON closes. Tokens inserted by jump-forward count as output tokens; forward
  steps are counted too, so the time per step (the cost of masking alone) is there as well, and
  with jump-forward off, where both sides run the same batch shapes step for step, the ratio of
  the paired steps' times. Measured with jump-forward on and off (the same constrained engine:
  the scheduler reads the flag at every step).
* jump-forward share: forced tokens / output tokens, per schema.

Decode figures leave out the steps that emitted some request's first token (prefill steps),
as the decode figure of `localserve bench` does. Other processes' CPU share (ForeignCpuMeter)
is kept next to every phase.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Callable, Iterator

from localserve.bench.grammar_report import STRICT  # noqa: F401 (re-exported)
from localserve.bench.grammar_report import BatchRecord, GrammarBenchResult, Phase, Side, Timings, _share, _spread
from localserve.bench.machine import ForeignCpuMeter, load_average, machine_info

Log = Callable[[str], None]

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}

# strict schemas (additionalProperties false, bounded strings and numbers) taken from
# tests/engine/grammar_schemas.py; the first is the "strict schema" of the jump-forward figure
SCHEMAS: dict[str, dict] = {
    "tool_call_like": {
        "type": "object",
        "properties": {
            "name": {"enum": ["get_weather", "get_time"]},
            "arguments": {"type": "object", "properties": {"city": _NAME, "unit": {"enum": ["c", "f"]}},
                          "required": ["city"], "additionalProperties": False},
        },
        "required": ["name", "arguments"], "additionalProperties": False,
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": _NAME,
            "address": {"type": "object", "properties": {"city": _NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "flat_person": {
        "type": "object",
        "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"sku": _NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    },
    "enum_color": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "shade": {"enum": [1, 2, 3]}},
        "required": ["color", "shade"], "additionalProperties": False,
    },
    "bounded_number": {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -10, "maximum": 40},
                       "humidity": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["temperature", "humidity"], "additionalProperties": False,
    },
    "any_of_objects": {
        "type": "object",
        "properties": {"shape": {"anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}},
             "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 99}},
             "required": ["kind", "side"], "additionalProperties": False},
        ]}},
        "required": ["shape"], "additionalProperties": False,
    },
    "date_pattern": {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["date"], "additionalProperties": False,
    },
}


# ----------------------------------------------------------------------------- results

Batch = list[tuple[str, list[int]]]  # (schema name, chat prompt ids), added to the engine together


@contextlib.contextmanager
def _timing(owner: Any, name: str, sink: list[tuple[float, float, Any]],
            note: Callable[..., Any] = lambda *args: None) -> Iterator[None]:
    """Replaces owner.name (a class's method or a module's function) by a wrapper that appends
    (wall seconds, this thread's CPU seconds, note(*args)) of every call to sink; restored on
    exit. `note` keeps what the bench needs of the arguments and nothing more: holding on to
    the arguments themselves (a [16, 262144] logits tensor a step) would keep the allocator
    from reusing that memory, and the fresh pages would be timed as page faults."""
    original = owner.__dict__[name]

    def timed(*args, **kwargs):
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append((time.perf_counter() - t0, time.thread_time() - c0, note(*args)))

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _timings(label: str, calls: list[tuple[float, float, Any]]) -> Timings:
    return Timings(label, [1000 * w for w, _, _ in calls], [1000 * c for _, c, _ in calls])


class Stream:
    """One engine working through a cycle of batches, one engine step per `step()` call; a
    batch is added whole when the one before it has finished. Constrained requests get the
    batch's schema and stop where their JSON closes; unconstrained ones get exactly the planned
    output lengths, EOS ignored."""

    def __init__(self, engine, tokenizer, batches: list[Batch], max_tokens: int,
                 lengths: list[list[int]] | None = None) -> None:
        assert not engine.has_unfinished(), "the bench owns the engine"
        self.engine, self.tok, self.batches = engine, tokenizer, batches
        self.max_tokens = max_tokens
        self.lengths = lengths  # None: constrained
        self.side = Side(lengths is None, engine.scheduler.cfg.enable_jump_forward)
        self._next = 0
        self._ids: dict[str, str] = {}  # request id -> schema name, of the batch in flight
        self._toks: dict[str, list[int]] = {}
        self._steps: list[tuple[float, int, bool]] = []
        self._forced: dict[str, int] = {}

    @property
    def completed(self) -> int:
        return len(self.side.batches)

    def _params(self, name: str, j: int):
        from localserve.engine.guided import GuidedDecoding
        from localserve.engine.sampling_params import SamplingParams

        if self.lengths is None:
            return SamplingParams(max_tokens=self.max_tokens, temperature=0.0, seed=0,
                                  guided=GuidedDecoding(json_schema=SCHEMAS[name]))
        n = self.lengths[self._next % len(self.batches)][j]
        return SamplingParams(max_tokens=n, temperature=0.0, seed=0, ignore_eos=True)

    def step(self) -> None:
        eng = self.engine
        if not self._ids:
            batch = self.batches[self._next % len(self.batches)]
            for j, (name, prompt) in enumerate(batch):
                rid = eng.add_request(prompt, self._params(name, j))
                self._ids[rid], self._toks[rid], self._forced[rid] = name, [], 0
            self._steps = []
        t0 = time.perf_counter()
        deltas = eng.step()
        dt = time.perf_counter() - t0
        first = any(not self._toks[d.request_id] for d in deltas)
        n = 0
        for d in deltas:
            self._toks[d.request_id] += d.token_ids
            self._forced[d.request_id] += len(d.token_ids) - 1  # the scheduler's count
            n += len(d.token_ids)
        if deltas:
            self._steps.append((dt, n, not first))
        if not eng.has_unfinished():
            self._finish_batch()

    def _finish_batch(self) -> None:
        toks = [self._toks[r] for r in self._ids]
        valid = sum(_parses(self.tok.decode(t)) for t in toks) if self.side.constrained else 0
        per_schema: dict[str, list[int]] = {}
        for r, name in self._ids.items():
            acc = per_schema.setdefault(name, [0, 0])
            acc[0] += self._forced[r]
            acc[1] += len(self._toks[r])
        self.side.batches.append(BatchRecord([len(t) for t in toks], sum(self._forced.values()), valid,
                                             self._steps, per_schema))
        self._ids, self._toks, self._forced = {}, {}, {}
        self._next += 1

    def drop_in_flight(self) -> None:
        """Aborts the batch in flight, if any; it is not counted."""
        for rid in list(self._ids):
            self.engine.abort(rid)
        self._ids, self._toks, self._forced = {}, {}, {}
        while self.engine.has_unfinished():  # aborted requests leave at the next schedule
            self.engine.step()


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _workload(tok, concurrency: int, sequential: int) -> list[Batch]:
    """At concurrency 1, `sequential` requests one after another; else one batch of that many.
    Prompts cycle over SCHEMAS and are all distinct."""
    names = list(SCHEMAS)
    reqs = []
    for i in range(sequential if concurrency == 1 else concurrency):
        name = names[i % len(names)]
        text = f"Write example number {i + 1} of a {name.replace('_', ' ')} as JSON."
        reqs.append((name, tok.encode_chat([{"role": "user", "content": text}])))
    return [[r] for r in reqs] if concurrency == 1 else [reqs]


def _num_masked(logits, rows) -> int:
    """apply_token_bitmask's rows that carry a mask."""
    return sum(r.token_bitmask is not None for r in rows)


def _set_jump_forward(engine, on: bool) -> None:
    # the scheduler reads its cfg at every update; the engine is idle between phases
    engine.cfg.enable_jump_forward = on
    engine.scheduler.cfg.enable_jump_forward = on


def _run_alone(stream: Stream, batches: int) -> Stream:
    while stream.completed < batches:
        stream.step()
    return stream


def run_grammar_bench(model: str | None = None, threads: int = 2, concurrency: tuple[int, ...] = (1, 16),
                      backend: str = "cpu", max_tokens: int = 128, repeats: int = 3, warmup: int = 1,
                      sequential: int = 4, jump_forward: tuple[bool, ...] = (True, False),
                      log: Log = print) -> GrammarBenchResult:
    """Loads the model twice (one engine for constrained requests, one for unconstrained: the
    phases step them alternately), then: warm-up and planned lengths, the mask pass, and one
    phase per (concurrency, jump-forward) of `repeats` passes over its workload."""
    from localserve.backends.torch_common import sampling
    from localserve.bench.config import BenchConfig
    from localserve.bench.suite import load_localserve
    from localserve.engine.grammar import GrammarState
    from localserve.engine.scheduler import Scheduler

    machine = machine_info()
    cfg = BenchConfig(model=model, backend=backend, threads=threads, concurrency=tuple(concurrency),
                      concurrent_tokens=max_tokens, decode_tokens=max_tokens, prefix_tokens=1, prefill_tokens=1)
    log(f"loading {model or 'the default model'} twice ({backend}, {threads} threads)")
    con_model, unc_model = load_localserve(cfg), load_localserve(cfg)
    con, unc, tok = con_model.engine, unc_model.engine, con_model.tokenizer
    work = {c: _workload(tok, c, sequential) for c in concurrency}
    result = GrammarBenchResult(model or "default (gemma3:270m Q4_K_M)", threads, max_tokens, repeats, machine=machine)

    # warm-up: compiles the schemas (xgrammar caches them) and fixes each request's greedy
    # output length, which its unconstrained twin then decodes
    log("warm-up (compiles the schemas, plans the lengths)")
    lengths: dict[tuple[int, bool], list[list[int]]] = {}
    for jf in jump_forward:
        _set_jump_forward(con, jf)
        for c in concurrency:
            for _ in range(max(1, warmup)):
                s = _run_alone(Stream(con, tok, work[c], max_tokens), len(work[c]))
            lengths[c, jf] = [b.lengths for b in s.side.batches]
    for c in concurrency:
        for _ in range(max(1, warmup)):
            _run_alone(Stream(unc, tok, work[c], max_tokens, lengths[c, jump_forward[0]]), len(work[c]))

    log("mask pass: timing every fill_bitmask, _advance_grammar and apply_token_bitmask call")
    _set_jump_forward(con, jump_forward[0])
    fills: list = []
    advances: list = []
    meter = ForeignCpuMeter()
    applies_by_c = {}
    for c in concurrency:
        applies: list = []
        # sample() looks apply_token_bitmask up in its module at every call
        with _timing(GrammarState, "fill_bitmask", fills), _timing(Scheduler, "_advance_grammar", advances), \
                _timing(sampling, "apply_token_bitmask", applies, _num_masked):
            _run_alone(Stream(con, tok, work[c], max_tokens), len(work[c]))
        applies_by_c[c] = [a for a in applies if a[2]]  # the steps where some row had a mask
    result.mask_foreign_cpu = meter.foreign_share()
    result.timings["fill"] = _timings("host: GrammarState.fill_bitmask (the mask, 262k vocab), per sequence and step", fills)
    result.timings["advance"] = _timings(
        "host: Scheduler._advance_grammar (accept + jump-forward + fill), per sequence and step", advances)
    for c, applies in applies_by_c.items():
        result.timings[f"apply_c{c}"] = _timings(
            f"backend: apply_token_bitmask, per step, {c} concurrent ({'one request at a time' if c == 1 else 'batched'})",
            applies)

    for c in concurrency:
        for jf in jump_forward:
            _set_jump_forward(con, jf)
            a = Stream(con, tok, work[c], max_tokens)
            b = Stream(unc, tok, work[c], max_tokens, lengths[c, jf])
            n = repeats * len(work[c])
            meter = ForeignCpuMeter()
            # one step each in turn, who goes first swapping every round (a step right after the
            # other engine's may find the caches colder); a side that is through keeps cycling
            # its workload, so that both are measured over the same stretch of time, until the
            # other is through too
            first, second = a, b
            while a.completed < n or b.completed < n:
                first.step()
                second.step()
                first, second = second, first
            foreign = meter.foreign_share()
            a.drop_in_flight()
            b.drop_in_flight()
            ph = Phase(c, jf, a.side, b.side, foreign)
            result.phases.append(ph)
            s = ph.summary()
            log(f"  {ph.key}: constrained {ph.constrained.tok_per_s:.1f} tok/s ({ph.constrained.ms_per_step:.1f} ms/step), "
                f"unconstrained {ph.unconstrained.tok_per_s:.1f} tok/s ({ph.unconstrained.ms_per_step:.1f} ms/step), "
                f"ratio {ph.rate_ratio:.3f}, per batch {_spread(s['batch_ratios'])}, others {_share(foreign)}")
    _set_jump_forward(con, True)
    machine["load_average_at_end"] = load_average()
    for m in (con_model, unc_model):
        close = getattr(m.engine.backend, "close", None)
        if close is not None:
            close()
    return result
