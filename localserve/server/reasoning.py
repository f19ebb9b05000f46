"""The reasoning split for models that think in <think>...</think> (Qwen3, DeepSeek-R1,
QwQ): the thinking goes to `reasoning_content`, the rest to `content`.

Only templates that use the tags get a parser. Thinking counts only at the start of the
output (after whitespace), or from the start when the prompt itself opens it (templates that
end the generation prompt with "<think>\\n"). Like the tool parser, a partial tag is held back
until decided and the results do not depend on how the text was split into deltas.
"""

from __future__ import annotations

from typing import Any

OPEN, CLOSE = "<think>", "</think>"
_WS = " \t\r\n"


class ReasoningParser:
    def __init__(self, in_reasoning: bool = False) -> None:
        self._state = "reasoning" if in_reasoning else "start"
        self._buf = ""
        self.thought = in_reasoning  # the output has (had) a reasoning part

    @classmethod
    def for_prompt(cls, tokenizer: Any, prompt_text: str) -> ReasoningParser | None:
        template = getattr(tokenizer, "chat_template", None)
        if OPEN not in (getattr(template, "source", "") or ""):
            return None
        return cls(in_reasoning=prompt_text.rstrip(_WS).endswith(OPEN))

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that this text settles."""
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while True:
            buf = self._buf
            if self._state == "start":
                rest = buf.lstrip(_WS)
                if rest.startswith(OPEN):
                    self._buf, self._state = rest[len(OPEN):], "reasoning"
                    self.thought = True
                    continue
                if OPEN.startswith(rest) and not final:
                    break  # nothing but whitespace and maybe the start of the tag yet
                self._state = "content"
                continue
            if self._state == "reasoning":
                i = buf.find(CLOSE)
                if i >= 0:
                    reasoning.append(buf[:i])
                    self._buf, self._state = buf[i + len(CLOSE):], "after"
                    continue
                hold = 0 if final else _partial_suffix(buf, CLOSE)
                reasoning.append(buf[:len(buf) - hold])
                self._buf = buf[len(buf) - hold:]
                break
            if self._state == "after":  # the blank lines after </think> belong to neither
                rest = buf.lstrip(_WS)
                if not rest:
                    self._buf = ""
                    break
                self._buf, self._state = rest, "content"
                continue
            content.append(buf)
            self._buf = ""
            break
        return "".join(reasoning), "".join(content)


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """The whole output -> (reasoning or None when the model did not think, content)."""
    p = ReasoningParser(in_reasoning)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    return (r1 + r2 if p.thought else None), c1 + c2


def _partial_suffix(buf: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if marker.startswith(buf[len(buf) - k:]):
            return k
    return 0
