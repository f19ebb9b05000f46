"""JSON schemas rewritten so that their grammar bounds every run a model could loop in.

A small model under a JSON grammar can write digits or whitespace until max_tokens
(`"population": 4000000000…`), and the document never closes. `bounded_schema` returns a copy
of a schema in which:

* integers and numbers without a bound on a side get one (|x| <= 10**15, the range JSON
  numbers keep exactly in a double): xgrammar then compiles a range with at most 16 integer
  digits and 6 fraction digits instead of `[1-9][0-9]*`;
* free-form values (`{}`, `true`, an object without properties, an array without items,
  `additionalProperties: true`) become a reference to one bounded "any JSON value" definition
  instead of xgrammar's built-in `basic_any`, whose numbers are unbounded;
* strings with minLength/maxLength carry the equivalent pattern (see _length_pattern).

Whitespace runs are bounded where the grammar is compiled (MAX_WHITESPACE, for requests that
allow any whitespace). Strings keep their length: the token budget closes them
(localserve/engine/grammar_close.py).
"""

from __future__ import annotations

from typing import Any

MAX_WHITESPACE = 16  # longest whitespace run between JSON tokens: a newline and 15 of indent
NUMBER_LIMIT = 10**15  # |number| bound where a schema gives none; 16 integer digits at most
ANY_VALUE = "localserve_json_value"
_ANY_REF = {"$ref": f"#/$defs/{ANY_VALUE}"}

# keywords whose value is a schema, a list of schemas, or a name -> schema map
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_ANNOTATIONS = frozenset(("description", "title", "default", "examples", "$comment", "deprecated",
                          "readOnly", "writeOnly"))
_OBJECT_SHAPE = ("properties", "additionalProperties", "patternProperties", "propertyNames",
                 "unevaluatedProperties")

# a JSON string character: no quote, backslash or control character (RFC 8259); escapes
# are given up in length-bounded strings
_STRING_CHAR = r'[^"\\\x00-\x1f]'


def bounded_schema(schema: Any) -> Any:
    """A copy of `schema` whose grammar has no unbounded digit run (see the module doc)."""
    used: list[bool] = []
    out = _bound(schema, used)
    if not used:
        return out
    if out is True:
        out = dict(_ANY_REF)
    defs = dict(out.get("$defs") or {})
    defs[ANY_VALUE] = any_value_schema()
    return {**out, "$defs": defs}


def any_value_schema() -> dict:
    """Any JSON value, numbers bounded; arrays and objects hold the same again."""
    return {"anyOf": [
        {"type": "string"},
        {"type": "number", "minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": dict(_ANY_REF)},
        {"type": "object", "additionalProperties": dict(_ANY_REF)},
    ]}


def _bound(schema: Any, used: list[bool]) -> Any:
    if schema is True or (isinstance(schema, dict) and not (schema.keys() - _ANNOTATIONS)):
        used.append(True)
        return dict(_ANY_REF)
    if not isinstance(schema, dict):
        return schema  # false, or something xgrammar reports as invalid
    out = dict(schema)
    for k in _ONE:
        v = out.get(k)
        if isinstance(v, list):  # draft-4 tuple items
            out[k] = [_bound(s, used) for s in v]
        elif v is not None and v is not False:
            out[k] = _bound(v, used)
    for k in _LIST:
        if isinstance(out.get(k), list):
            out[k] = [_bound(s, used) for s in out[k]]
    for k in _MAP:
        if isinstance(out.get(k), dict):
            out[k] = {name: _bound(s, used) for name, s in out[k].items()}
    kind = out.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if kind == "object" and not any(k in out for k in _OBJECT_SHAPE):
        used.append(True)
        out["additionalProperties"] = dict(_ANY_REF)
    elif kind == "array" and "items" not in out and "prefixItems" not in out:
        used.append(True)
        out["items"] = dict(_ANY_REF)
    if kinds & {"integer", "number"} and not out.keys() & {"enum", "const"}:
        _bound_range(out)
    if kind == "string":
        _length_pattern(out)
    return out


def _bound_range(out: dict) -> None:
    """Adds the bound a side lacks; a bound the schema gives beyond the limit stays."""
    if "minimum" not in out and "exclusiveMinimum" not in out:
        top = out.get("maximum", out.get("exclusiveMaximum"))
        if not isinstance(top, (int, float)) or top > -NUMBER_LIMIT:
            out["minimum"] = -NUMBER_LIMIT
    if "maximum" not in out and "exclusiveMaximum" not in out:
        low = out.get("minimum", out.get("exclusiveMinimum"))
        if not isinstance(low, (int, float)) or low < NUMBER_LIMIT:
            out["maximum"] = NUMBER_LIMIT


def _length_pattern(out: dict) -> None:
    """A string with minLength/maxLength (and no pattern, format, enum or const) gets the
    equivalent pattern. xgrammar compiles such strings to `[^"\\\r\n]{m,n}`, which lets raw
    control characters in and so yields invalid JSON."""
    bounded = "minLength" in out or "maxLength" in out
    if not bounded or out.keys() & {"pattern", "format", "enum", "const"}:
        return
    lo, hi = out.get("minLength", 0), out.get("maxLength", "")
    if isinstance(lo, int) and (hi == "" or isinstance(hi, int)):
        out["pattern"] = f"^{_STRING_CHAR}{{{lo},{hi}}}$"
        out.pop("minLength", None)  # xgrammar ignores them next to a pattern
        out.pop("maxLength", None)
