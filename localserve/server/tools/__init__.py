"""Tool calling, API-neutral: the OpenAI and Anthropic adapters both build a ToolPlan from
ToolSpec / ToolChoice, render the prompt with it, constrain forced calls with its grammar and
read the output with its ToolCallParser."""

from localserve.server.tools.formats import FORMATS, GENERIC, HERMES, LLAMA3, MISTRAL, ToolFormat, format_for_template
from localserve.server.tools.grammar import forced_calls_ebnf
from localserve.server.tools.output import OutputParser, ReasoningDelta
from localserve.server.tools.parser import ArgsDelta, CallStart, Event, TextDelta, ToolCallParser
from localserve.server.tools.plan import ToolPlan
from localserve.server.tools.spec import (
    ToolCall,
    ToolChoice,
    ToolSpec,
    new_call_id,
    tool_choice_from_openai,
    tools_from_openai,
)

__all__ = [
    "FORMATS", "GENERIC", "HERMES", "LLAMA3", "MISTRAL", "ArgsDelta", "CallStart", "Event", "OutputParser",
    "ReasoningDelta", "TextDelta", "ToolCall", "ToolCallParser", "ToolChoice", "ToolFormat", "ToolPlan", "ToolSpec",
    "format_for_template", "forced_calls_ebnf", "new_call_id", "tool_choice_from_openai", "tools_from_openai",
]
