"""The `anthropic-beta` header: which betas a request turns on, and how to refuse one.

Betas are accepted and have no effect unless the request uses a feature this server cannot
honour. Then the answer is the 400 Anthropic's API gives for a beta it does not know, word for
word, because that is what clients act on: Claude Code drops the named beta and sends the
request again without it (for deferred tools, with every tool's full definition instead).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from localserve.errors import InvalidRequestError

# the features behind a beta that this server cannot honour, by the beta's name (its date varies)
ADVANCED_TOOL_USE = "advanced-tool-use-"  # tools with defer_loading, found by a tool-search tool
MID_CONVERSATION_TOOL_CHANGES = "mid-conversation-tool-changes-"  # tool_addition / tool_removal blocks


class UnsupportedBetaError(InvalidRequestError):
    def __init__(self, betas: Iterable[str]) -> None:
        named = ", ".join(f"`{b}`" for b in betas)
        super().__init__(f"Unexpected value(s) {named} for the `anthropic-beta` header. Please consult our "
                         "documentation at docs.anthropic.com or try again without the header.")


def betas_of(header: str | None) -> list[str]:
    return [b.strip() for b in (header or "").split(",") if b.strip()]


def refuse_feature(betas: Sequence[str], family: str, field_message: str) -> None:
    """Raises for a feature this server cannot honour: the unsupported-beta error when the
    request turned the feature on through a beta of `family`, else a 400 naming the field."""
    named = [b for b in betas if b.startswith(family)]
    if named:
        raise UnsupportedBetaError(named)
    raise InvalidRequestError(field_message)
