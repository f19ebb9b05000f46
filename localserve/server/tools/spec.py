"""What a request says about tools, API-neutral: the tools (ToolSpec), which may or must be
called (ToolChoice), and the calls a model made (ToolCall). The OpenAI shapes are read here;
other APIs (Anthropic) build ToolSpec and ToolChoice themselves and share everything else.

Every check raises InvalidRequestError (a 400 that says what is wrong)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from localserve.errors import InvalidRequestError

# OpenAI's rule for function names; Anthropic's is the same set with length 1..128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
CHOICE_MODES = ("auto", "none", "required", "function")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolSpec:
    """One function the model may call; `parameters` is the JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    @classmethod
    def checked(cls, name: Any, description: Any = None, parameters: Any = None, where: str = "tool") -> ToolSpec:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(
                f"{where}: the function name must be 1-128 letters, digits, '_', '.' or '-', got {name!r}")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"{where} ({name}): description must be a string")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        check_parameters_schema(parameters, f"{where} ({name})")
        return cls(name=name, description=description or "", parameters=parameters)

    def to_openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


def check_parameters_schema(schema: Any, where: str) -> None:
    """The arguments schema must be a valid JSON schema describing an object."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{where}: parameters must be a JSON schema object, got {type(schema).__name__}")
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise InvalidRequestError(f"{where}: parameters must describe an object (type 'object'), got type {kind!r}")
    try:
        import jsonschema
    except ImportError:  # the grammar compiler still rejects what it cannot follow
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path)
        raise InvalidRequestError(
            f"{where}: parameters is not a valid JSON schema: {e.message}" + (f" (at {at})" if at else "")) from None


@dataclass(slots=True)
class ToolChoice:
    """auto: the model decides; none: no calls; required: at least one call; function: a call
    of `name` (Anthropic's any / tool map to required / function)."""

    mode: str = "auto"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in CHOICE_MODES:
            raise InvalidRequestError(f"tool_choice must be one of {CHOICE_MODES[:3]} or a function, got {self.mode!r}")
        if (self.mode == "function") != (self.name is not None):
            raise InvalidRequestError("tool_choice: a function choice needs the function's name")

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object as JSON text, as the model wrote it

    def arguments_dict(self) -> dict[str, Any]:
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# -- the OpenAI shapes ---------------------------------------------------------------------------


def tools_from_openai(tools: list[Any] | None) -> list[ToolSpec]:
    """`tools` of a chat request: [{"type": "function", "function": {name, description, parameters}}]."""
    out: list[ToolSpec] = []
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"{where} must be an object")
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(f"{where}.type: only 'function' tools are supported, got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function must be an object with a name")
        out.append(ToolSpec.checked(fn.get("name"), fn.get("description"), fn.get("parameters"), where))
    names = [t.name for t in out]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidRequestError(f"tools: function names must be unique, {dup[0]!r} appears more than once")
    return out


def tool_choice_from_openai(choice: Any, tools: list[ToolSpec]) -> ToolChoice:
    """"auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}, checked
    against the tools. Without tools the default is "none", with tools "auto" (as OpenAI)."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequestError(f"tool_choice must be 'auto', 'none', 'required' or a function, got {choice!r}")
        result = ToolChoice(choice)
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise InvalidRequestError(
                "tool_choice as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
        result = ToolChoice("function", name)
    else:
        raise InvalidRequestError("tool_choice must be a string or an object")
    check_choice(result, tools)
    return result


def check_choice(choice: ToolChoice, tools: list[ToolSpec]) -> None:
    if choice.mode == "required" and not tools:
        raise InvalidRequestError("tool_choice is 'required' but the request has no tools")
    if choice.mode == "function" and choice.name not in {t.name for t in tools}:
        have = ", ".join(t.name for t in tools) or "none"
        raise InvalidRequestError(f"tool_choice names the function {choice.name!r}, which is not in tools (have: {have})")
