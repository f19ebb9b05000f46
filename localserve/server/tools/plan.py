"""ToolPlan: what one request's tools mean for this model: how the prompt shows them, which
format the model answers in, the grammar that forces a call, and the parser of its output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from localserve.engine.guided import GuidedDecoding
from localserve.engine.sampling_params import SamplingParams
from localserve.errors import InvalidRequestError
from localserve.server.tools.formats import MISTRAL, ToolFormat, format_for_template, template_supports_tools
from localserve.server.tools.grammar import forced_calls_guided
from localserve.server.tools.parser import ToolCallParser
from localserve.server.tools.prompt import generic_messages, template_messages
from localserve.server.tools.spec import ToolChoice, ToolSpec, check_choice


@dataclass(slots=True)
class ToolPlan:
    tools: list[ToolSpec]
    choice: ToolChoice
    parallel: bool
    format: ToolFormat
    template_tools: bool  # the chat template renders the tools and tool turns itself
    guided: GuidedDecoding | None  # set when the choice forces a call

    @classmethod
    def build(cls, tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool, tokenizer: Any) -> ToolPlan:
        """Raises InvalidRequestError for a choice that does not fit the tools."""
        tools = list(tools)
        check_choice(choice, tools)
        template = getattr(tokenizer, "chat_template", None)
        source = getattr(template, "source", "") or ""
        fmt = format_for_template(source)
        plan = cls(tools=tools, choice=choice, parallel=parallel, format=fmt,
                   template_tools=template_supports_tools(source), guided=None)
        if choice.forced:
            plan.guided = forced_calls_guided(plan.callable_tools, fmt, parallel and choice.mode == "required")
        return plan

    @property
    def active(self) -> bool:
        """The model is shown tools and its output is read for calls."""
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def callable_tools(self) -> list[ToolSpec]:
        if self.choice.mode == "function":
            return [t for t in self.tools if t.name == self.choice.name]
        return self.tools if self.active else []

    def render(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **template_kwargs: Any) -> str:
        """The prompt text of the conversation (OpenAI-style message dicts with text content)."""
        if self.template_tools:
            tools = [t.to_openai() for t in self.tools] if self.active else None
            return tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=add_generation_prompt,
                                                 tools=tools, **template_kwargs)
        chat = generic_messages(messages, self.tools if self.active else [], self.choice, self.parallel)
        return tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, **template_kwargs)

    def adjust(self, params: SamplingParams) -> None:
        """Puts the forced-call grammar into the sampling parameters."""
        if self.guided is not None:
            if params.guided is not None:
                raise InvalidRequestError(
                    f"tool_choice {self.choice.mode!r} cannot be combined with a structured-output constraint "
                    "(response_format or guided_*): the tool call format is the constraint")
            params.guided = self.guided
        if self.active and self.format is MISTRAL:
            params.skip_special_tokens = False  # [TOOL_CALLS] is a special token in Mistral vocabularies

    def parser(self) -> ToolCallParser | None:
        """A parser for one choice's output; None when the output is plain content."""
        if not self.active:
            return None
        return ToolCallParser(self.format, [t.name for t in self.callable_tools], max_calls=0 if self.parallel else 1)
