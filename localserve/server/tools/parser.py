"""Tool calls out of model text, incrementally: `feed(delta)` returns events as the text
arrives (content, a call's start, pieces of its arguments), `finish()` flushes the rest.

Invariants:
* the events do not depend on how the text was split into deltas (parse(text) == the
  concatenation of feed(piece)... + finish() for any split), so a streamed answer reassembles
  to the non-streamed one;
* text that may be the beginning of a call marker is held back until it is decided;
* whitespace before a call and between calls is dropped, never sent as content;
* a call starts (CallStart) only once its name is known and is one of the tools; the
  concatenated ArgsDelta texts of a call are exactly the arguments JSON the model wrote;
* anything that does not parse as a call is content: never an exception; except under a
  forced call (tool_choice required or a named function, `forced`), where the grammar made the
  whole output the calls: a call cut short (by max_tokens, say) is dropped, never content.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field

from localserve.server.tools.formats import ToolFormat
from localserve.server.tools.spec import ToolCall, new_call_id

ARGS_KEYS = ("arguments", "parameters")
_CALL_KEYS = frozenset(("name", *ARGS_KEYS))
_WS = " \t\r\n"
_PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it (when special tokens are kept)


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(slots=True)
class ArgsDelta:
    index: int
    text: str


Event = TextDelta | CallStart | ArgsDelta


class _ObjectScanner:
    """Follows one JSON object as its text arrives: nesting, strings, and the span of each
    top-level value (`values[key] = [start, end, closed]`). It checks the structure only;
    json.loads checks the finished object."""

    __slots__ = ("start", "pos", "end", "depth", "in_str", "esc", "mode", "key_start", "key", "values", "done",
                 "error")

    def __init__(self, start: int) -> None:
        self.start = self.pos = self.end = start
        self.depth = 0
        self.in_str = self.esc = self.done = self.error = False
        self.mode = "open"
        self.key_start = 0
        self.key = ""
        self.values: dict[str, list] = {}

    def advance(self, buf: str) -> None:
        i, n = self.pos, len(buf)
        while i < n and not (self.done or self.error):
            c = buf[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 1 and self.mode == "key":
                        try:
                            self.key = json.loads(buf[self.key_start:i + 1])
                        except ValueError:
                            self.error = True
                            break
                        self.mode = "colon"
                    elif self.depth == 1 and self.mode == "value":
                        self._close(i + 1)
                        i += 1
                        continue
                if self.mode == "value":
                    self.values[self.key][1] = i + 1
                i += 1
                continue
            if c in _WS:
                i += 1
                continue
            if not self._step(c, i):
                self.error = True
                break
            if self.mode == "value":
                self.values[self.key][1] = i + 1
            i += 1
        self.pos = i
        if self.done:
            self.end = i

    def _step(self, c: str, i: int) -> bool:
        """One character outside strings; False if it cannot be there."""
        if self.depth == 0:
            if self.mode != "open" or c != "{":
                return False
            self.depth, self.mode = 1, "key_or_end"
        elif self.depth == 1:
            mode = self.mode
            if mode == "key_or_end":
                if c == '"':
                    self.in_str, self.key_start, self.mode = True, i, "key"
                elif c == "}":
                    self.depth, self.done = 0, True
                else:
                    return False
            elif mode == "colon":
                if c != ":":
                    return False
                self.mode = "value_start"
            elif mode == "value_start":
                if c in ",:}]":
                    return False
                self.values[self.key] = [i, i + 1, False]
                self.mode = "value"
                if c in "{[":
                    self.depth = 2
                elif c == '"':
                    self.in_str = True
            else:  # "value" (a scalar going on) or "after_value"
                if c in ",}":
                    self.values[self.key][2] = True
                    self.mode = "key_or_end"
                    if c == "}":
                        self.depth, self.done = 0, True
                elif mode == "after_value" or c in '{["':
                    return False
        else:
            if c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._close(i + 1)
            elif c == '"':
                self.in_str = True
        return True

    def _close(self, end: int) -> None:
        span = self.values[self.key]
        span[1], span[2] = end, True
        self.mode = "after_value"


@dataclass(slots=True)
class _Pending:
    """The call being read."""

    id: str = field(default_factory=new_call_id)
    name: str | None = None
    index: int = -1  # >= 0 once started
    ignored: bool = False  # a call past max_calls: read and dropped
    args_key: str | None = None
    args_sent: int = 0  # offset in buf up to which the arguments were sent
    args: list[str] = field(default_factory=list)


class ToolCallParser:
    """One choice's output in one ToolFormat. `tool_names`: the calls that count (empty: any);
    `max_calls`: calls past this many are dropped (1 when parallel_tool_calls is false; 0: no limit);
    `forced`: a grammar forced the output to be calls, so no text of it is content."""

    def __init__(self, fmt: ToolFormat, tool_names: Collection[str] = (), max_calls: int = 0,
                 forced: bool = False) -> None:
        self.fmt = fmt
        self.names = frozenset(tool_names)
        self.max_calls = max_calls
        self.forced = forced
        self.calls: list[ToolCall] = []
        self.incomplete = False  # a call started and then broke off (truncated or malformed)
        self._buf = ""
        self._pos = 0
        self._state = "text"
        self._ws = ""  # trailing whitespace held back from content
        self._after_call = False  # content right after a call...
        self._has_text = False  # ...drops its leading whitespace unless content came before
        self._block_start = 0
        self._block_calls = 0
        self._in_list = False
        self._scanner: _ObjectScanner | None = None
        self._call: _Pending | None = None
        self._started = 0

    # -- public --------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        state = self._state
        if state in ("open", "body"):
            if self._call is not None and (self._call.index >= 0 or self._call.ignored):
                self.incomplete = self._call.index >= 0
            elif not self._block_calls:
                self._text(self._buf[self._block_start:], out)
        if self._ws and not self._started and not self.forced:
            out.append(TextDelta(self._ws))
        self._ws = ""
        self._state = "done"
        return out

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The whole output -> (content, complete calls). When a call broke off and none
        completed, the whole text is the content (none under a forced call)."""
        events = self.feed(text) + self.finish()
        if self.incomplete and not self.calls:
            return ("" if self.forced else text), []
        return "".join(e.text for e in events if isinstance(e, TextDelta)), list(self.calls)

    # -- states --------------------------------------------------------------------------------

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        handlers = {"text": self._in_text, "plain": self._in_plain, "open": self._in_open, "body": self._in_body,
                    "after": self._in_after}
        while self._state in handlers and handlers[self._state](out, final):
            pass
        return out

    def _in_plain(self, out: list[Event], final: bool) -> bool:
        self._text(self._buf[self._pos:], out)
        self._pos = len(self._buf)
        return False

    def _in_text(self, out: list[Event], final: bool) -> bool:
        buf, pos, marker = self._buf, self._pos, self.fmt.start
        if not marker:
            return self._at_output_start(out, final)
        i = buf.find(marker, pos)
        if i >= 0:
            self._text(buf[pos:i], out, before_call=True)
            self._open_block(i, i + len(marker))
            return True
        hold = 0 if final else _partial_suffix(buf, pos, marker)
        self._text(buf[pos:len(buf) - hold], out)
        self._pos = len(buf) - hold
        return False

    def _at_output_start(self, out: list[Event], final: bool) -> bool:
        """llama3: a call is the whole answer, so it can only begin the output."""
        rest = self._buf[self._pos:].lstrip(_WS)
        start = len(self._buf) - len(rest)
        if rest.startswith(_PYTHON_TAG):
            self._open_block(start, start + len(_PYTHON_TAG))
            return True
        if rest.startswith("{"):
            self._open_block(start, start)
            return True
        if not final and _PYTHON_TAG.startswith(rest):
            return False
        self._state = "plain"
        return True

    def _open_block(self, start: int, after_marker: int) -> None:
        self._block_start, self._pos = start, after_marker
        self._block_calls = 0
        self._in_list = False
        self._state = "open"

    def _in_open(self, out: list[Event], final: bool) -> bool:
        self._skip_ws()
        if self._pos == len(self._buf):
            return False
        c = self._buf[self._pos]
        if self.fmt.list_form and not self._in_list and not self._block_calls and c == "[":
            self._in_list = True
            self._pos += 1
            return True
        if c != "{":
            return self._broken(out, self._pos)
        self._scanner = _ObjectScanner(self._pos)
        self._call = _Pending()
        self._state = "body"
        return True

    def _in_body(self, out: list[Event], final: bool) -> bool:
        sc, call = self._scanner, self._call
        assert sc is not None and call is not None
        sc.advance(self._buf)
        if sc.error:
            return self._broken(out, sc.pos)
        if not self._progress(call, sc, out):
            return self._broken(out, sc.pos)
        if not sc.done:
            return False
        return self._complete(call, sc, out)

    def _in_after(self, out: list[Event], final: bool) -> bool:
        self._skip_ws()
        buf, pos, fmt = self._buf, self._pos, self.fmt
        if pos == len(buf):
            return False
        if fmt.end:
            rest = buf[pos:]
            if rest.startswith(fmt.end):
                self._pos += len(fmt.end)
            elif fmt.end.startswith(rest) and not final:
                return False
            self._to_text()
        elif fmt.list_form:
            c = buf[pos]
            if self._in_list and c == ",":
                self._pos += 1
                self._state = "open"
            else:
                if c == "]" and self._in_list:
                    self._pos += 1
                self._to_text()
        else:  # llama3: "; " or whitespace between calls, then the end of the output
            c = buf[pos]
            if c in ";{":
                self._pos += 1 if c == ";" else 0
                self._state = "open"
            else:
                self._after_call = True
                self._state = "plain"
        return True

    # -- calls ---------------------------------------------------------------------------------

    def _progress(self, call: _Pending, sc: _ObjectScanner, out: list[Event]) -> bool:
        """Starts the call once its name is known and sends what arrived of its arguments;
        False when this is no call of ours."""
        buf = self._buf
        if call.ignored:
            return True
        if call.name is None:
            if any(k not in _CALL_KEYS for k in sc.values):
                return False
            span = sc.values.get("name")
            if span is None or not span[2]:
                return True
            try:
                name = json.loads(buf[span[0]:span[1]])
            except ValueError:
                return False
            if not isinstance(name, str) or (self.names and name not in self.names):
                return False
            if self.max_calls and self._started >= self.max_calls:
                call.name, call.ignored = name, True
                return True
            call.name, call.index = name, self._started
            self._started += 1
            out.append(CallStart(call.index, call.id, name))
        if call.args_key is None:
            call.args_key = next((k for k in sc.values if k in ARGS_KEYS), None)
            if call.args_key is None:
                return True
            call.args_sent = sc.values[call.args_key][0]
        start, end, closed = sc.values[call.args_key]
        if buf[start] == '"':  # arguments written as a JSON string holding JSON: sent whole, decoded
            if closed and call.args_sent == start:
                try:
                    text = json.loads(buf[start:end])
                except ValueError:
                    return False
                self._send_args(call, text, out)
                call.args_sent = end
        elif end > call.args_sent:
            self._send_args(call, buf[call.args_sent:end], out)
            call.args_sent = end
        return True

    def _send_args(self, call: _Pending, text: str, out: list[Event]) -> None:
        if text:
            call.args.append(text)
            out.append(ArgsDelta(call.index, text))

    def _complete(self, call: _Pending, sc: _ObjectScanner, out: list[Event]) -> bool:
        try:
            obj = json.loads(self._buf[sc.start:sc.end])
        except ValueError:
            return self._broken(out, sc.end)
        args = obj.get(call.args_key) if call.args_key else {}
        if call.name is None or not isinstance(args, (dict, str)):
            return self._broken(out, sc.end)
        if not call.ignored:
            if call.args_key is None:
                self._send_args(call, "{}", out)
            self.calls.append(ToolCall(id=call.id, name=call.name, arguments="".join(call.args)))
        self._block_calls += 1
        self._call = self._scanner = None
        self._pos = self._block_start = sc.end  # a later failure in this block is text from here
        self._state = "after"
        return True

    def _broken(self, out: list[Event], at: int) -> bool:
        """What was read as a call is not one: it goes on as text from `at` (a call already
        started stays as it was streamed)."""
        if self._call is not None and self._call.ignored:
            pass
        elif self._call is not None and self._call.index >= 0:
            self.incomplete = True
        else:
            self._text(self._buf[self._block_start:at], out)
        self._call = self._scanner = None
        self._pos = at
        self._state = "text" if self.fmt.start else "plain"
        return True

    # -- text ----------------------------------------------------------------------------------

    def _to_text(self) -> None:
        self._after_call = True
        self._state = "text" if self.fmt.start else "plain"

    def _text(self, s: str, out: list[Event], before_call: bool = False) -> None:
        if self.forced:
            return
        s = self._ws + s
        self._ws = ""
        if self._after_call and not self._has_text:
            s = s.lstrip(_WS)
            if not s:
                return
        self._after_call = False
        if before_call:
            s = s.rstrip(_WS)
        else:
            body = s.rstrip(_WS)
            self._ws, s = s[len(body):], body
        if s:
            self._has_text = True
            out.append(TextDelta(s))

    def _skip_ws(self) -> None:
        buf, pos = self._buf, self._pos
        while pos < len(buf) and buf[pos] in _WS:
            pos += 1
        self._pos = pos


def _partial_suffix(buf: str, pos: int, marker: str) -> int:
    """Length of the longest tail of buf[pos:] that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(buf) - pos), 0, -1):
        if marker.startswith(buf[len(buf) - k:]):
            return k
    return 0
