"""GuidedDecoding: the structured-output constraint a request asks for (what, not how).

Exactly one of json_schema, json_object, regex, ebnf and choice is set. `validate()` checks
the spec's shape without compiling it (no xgrammar here); compile errors (an unsupported
schema keyword, a regex xgrammar cannot parse, an EBNF grammar with an undefined rule) are
raised by `localserve.engine.grammar` when the engine adds the request. Both raise
InvalidRequestError, which the server answers with a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from localserve.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "ebnf", "choice")


@dataclass(slots=True)
class GuidedDecoding:
    json_schema: str | dict[str, Any] | None = None  # a JSON Schema, as text or parsed
    json_object: bool = False  # any JSON object (OpenAI response_format json_object)
    regex: str | None = None
    ebnf: str | None = None  # an EBNF grammar (xgrammar/GBNF dialect), root rule `root`
    choice: list[str] | None = None  # the output is exactly one of these strings
    # JSON only: allow any whitespace between tokens. Off by default: the compact form
    # (", " and ": " separators) forces more text, which jump-forward inserts without a
    # forward pass, and small models cannot loop on whitespace.
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if _is_set(getattr(self, k)))

    def validate(self) -> None:
        given = [k for k in KINDS if _is_set(getattr(self, k))]
        if len(given) != 1:
            names = ", ".join(KINDS)
            raise InvalidRequestError(
                f"a structured-output constraint needs exactly one of {names}; got "
                + (", ".join(given) if given else "none")
            )
        kind = given[0]
        if kind == "json_schema":
            self.schema_dict()  # raises on text that is not a JSON object
        elif kind == "regex" and not isinstance(self.regex, str):
            raise InvalidRequestError("regex must be a string")
        elif kind == "ebnf" and not (isinstance(self.ebnf, str) and self.ebnf.strip()):
            raise InvalidRequestError("the EBNF grammar must be a non-empty string")
        elif kind == "choice":
            if not isinstance(self.choice, list) or not all(isinstance(c, str) for c in self.choice):
                raise InvalidRequestError("choice must be a list of strings")
            if not any(self.choice):
                raise InvalidRequestError("choice needs at least one non-empty string")

    def schema_dict(self) -> dict[str, Any] | bool:
        """The JSON schema parsed (a schema may be a bare boolean)."""
        schema = self.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(
                f"json_schema must be a JSON object, got {type(schema).__name__}"
            )
        return schema

    def cache_key(self) -> tuple:
        """Equal for specs that compile to the same grammar."""
        kind = self.kind
        if kind == "json_schema":
            value: Any = json.dumps(self.schema_dict(), sort_keys=True)
        elif kind == "choice":
            value = tuple(self.choice or ())
        else:
            value = getattr(self, kind)
        ws = self.any_whitespace if kind in ("json_schema", "json_object") else None
        return (kind, value, ws)


def _is_set(value: Any) -> bool:
    return value is not None and value is not False
