"""The way out of a grammar: a completion from a matcher's state, and the budget rule that
keeps a constrained output closable within max_tokens (BudgetClosing, part of GrammarState).

The rule: before each sample, some completion of the grammar fits in the tokens the output may
still gain. After a sampled token, close_within looks for a completion that fits what is left;
where there is none, the token is replaced by the completion that fitted before it, and the
output ends, parsed (finish_reason length). Jump-forward keeps the rule too (a jump that would
leave no room is not taken). So from a start whose shortest document fits in max_tokens, every
output parses, whatever the model samples.

`completion(matcher)` walks the grammar from the matcher's state to an accepting one and
returns the text it took, leaving the matcher as it found it. At each point it takes the text
the grammar forces (jump-forward), else the first character of an ordered alphabet that the
grammar accepts; the order is the one that closes JSON soonest:

* inside a free string (it takes '#', which JSON allows nowhere else): the closing quote
  first, then letters and digits;
* elsewhere: '}' and ']' (close the innermost container), '"' (close a constrained string, or
  start the shortest string), ',' (a next element where one is required), digits (the shortest
  number), then openers, literals and the rest.

The walk is greedy, so its result is a completion, not always the shortest: an enum, a key or
a tool name is taken by its first letter, not by what follows it. With `lookahead` a choice
outside free strings goes to the character whose greedy completion is shortest (up to
BRANCHES of them are tried): dearer, and used where the greedy one does not fit.

It gives up (None) past `limit` bytes, or where no character of the alphabet fits (a grammar
that needs non-ASCII text next). A character the walk has chosen WORN_OUT times goes to the end
of the alphabet, so that a pattern like `(a|b)+c` reaches its `c` (JSON nests less deep).
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

WORN_OUT = 64
BRANCHES = 8
_PROBE = b"#"
_PUNCT = [c for c in string.punctuation if c not in '"#{}[],-.+']
_IN_STRING = [c.encode() for c in ['"', *string.ascii_lowercase, *string.digits, *string.ascii_uppercase, " ", *_PUNCT,
                                   "#", "-", ".", "+", "{", "}", "[", "]", ","]]
_OUTSIDE = [c.encode() for c in ["}", "]", '"', ",", *string.digits, "[", "{", "-", ".", "+", *_PUNCT, "\n", " ",
                                 "n", "t", "f", "e", "E", *(c for c in string.ascii_lowercase if c not in "ntfe"),
                                 *(c for c in string.ascii_uppercase if c != "E")]]
# one of these continues any UTF-8 lead byte (E0 needs A0-BF, F0 90-BF, ED and F4 80-9F/80-8F)
_CONTINUATION = [b"\x80", b"\x90", b"\xa0"]


def completion(matcher: Any, limit: int = 512, lookahead: bool = False) -> bytes | None:
    """The UTF-8 text that takes `matcher` from its state to a complete match (see the
    module doc); None if none was found within `limit` bytes. The matcher is left unchanged.
    Bytes, not str: after a token that ends inside a character, the completion starts with
    the rest of that character."""
    steps = 0
    out: list[bytes] = []
    size = 0
    uses: dict[bytes, int] = {}
    try:
        while not matcher.is_completed():
            forced = matcher.find_jump_forward_string()
            if forced:
                if not matcher.accept_string(forced):
                    return None
                steps += 1
                out.append(forced.encode())
                size += len(out[-1])
            else:
                worn = [c for c, n in uses.items() if n >= WORN_OUT]
                c = _best_char(matcher, worn, limit - size) if lookahead else _next_char(matcher, worn)
                if c is None:
                    return None
                steps += 1
                out.append(c)
                size += 1
                uses[c] = uses.get(c, 0) + 1
            if size > limit:
                return None
        return b"".join(out)
    finally:
        if steps:
            matcher.rollback(steps)


def _in_free_string(matcher: Any) -> bool:
    if matcher.accept_string(_PROBE):
        matcher.rollback(1)
        return True
    return False


def _alphabet(order: list[bytes], worn: list[bytes]) -> list[bytes]:
    """`order`, then one continuation byte (inside a character split by a token), with the
    worn-out characters last."""
    if not worn:
        return order + _CONTINUATION
    return [c for c in order if c not in worn] + _CONTINUATION + worn


def _next_char(matcher: Any, worn: list[bytes]) -> bytes | None:
    """Accepts the first fitting character of the alphabet for where the matcher is and
    returns it (None if none fits)."""
    for c in _alphabet(_IN_STRING if _in_free_string(matcher) else _OUTSIDE, worn):
        if matcher.accept_string(c):
            return c
    return None


def _best_char(matcher: Any, worn: list[bytes], limit: int) -> bytes | None:
    """Accepts the character, of the first BRANCHES that fit, whose greedy completion is the
    shortest; returns it. Free strings take the greedy choice (their quote closes them), and so
    does a choice where no greedy completion is within `limit`."""
    if _in_free_string(matcher):
        return _next_char(matcher, worn)
    best, best_size, tried = None, limit + 1, 0
    for c in _alphabet(_OUTSIDE, worn):
        if tried == BRANCHES:
            break
        if not matcher.accept_string(c):
            continue
        tried += 1
        rest = completion(matcher, best_size - 2)
        matcher.rollback(1)
        if rest is not None and len(rest) + 1 < best_size:
            best, best_size = c, len(rest) + 1
    if best is None:  # no greedy completion within the limit: the greedy choice, then
        return _next_char(matcher, worn)
    accepted = matcher.accept_string(best)
    assert accepted, "the grammar refused a character it had accepted"
    return best


@dataclass(slots=True)
class JumpForward:
    """Tokens to put in place of the last `num_replaced` output tokens (the sampled token,
    re-tokenized together with the forced text that follows it, or a closing)."""

    num_replaced: int
    token_ids: list[int]


class BudgetClosing:
    """The budget rule of a GrammarState (see the module doc). Uses its grammar, matcher,
    num_accepted, _closing / _closing_at (a completion that fits, and the num_accepted it is
    from), _spell_all, _restore and _accept_replacing."""

    __slots__ = ()
    grammar: Any
    matcher: Any
    num_accepted: int
    _closing: bytes | None
    _closing_at: int

    def close_within(self, last_token: int, budget: int) -> JumpForward | None:
        """Keeps the output closable within its token budget. Call after accepting
        `last_token` (not yet in the KV cache), with `budget` the tokens the output may still
        gain after it. None: a completion of the grammar from here fits in `budget`, decoding
        goes on. Else the completion that fitted before last_token (in budget + 1: the last
        step left it so) is accepted in its place and returned, as the JumpForward that replaces
        last_token; the output then parses, and the sequence ends. A grammar that was complete
        before last_token is ended there with a stop token.

        Where no completion is found (a way out that this module's alphabet cannot reach)
        None is returned and the budget cuts the output as it may."""
        if self.matcher.is_terminated():
            return None
        before = self._closing if self._closing_at == self.num_accepted - 1 else None
        fits, data = self._completion_within(budget)
        if fits:
            self._keep_closing(data)
            return None
        if before is None:  # not known from the last step: find it now
            self._restore(1, [])
            before = completion(self.matcher, lookahead=True)
            self._restore(0, [last_token])
        # a grammar complete before last_token ends there, with a stop token
        ids = None if before is None else self._spell_all(before) if before else self.grammar.stop_token_ids[:1]
        if ids and len(ids) <= budget + 1 and self._accept_replacing(ids, [last_token]):
            return JumpForward(1, ids)
        log.debug("no closing within %d tokens: the output may be cut", budget + 1)
        return None

    def _completion_within(self, budget: int) -> tuple[bool, bytes | None]:
        """(fits, completion): a completion from here and whether it takes at most `budget`
        tokens; the greedy walk first, the lookahead where that one does not fit. (True, None)
        when no completion is known: nothing to steer to."""
        data = completion(self.matcher)
        if data is None or self._takes_at_most(data, budget):
            return True, data
        better = completion(self.matcher, lookahead=True)
        if better is None or len(better) >= len(data):
            return False, data
        return self._takes_at_most(better, budget), better

    def _takes_at_most(self, data: bytes, budget: int) -> bool:
        if len(data) <= budget:  # a token is at least a byte
            return True
        ids = self._spell_all(data)
        return ids is not None and len(ids) <= budget

    def _keep_closing(self, data: bytes | None) -> None:
        self._closing, self._closing_at = data, self.num_accepted

    def _kept(self, jump: JumpForward, replaced: list[int], max_new: int) -> JumpForward | None:
        """The jump, if the output can still close within what is left of max_new after it;
        else it is undone (the model then writes the forced text itself, token by token,
        under close_within's watch). The completion after the jump is the one before it less
        the forced text, where close_within left one."""
        left = max_new - len(jump.token_ids) + jump.num_replaced
        rest = None
        if self._closing is not None and self._closing_at == self.num_accepted - len(jump.token_ids) + len(replaced):
            jumped = self.grammar.token_bytes(jump.token_ids)[len(self.grammar.token_bytes(replaced)):]
            if self._closing.startswith(jumped):
                rest = self._closing[len(jumped):]
        if rest is not None and self._takes_at_most(rest, left):
            fits = True
        else:
            fits, rest = self._completion_within(left)
        if fits:
            self._keep_closing(rest)
            return jump
        self._restore(len(jump.token_ids), replaced)
        return None
