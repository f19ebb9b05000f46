"""The grammar that forces tool calls (tool_choice required or a named function): the
format's `prefix CALL (separator CALL)* suffix`, CALL the JSON object
{"name": <one of the tools>, "<args_key>": <arguments per the tool's schema>}, as an EBNF
grammar for the engine (GuidedDecoding(ebnf=...)), so the output always parses.

xgrammar builds the JSON part from the schemas (Grammar.from_json_schema / union / concat,
which keep the rule names of the pieces apart); it is imported here only when a forced call
is asked for. Digit runs are bounded (engine/schema_bounds.py); whitespace is the compact
form, so nothing in the grammar loops but strings, which the engine closes within max_tokens.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from localserve.engine.guided import GuidedDecoding
from localserve.engine.schema_bounds import bounded_schema
from localserve.errors import InvalidRequestError
from localserve.server.tools.formats import ToolFormat
from localserve.server.tools.spec import ToolSpec

_CALL_RULE = "tool_call_object"
# forced parallel calls stop after this many: a small model under greedy decoding may repeat
# the same call until max_tokens, and a bounded run at least ends in a complete answer
MAX_FORCED_CALLS = 16


def call_schema(tool: ToolSpec, args_key: str) -> dict[str, Any]:
    """The JSON schema of one call of `tool`, its runs bounded (engine/schema_bounds.py). The
    parameters' own definitions move to the root, where their `#/$defs/...` references
    point once the parameters sit under a property."""
    params = dict(tool.parameters) if isinstance(tool.parameters, dict) else tool.parameters
    defs = {k: params.pop(k) for k in ("$defs", "definitions") if isinstance(params, dict) and k in params}
    return bounded_schema({
        "type": "object",
        "properties": {"name": {"const": tool.name}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
        **defs,
    })


def forced_calls_ebnf(tools: Sequence[ToolSpec], fmt: ToolFormat, parallel: bool) -> str:
    """EBNF text: one call of one of `tools` (several with `parallel`), in `fmt`."""
    if not tools:
        raise InvalidRequestError("a forced tool call needs at least one tool")
    import xgrammar as xgr

    grammars = []
    for tool in tools:
        try:
            grammars.append(xgr.Grammar.from_json_schema(json.dumps(call_schema(tool, fmt.args_key)),
                                                         any_whitespace=False, strict_mode=True))
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"tool {tool.name!r}: its parameters schema cannot be followed: "
                                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    # concat() wraps its argument under a fresh `root` that nothing else refers to: renaming
    # that one definition gives a rule our own root can repeat
    calls = xgr.Grammar.concat(xgr.Grammar.union(*grammars) if len(grammars) > 1 else grammars[0])
    text = str(calls)
    head = "root ::= "
    assert text.startswith(head), text[:80]
    body = f"{_CALL_RULE} ::= " + text[len(head):]
    more = f" ({_literal(fmt.separator)} {_CALL_RULE}){{0,{MAX_FORCED_CALLS - 1}}}" if parallel else ""
    parts = [_literal(fmt.prefix) if fmt.prefix else "", _CALL_RULE + more, _literal(fmt.suffix) if fmt.suffix else ""]
    return "root ::= " + " ".join(p for p in parts if p) + "\n" + body


def forced_calls_guided(tools: Sequence[ToolSpec], fmt: ToolFormat, parallel: bool) -> GuidedDecoding:
    return GuidedDecoding(ebnf=forced_calls_ebnf(tools, fmt, parallel))


def _literal(text: str) -> str:
    """An EBNF string literal (JSON's escapes are the EBNF ones)."""
    return json.dumps(text, ensure_ascii=False)
