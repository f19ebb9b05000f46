"""Jinja chat templates rendered the way transformers' `apply_chat_template` renders them.

Same environment (sandboxed, trim_blocks, lstrip_blocks, loopcontrols), same globals
(`raise_exception`, `strftime_now`), same `tojson` (no HTML escaping, `indent`/`separators`/
`sort_keys`), same variables (`messages`, `tools`, `add_generation_prompt`, the special-token
strings such as `bos_token`), and message keys whose value is None are dropped first, as
OpenAI-style clients send `content: null` that most templates would print as "None".

A file without a template gets a family fallback from `templates/` chosen by architecture.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Container, Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localserve.errors import InvalidRequestError

FALLBACK_TEMPLATES = ("gemma3", "llama3", "chatml", "mistral")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Plain JSON-like data only, so the sandbox never sees objects with dangerous methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # subclasses (str/int enums, numpy scalars) are cut back to the base type and its methods
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # a numpy scalar such as np.bool_
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic / msgspec-like request models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One compiled template plus the special-token strings it may refer to."""

    __slots__ = ("source", "name", "special_tokens", "_template", "_folds_system")

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None, name: str = "") -> None:
        self.source = source
        self.name = name  # "" for a template from the model file, else the fallback's name
        self._folds_system: bool | None = None
        # e.g. {"bos_token": "<bos>", "eos_token": "<eos>"}: templates write {{ bos_token }}
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not compile: {e}") from e

    @classmethod
    def builtin(cls, name: str, special_tokens: Mapping[str, str | None] | None = None) -> ChatTemplate:
        return cls(load_builtin_template(name), special_tokens, name=name)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text. A conversation the template rejects (raise_exception, e.g. roles that
        do not alternate) raises InvalidRequestError: it is the client's input that is wrong."""
        chat = []
        for m in map(_plain, messages):
            if not isinstance(m, dict) or "role" not in m:
                raise InvalidRequestError("every message must be an object with a 'role'")
            chat.append({k: v for k, v in m.items() if v is not None})
        variables = {**self.special_tokens, **_plain(kwargs)}
        tools = _plain(list(tools)) if tools is not None else None
        if _late_system_turns(chat):
            chat = self._place_system_turns(chat, add_generation_prompt, tools, variables)
        try:
            return self._render(chat, add_generation_prompt, tools, variables)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"chat template: {e.message or e}") from e

    def _render(self, chat: list[dict[str, Any]], add_generation_prompt: bool, tools: list | None,
                variables: Mapping[str, Any]) -> str:
        return self._template.render(messages=chat, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)

    def _place_system_turns(self, chat: list[dict[str, Any]], add_generation_prompt: bool, tools: list | None,
                            variables: Mapping[str, Any]) -> list[dict[str, Any]]:
        """System turns after the first message (agents send them mid-conversation) stay where
        they are when the template gives system text a turn of its own and renders them there;
        otherwise they are folded into the neighbouring user turn, which is where a template
        such as Gemma's puts system text."""
        if self.folds_system_into_user:
            return fold_system_turns(chat)
        try:
            text = self._render(chat, add_generation_prompt, tools, variables)
        except jinja2.exceptions.TemplateError:
            return fold_system_turns(chat)
        if all(_text(m.get("content")).strip() in text for m in _late_system_turns(chat)):
            return chat
        return fold_system_turns(chat)  # the template dropped them

    @property
    def folds_system_into_user(self) -> bool:
        """True when the template writes a leading system message as the start of the first
        user turn (Gemma, Mistral's early templates) instead of a turn of its own."""
        if self._folds_system is None:
            system, user = "localserve-system-probe", "localserve-user-probe"
            try:
                folded = self._render([{"role": "user", "content": f"{system}\n\n{user}"}], True, None,
                                      self.special_tokens)
                given = self._render([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                     True, None, self.special_tokens)
                self._folds_system = folded == given
            except jinja2.exceptions.TemplateError:
                self._folds_system = False
        return self._folds_system


def _late_system_turns(chat: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [m for m in chat[1:] if m.get("role") == "system"]


def _text(content: Any) -> str:
    """A message's content as text (a list of text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return ""


def fold_system_turns(chat: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every system turn after the first message joins the user turn before it (appended) or,
    when an assistant turn precedes it, the user turn after it (prepended); with no user turn
    beside it, it becomes a user turn of its own. The text keeps its place in the prompt."""
    out: list[dict[str, Any]] = [dict(m) for m in chat[:1]]
    pending: list[str] = []  # system text waiting for the next user turn
    joined = False  # out[-1] is a user turn that system text was appended to
    for m in chat[1:]:
        role, text = m.get("role"), _text(m.get("content"))
        if role == "system":
            if out and out[-1].get("role") == "user" and not pending:
                out[-1]["content"] = _join(_text(out[-1].get("content")), text)
                joined = True
            else:
                pending.append(text)
            continue
        m = dict(m)
        if joined and role == "user":  # the two user turns the system turn stood between
            out[-1]["content"] = _join(_text(out[-1].get("content")), _text(m.get("content")))
            joined = False
            continue
        joined = False
        if pending and role == "user":
            m["content"] = _join(*pending, _text(m.get("content")))
        elif pending:
            out.append({"role": "user", "content": _join(*pending)})
        pending = []
        out.append(m)
    if pending:
        out.append({"role": "user", "content": _join(*pending)})
    return out


def _join(*texts: str) -> str:
    return "\n\n".join(t for t in texts if t)


def load_builtin_template(name: str) -> str:
    if name not in FALLBACK_TEMPLATES:
        raise KeyError(f"no built-in chat template {name!r}; have {FALLBACK_TEMPLATES}")
    return resources.files("localserve.models").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def fallback_template_name(architecture: str, vocab: Container[str] = ()) -> str:
    """The family template for a model whose file carries none.

    The architecture decides where it is unambiguous; "llama" covers Llama 2/3 and many
    fine-tunes, so its vocabulary's marker tokens decide there.
    """
    arch = architecture.lower()
    if arch.startswith("gemma"):
        return "gemma3"
    if arch.startswith("qwen"):
        return "chatml"
    if "<|start_header_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab:
        return "chatml"
    if arch == "mistral" or "[INST]" in vocab:
        return "mistral"
    if arch == "llama":
        return "llama3"
    return "chatml"
