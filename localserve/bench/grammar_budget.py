"""Structured output under a token budget (issue 14): `localserve bench --grammar-budget`.

Starts `localserve up` (or uses --url) and sends, through the `openai` SDK, every JSON schema of
budget_schemas.SCHEMAS as response_format json_schema, `json_object`, and every forced tool
call of TOOL_CASES, at each max_tokens and temperature, with fixed seeds. Each answer is
checked: JSON outputs must parse and validate against their schema (`jsonschema`); a forced
call's answer must hold tool calls whose arguments parse and validate against the tool's
parameters, and no content (a cut call's text must never leak into it). The table counts,
per kind, budget and temperature, the answers that parse, that validate, that the budget ended
(finish_reason length: closed by the grammar, not by the model) and the leaks.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

from localserve.bench.budget_schemas import SCHEMAS, TOOL_CASES, TOOLS

Log = Callable[[str], None]
MODEL = ""  # the served model


@dataclass(slots=True)
class Answer:
    kind: str  # json_schema | json_object | tool_call
    name: str
    max_tokens: int
    temperature: float
    seed: int
    finish_reason: str | None = None
    completion_tokens: int = 0
    parsed: bool = False
    valid: bool = False
    leaked: bool = False  # a forced call's answer had content
    error: str = ""
    text: str = ""


@dataclass(slots=True)
class BudgetBenchResult:
    model: str
    threads: int
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0
    date: str = ""

    def rows(self) -> list[tuple[tuple[str, int, float], list[Answer]]]:
        groups: dict[tuple[str, int, float], list[Answer]] = {}
        for a in self.answers:
            kind = "tool call" if a.kind == "tool_call" else "JSON"
            groups.setdefault((kind, a.max_tokens, a.temperature), []).append(a)
        return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2]))

    def table(self) -> str:
        lines = ["| output | max_tokens | temperature | answers | parse | validate | ended by the budget "
                 "| over max_tokens | content leaks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (kind, mt, temp), ans in self.rows():
            lines.append(f"| {kind} | {mt} | {temp:g} | {len(ans)} | {_count(ans, 'parsed')} | {_count(ans, 'valid')} "
                         f"| {sum(a.finish_reason == 'length' for a in ans)} "
                         f"| {sum(a.completion_tokens > a.max_tokens for a in ans)} | {_count(ans, 'leaked')} |")
        a = self.answers
        lines.append(f"| **all** | | | **{len(a)}** | **{_count(a, 'parsed')}** | **{_count(a, 'valid')}** "
                     f"| **{sum(x.finish_reason == 'length' for x in a)}** "
                     f"| **{sum(x.completion_tokens > x.max_tokens for x in a)}** | **{_count(a, 'leaked')}** |")
        n_json = len(SCHEMAS) + 1
        lines += ["", f"{self.model}, {self.threads} threads; {n_json} JSON outputs ({len(SCHEMAS)} schemas and "
                  f"json_object) and {len(TOOL_CASES)} forced tool calls per row; {self.seconds:.0f} s, {self.date}."]
        bad = [x for x in a if not x.valid or x.leaked]
        for x in bad[:10]:
            lines.append(f"- failed: {x.kind} {x.name} max_tokens={x.max_tokens} t={x.temperature} "
                         f"seed={x.seed}: {x.error} {x.text[:160]!r}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "threads": self.threads, "seconds": self.seconds, "date": self.date,
                "answers": [asdict(a) for a in self.answers]}


def _count(answers: list[Answer], what: str) -> int:
    return sum(getattr(a, what) for a in answers)


def _json_answer(client, a: Answer) -> Answer:
    import jsonschema

    if a.kind == "json_object":
        prompt, schema, fmt = "Describe the planet Mars as a JSON object.", {"type": "object"}, {"type": "json_object"}
    else:
        prompt, schema = SCHEMAS[a.name]
        fmt = {"type": "json_schema", "json_schema": {"name": a.name, "schema": schema}}
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                         max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                                         response_format=fmt)
    choice = res.choices[0]
    a.finish_reason, a.completion_tokens, a.text = choice.finish_reason, res.usage.completion_tokens, \
        choice.message.content or ""
    value = json.loads(a.text)
    a.parsed = True
    jsonschema.validate(value, schema)
    a.valid = True
    return a


def _tool_answer(client, a: Answer) -> Answer:
    import jsonschema

    prompt, choice_, parallel = TOOL_CASES[a.name]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                                         tool_choice=choice_, parallel_tool_calls=parallel, max_tokens=a.max_tokens,
                                         temperature=a.temperature, seed=a.seed)
    choice = res.choices[0]
    msg = choice.message
    a.finish_reason, a.completion_tokens = choice.finish_reason, res.usage.completion_tokens
    a.leaked = msg.content is not None
    calls = msg.tool_calls or []
    a.text = json.dumps([[c.function.name, c.function.arguments] for c in calls]) + (msg.content or "")
    if not calls:
        raise ValueError("no tool call")
    args = [json.loads(c.function.arguments) for c in calls]
    a.parsed = True
    for c, value in zip(calls, args):
        jsonschema.validate(value, params[c.function.name])
    a.valid = not a.leaked
    return a


def _ask(client, a: Answer) -> Answer:
    try:
        return (_tool_answer if a.kind == "tool_call" else _json_answer)(client, a)
    except Exception as e:  # noqa: BLE001 (every failure is a counted answer)
        a.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return a


def plan_answers(budgets: tuple[int, ...], temperatures: tuple[float, ...], seeds: tuple[int, ...]) -> list[Answer]:
    """Every (case, max_tokens, temperature, seed); the seed differs per case so that the
    temperatures do not share draws."""
    cases = [("json_schema", n) for n in SCHEMAS] + [("json_object", "json_object")] + \
        [("tool_call", n) for n in TOOL_CASES]
    return [Answer(kind, name, mt, temp, seed * 1000 + i)
            for mt in budgets for temp in temperatures for seed in seeds for i, (kind, name) in enumerate(cases)]


def run_budget_bench(model: str | None = None, threads: int = 2, backend: str = "cpu",
                     budgets: tuple[int, ...] = (32, 64, 128, 200), temperatures: tuple[float, ...] = (1.0, 0.7),
                     seeds: tuple[int, ...] = (1,), concurrency: int = 4, url: str | None = None,
                     log: Log = print) -> BudgetBenchResult:
    from openai import OpenAI

    from localserve.bench.serving import ServerProcess

    server = None
    if url is None:
        log(f"starting localserve up {model or '(the default model)'} ({backend}, {threads} threads)")
        server = ServerProcess(model, backend, threads)
        url = server.url
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    answers = plan_answers(budgets, temperatures, seeds)
    result = BudgetBenchResult(model or "default (gemma3:270m Q4_K_M)", threads,
                               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    log(f"{len(answers)} requests, {concurrency} at a time")
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for i, a in enumerate(pool.map(lambda a: _ask(client, a), answers), 1):
                result.answers.append(a)
                if not a.valid or a.leaked:
                    log(f"  FAILED {a.kind} {a.name} max_tokens={a.max_tokens} t={a.temperature}: {a.error}")
                if i % 25 == 0:
                    log(f"  {i}/{len(answers)} done, {_count(result.answers, 'valid')} valid")
    finally:
        if server is not None:
            server.stop()
    result.seconds = time.monotonic() - t0
    return result
