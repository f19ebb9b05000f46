"""How a model family writes tool calls, and which family a chat template belongs to.

Every format is `prefix CALL (separator CALL)* suffix`, CALL a JSON object
{"name": ..., "<args_key>": {...}}; the parser also reads "arguments" where the format says
"parameters" and the reverse, as fine-tunes mix them up.

* hermes (Qwen 2.5/3, Hermes, ChatML templates): <tool_call>\\n{...}\\n</tool_call>, one block per call
* llama3 (Llama 3.1+ JSON tool calling): the answer is {"name": ..., "parameters": {...}}; calls
  separated by "; "
* mistral: [TOOL_CALLS][{...}, {...}]
* generic (templates without tool support, e.g. the default Gemma 3 270M): a fenced block per
  call, ```tool_call\\n{...}\\n```, described to the model in a system instruction: fenced
  blocks are what small models have seen most.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    start: str  # marks the beginning of a call block in the output ("" for llama3: a leading "{")
    prefix: str  # forced text before the first call (start + what follows it)
    separator: str  # between two calls
    suffix: str  # after the last call
    args_key: str  # "arguments" or "parameters"
    list_form: bool = False  # mistral: the calls of a block are one JSON array
    end: str = ""  # closes one call's block (hermes, generic); "" when the separator/list does

    def render_call(self, name: str, arguments: str) -> str:
        """One call as JSON text (arguments is JSON text)."""
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{self.args_key}": {arguments}}}'

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        """The text the model would write for these (name, arguments JSON) calls."""
        return self.prefix + self.separator.join(self.render_call(n, a) for n, a in calls) + self.suffix


HERMES = ToolFormat("hermes", start="<tool_call>", prefix="<tool_call>\n", separator="\n</tool_call>\n<tool_call>\n",
                    suffix="\n</tool_call>", args_key="arguments", end="</tool_call>")
LLAMA3 = ToolFormat("llama3", start="", prefix="", separator="; ", suffix="", args_key="parameters")
MISTRAL = ToolFormat("mistral", start="[TOOL_CALLS]", prefix="[TOOL_CALLS][", separator=", ", suffix="]",
                     args_key="arguments", list_form=True)
GENERIC = ToolFormat("generic", start="```tool_call", prefix="```tool_call\n", separator="\n```\n```tool_call\n",
                     suffix="\n```", args_key="arguments", end="```")
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, GENERIC)}

_USES_TOOLS = re.compile(r"\btools\b")


def template_supports_tools(source: str) -> bool:
    """Templates that render `tools` (and so the tool turns) themselves."""
    return bool(_USES_TOOLS.search(source))


def format_for_template(source: str) -> ToolFormat:
    """The call format of a chat template's family; generic for templates without tools."""
    if not template_supports_tools(source):
        return GENERIC
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<tool_call>" in source:
        return HERMES
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and "parameters" in source):
        return LLAMA3
    return HERMES  # the most common format among tool-tuned open models
