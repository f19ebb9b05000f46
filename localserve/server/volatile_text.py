"""Text agents put at the top of the prompt that changes from request to request and means
nothing to a local model. Left in, it sits before everything the prefix cache could reuse, so
every prompt of a session would be computed from scratch. It is dropped before the chat
template is applied; the rest of the prompt is untouched.
"""

from __future__ import annotations

# Claude Code's first system block: `x-anthropic-billing-header: cc_version=2.1.337.be9;
# cc_entrypoint=sdk-cli;` (its version suffix changes with the prompt)
_VOLATILE_PREFIXES = ("x-anthropic-billing-header:",)


def is_volatile(text: str) -> bool:
    return text.lstrip().startswith(_VOLATILE_PREFIXES)
