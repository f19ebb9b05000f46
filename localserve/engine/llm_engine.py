"""LLMEngine: the step loop over a Scheduler and a Backend.

Synchronous core (every backend):

    plan = scheduler.schedule()
    out = backend.execute(plan)
    events = scheduler.update(plan, out)
    deltas = detokenize(events)

Overlap scheduling (backends with `execute_async`, EngineConfig.async_scheduling): step N+1 is
planned and submitted before step N's ids reach the host, so the host's schedule, update and
detokenize run while the device computes. In the steady state N and N+1 are in flight when
a step begins:

    out_N = handle_N.result()         # the one device-to-host copy
    events = update(N, out_N)
    submit(N+2 = schedule())          # decode rows of step N+1's sequences: placeholder ids
    deltas = detokenize(events)       # after the submit: off the path from N's end to N+2

The device runs N+1 from the end of N, so the host's work between the two (its critical path)
is update + schedule + submit; detokenizing and the caller's handling of the deltas overlap
N+1 too. At most one step is in flight past the one being applied. The engine falls back to the
synchronous order for a step whose sampled rows need their token on the host before the next
plan (grammar masks, penalties): see Scheduler.can_overlap.

Thread-safety: `add_request`, `abort` and the two scheduler halves of `step` hold one lock;
`backend.execute` runs outside it, so an abort frees the request's pages at once even while
a step is in flight (update then skips the aborted sequence).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from localserve import envs
from localserve.engine.backend import Backend
from localserve.engine.detokenizer import IncrementalDetokenizer
from localserve.engine.outputs import EngineStats, SeqDelta, TokenLogprob
from localserve.engine.request import Request, RequestStatus
from localserve.engine.sampling_params import SamplingParams
from localserve.engine.scheduler import Scheduler, SchedulerConfig, TokenEvent
from localserve.errors import ContextOverflowError, InvalidRequestError, KVCapacityError
from localserve.models.config import ModelConfig

_RUNNING, _WAITING = RequestStatus.RUNNING, RequestStatus.WAITING


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: as many as the backend says fit
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_context: int | None = None  # None: the model's context
    enable_prefix_cache: bool = True
    enable_jump_forward: bool = True  # see SchedulerConfig
    # overlap scheduling: None = on when the backend has execute_async; env
    # LOCALSERVE_ASYNC_SCHEDULING=0/1 overrides (1 still needs the backend's support)
    async_scheduling: bool | None = None


def _async_scheduling(cfg: EngineConfig, backend: Backend) -> bool:
    supported = callable(getattr(backend, "execute_async", None))
    forced = envs.ASYNC_SCHEDULING.get()  # None: auto
    if forced is not None:
        return forced and supported
    return supported and cfg.async_scheduling is not False


def eos_token_ids(model_config: ModelConfig, tokenizer: Any | None) -> frozenset[int]:
    """The tokens that end a sequence: the model's and the tokenizer's."""
    eos = set(model_config.eos_token_ids)
    if tokenizer is not None:
        eos |= set(tokenizer.eos_token_ids)
    return frozenset(eos)


def check_prompt(num_prompt_tokens: int, params: SamplingParams, max_context: int) -> None:
    """Raises the typed errors the server turns into 400s; never truncates."""
    if num_prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty")
    if num_prompt_tokens >= max_context:
        raise ContextOverflowError(num_prompt_tokens, max_context)
    if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > max_context:
        raise ContextOverflowError(
            num_prompt_tokens + params.max_tokens,
            max_context,
            what=f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({params.max_tokens})",
        )


class LLMEngine:
    def __init__(
        self,
        backend: Backend,
        model_config: ModelConfig,
        tokenizer: Any | None,
        cfg: EngineConfig | None = None,
    ) -> None:
        self.cfg = cfg = cfg or EngineConfig()
        self.backend = backend
        self.model_config = model_config
        self.tokenizer = tokenizer
        num_blocks = cfg.num_blocks or backend.kv_capacity(cfg.block_size)
        # one sequence must always fit in the pool on its own, or it could never finish: the
        # context is capped by the KV capacity as well as by the model; a context asked for
        # that the pool cannot hold is an error at start-up, not a surprise later
        pool_tokens = num_blocks * cfg.block_size
        if cfg.max_context is not None and min(cfg.max_context, model_config.max_context) > pool_tokens:
            raise KVCapacityError(
                f"the KV pool holds {pool_tokens} tokens ({num_blocks} pages of {cfg.block_size}), less than one "
                f"sequence of the context asked for ({cfg.max_context} tokens): lower the context (--ctx) or "
                "give the KV pages more memory (--kv-memory)")
        max_context = min(cfg.max_context or model_config.max_context, model_config.max_context, pool_tokens)
        backend.init_kv(num_blocks, cfg.block_size)
        self.eos_token_ids = eos_token_ids(model_config, tokenizer)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_context=max_context,
                block_size=cfg.block_size,
                num_blocks=num_blocks,
                enable_prefix_cache=cfg.enable_prefix_cache,
                enable_jump_forward=cfg.enable_jump_forward,
            ),
            eos_token_ids=self.eos_token_ids,
        )
        self.max_context = max_context
        self._lock = threading.RLock()
        self._seq_ids = itertools.count()
        self._requests: dict[str, list[Request]] = {}
        self._detok: dict[int, IncrementalDetokenizer | None] = {}
        self._grammar: Any = None  # localserve.engine.grammar.TokenizerGrammar, on first use
        # overlap scheduling; may be switched between steps when nothing is in flight
        self.async_scheduling = _async_scheduling(cfg, backend)
        self._inflight: list[tuple[Any, Any]] = []  # (plan, handle) submitted, not applied
        # submit before detokenizing (LOCALSERVE_EARLY_SUBMIT=0: at the next step's start)
        self._early_submit = envs.EARLY_SUBMIT.get()

    # -- requests -------------------------------------------------------------------------
    def check_prompt(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        check_prompt(num_prompt_tokens, params, self.max_context)

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        prompt = list(prompt_token_ids)
        self.check_prompt(len(prompt), params)
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        compiled = self._compile_grammar(params) if params.guided is not None else None
        request_id = request_id or uuid.uuid4().hex
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        with self._lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"request id {request_id!r} is already running")
            seqs: list[Request] = []
            for i in range(params.n):
                req = Request(
                    request_id=request_id,
                    seq_id=next(self._seq_ids),
                    prompt_token_ids=prompt,
                    params=params,
                    seed=_choice_seed(base_seed, i),
                    index=i,
                    # forks wait for the first choice's prompt, then share its pages
                    wait_for=seqs[0] if i > 0 else None,
                )
                if compiled is not None:
                    req.grammar = self._grammar.new_state(compiled)
                seqs.append(req)
                self._detok[req.seq_id] = self._make_detokenizer(req)
                self.scheduler.add(req)
            self._requests[request_id] = seqs
        return request_id

    def _compile_grammar(self, params: SamplingParams) -> Any:
        """The compiled grammar of params.guided (xgrammar loads on the first one; the
        compiler caches repeated specs). InvalidRequestError names what is wrong with it."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured output needs a model with a tokenizer")
        if self._grammar is None:
            from localserve.engine.grammar import tokenizer_grammar

            self._grammar = tokenizer_grammar(
                self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids)
            )
        return self._grammar.compile(params.guided)

    def _make_detokenizer(self, req: Request) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, req.params, prompt_token_ids=req.prompt_token_ids)

    def abort(self, request_id: str) -> None:
        with self._lock:
            for req in self._requests.pop(request_id, []):
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                self._detok.pop(req.seq_id, None)

    def request_ids(self) -> list[str]:
        """The requests added and not yet finished or aborted."""
        with self._lock:
            return list(self._requests)

    def has_unfinished(self) -> bool:
        return bool(self._inflight) or self.scheduler.has_unfinished()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[SeqDelta]:
        if self.async_scheduling or self._inflight:
            return self._step_overlapped()
        with self._lock:
            plan = self.scheduler.schedule()
        if plan is None:
            return []
        try:
            out = self.backend.execute(plan)
        except BaseException:
            self._discard_inflight()
            raise
        with self._lock:
            events = self.scheduler.update(plan, out)
            return self._deltas(events)

    def _step_overlapped(self) -> list[SeqDelta]:
        """Applies the oldest step in flight, after making sure the next is in flight too
        when it can be planned now; then submits the one after it before detokenizing."""
        with self._lock:
            try:
                if not self._inflight and not self._submit():
                    return []
                if len(self._inflight) == 1 and self._can_submit():
                    self._submit()
                plan, handle = self._inflight[0]
                out = handle.result()
            except BaseException:
                self._discard_inflight()
                raise
            self._inflight.pop(0)
            events = self.scheduler.update(plan, out)
            try:
                if self._early_submit and len(self._inflight) == 1 and self._can_submit():
                    self._submit()
            except BaseException:
                self._discard_inflight()
                raise
            return self._deltas(events)

    def _can_submit(self) -> bool:
        return self.async_scheduling and self.scheduler.can_overlap()

    def _submit(self) -> bool:
        """Plans the next step and launches it; False when there is nothing to run."""
        plan = self.scheduler.schedule()
        if plan is None:
            return False
        self._inflight.append((plan, None))  # discarded as in flight if the launch fails
        self._inflight[-1] = (plan, self.backend.execute_async(plan))
        return True

    def _discard_inflight(self) -> None:
        """After a failed step: drops every step in flight (the caller fails the requests)."""
        with self._lock:
            self._inflight = []
            self.scheduler.discard_inflight()

    def _deltas(self, events: list[TokenEvent]) -> list[SeqDelta]:
        deltas: list[SeqDelta] = []
        retired: list[Request] = []
        requests, detoks = self._requests, self._detok
        for ev in events:  # per row per step: kept lean (positional SeqDelta, no properties)
            req = ev.request
            if req.request_id not in requests:
                continue
            token_ids = ev.token_ids
            text = ""
            det = detoks.get(req.seq_id) if detoks else None
            if det is not None:
                text, token_ids = self._detokenize(req, det, token_ids)
            lp = None
            if ev.logprob is not None and req.params.logprobs:
                lp = [TokenLogprob(ev.token_id, ev.logprob, ev.top or [])]
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            status = req.status
            finish = None if status is _RUNNING or status is _WAITING else status.value
            cached = req.num_cached_tokens
            deltas.append(SeqDelta(req.request_id, req.index, token_ids, text, lp, finish,
                                   req.stop_reason, len(req.prompt_token_ids),
                                   cached if cached > 0 else 0, len(req.output_token_ids)))
            if finish is not None:
                retired.append(req)
        # after the loop: retiring the last choice of a request drops it from _requests, which
        # would hide its siblings' events of this same step
        for req in retired:
            self._retire(req)
        return deltas

    def _detokenize(self, req: Request, det: IncrementalDetokenizer,
                    token_ids: list[int]) -> tuple[str, list[int]]:
        """The text the step's tokens add, and the tokens kept: a stop string ends req (its
        tokens after it in a jump-forward run are dropped)."""
        text = ""
        for i, tok in enumerate(token_ids):
            res = det.feed(tok)
            text += res.text_delta
            if res.stopped:
                break
        if res.stopped:
            if len(token_ids) > i + 1:
                # a stop string inside jump-forward tokens: drop the ones after it
                del req.output_token_ids[i + 1 - len(token_ids):]
                token_ids = token_ids[: i + 1]
            if not req.finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            elif isinstance(res.stop_reason, str):
                # a stop string completed on the very token that hit max_tokens
                req.status = RequestStatus.FINISHED_STOPPED
            if res.stop_reason is not None:
                req.stop_reason = res.stop_reason
        elif req.finished:
            text += det.flush()
        return text, token_ids

    def _retire(self, req: Request) -> None:
        self._detok.pop(req.seq_id, None)
        seqs = self._requests.get(req.request_id)
        if seqs is not None and all(s.finished for s in seqs):
            del self._requests[req.request_id]

    # -- convenience ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]):
        """Runs prompts to completion; returns per prompt the list of n finished Requests."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        seqs = {rid: list(self._requests[rid]) for rid in ids}
        while self.has_unfinished():
            self.step()
        return [seqs[rid] for rid in ids]

    def check_integrity(self) -> None:
        with self._lock:
            self.scheduler.check_integrity()

    def reset_prefix_cache(self) -> None:
        """Drops every cached page no running request holds (vLLM's reset_prefix_cache)."""
        with self._lock:
            self.scheduler.kv.tree.reset()

    def stats(self) -> EngineStats:
        with self._lock:
            sched = self.scheduler
            kv = sched.kv
            free = kv.pool.num_free
            evictable = kv.tree.evictable_pages()
            return EngineStats(
                num_running=len(sched.running),
                num_waiting=len(sched.waiting),
                kv_pages_used=kv.num_blocks - free - evictable,
                kv_pages_cached=evictable,
                kv_pages_total=kv.num_blocks,
                prefix_hit_tokens=kv.prefix_hit_tokens,
                prefix_query_tokens=kv.prefix_query_tokens,
                num_preemptions=sched.num_preemptions,
            )


def _choice_seed(seed: int, index: int) -> int:
    if index == 0:
        return seed
    # splitmix64 of (seed, index): distinct, reproducible streams per choice
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x3FFFFFFFFFFFFFFF
