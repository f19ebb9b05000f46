"""JSON schemas for the grammar tests: nested objects, arrays, enums, anyOf, required and
optional properties, numbers with bounds. Every free-form part is bounded (maxLength,
maxItems, numeric ranges) so that even a model writing random tokens ends within max_tokens."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 12}

SCHEMAS: dict[str, dict] = {
    "flat_person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "nickname": NAME,
                       "email": {"type": "string", "maxLength": 20}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "enum_color": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "shade": {"enum": [1, 2, 3]}},
        "required": ["color", "shade"],
        "additionalProperties": False,
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_of_ints": {
        "type": "object",
        "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                                  "minItems": 1, "maxItems": 4}},
        "required": ["values"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                          "required": ["sku", "qty"], "additionalProperties": False},
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "any_of_scalar": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}, NAME]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "any_of_objects": {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}},
                     "required": ["kind", "r"], "additionalProperties": False},
                    {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 99}},
                     "required": ["kind", "side"], "additionalProperties": False},
                ]
            }
        },
        "required": ["shape"],
        "additionalProperties": False,
    },
    "bounded_number": {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -10, "maximum": 40},
                       "humidity": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["temperature", "humidity"],
        "additionalProperties": False,
    },
    "booleans_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "error": {"type": "null"}},
        "required": ["ok", "error"],
        "additionalProperties": False,
    },
    "const_and_enum": {
        "type": "object",
        "properties": {"version": {"const": "1.0"}, "level": {"enum": ["low", "mid", "high"]}},
        "required": ["version", "level"],
        "additionalProperties": False,
    },
    "string_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "deep_nesting": {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
            "c": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["c"], "additionalProperties": False}},
            "required": ["b"], "additionalProperties": False}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "tool_call_like": {
        "type": "object",
        "properties": {
            "name": {"enum": ["get_weather", "get_time"]},
            "arguments": {"type": "object", "properties": {"city": NAME, "unit": {"enum": ["c", "f"]}},
                          "required": ["city"], "additionalProperties": False},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
    "top_level_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 2,
        "maxItems": 3,
    },
    "matrix": {
        "type": "object",
        "properties": {"rows": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                                          "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "required": ["rows"],
        "additionalProperties": False,
    },
    "date_pattern": {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["date"],
        "additionalProperties": False,
    },
    "nullable_anyof": {
        "type": "object",
        "properties": {"manager": {"anyOf": [NAME, {"type": "null"}]}, "team_size": {"type": "integer", "minimum": 0, "maximum": 50}},
        "required": ["manager", "team_size"],
        "additionalProperties": False,
    },
    "exclusive_bounds": {
        "type": "object",
        "properties": {"score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score", "ratio"],
        "additionalProperties": False,
    },
    "mixed_required": {
        "type": "object",
        "properties": {
            "title": NAME,
            "done": {"type": "boolean"},
            "priority": {"enum": [1, 2, 3]},
            "notes": {"type": "array", "items": NAME, "maxItems": 2},
        },
        "required": ["title", "done"],
        "additionalProperties": False,
    },
    "single_enum_value": {
        "type": "object",
        "properties": {"status": {"enum": ["ok"]}, "code": {"type": "integer", "minimum": 200, "maximum": 299}},
        "required": ["status", "code"],
        "additionalProperties": False,
    },
}
