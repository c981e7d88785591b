"""Tool calls read out of a completion's text as it streams: what OpenAI's `tool_calls` (whole, or streamed as
`delta.tool_calls` pieces) are made of.

Three ways the text holds calls (`ToolCallParser.mode`):
- "named" (`tool_choice` names a function): the whole text is that function's arguments (the constraint is its
  parameters' schema);
- "json" (`tool_choice: "required"`): the text is a JSON array of `{"name": ..., "arguments": {...}}` objects
  (the constraint built in tools.py);
- "hermes" (`tool_choice: "auto"` on a model that writes Hermes / Qwen calls): content, with calls in
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (a block may also hold an array of calls).

Calls are found by scanning the JSON as it arrives (strings, escapes and nesting tracked, nothing else: the text
is either constrained or the model's own), so a call's id and name go out as soon as its name is complete and its
arguments follow in pieces, as OpenAI streams them. The arguments are the model's own JSON text, in the whole reply
and in the stream alike.
"""
from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")      # Llama-style templates say "parameters"
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCallDelta:
    """A piece of call `index`: its id and name the first time, then pieces of its arguments."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict[str, object]:
        body: dict[str, object] = {"index": self.index}
        if self.id is not None:
            body.update(id=self.id, type="function")
        body["function"] = {"arguments": self.arguments} if self.name is None else \
            {"name": self.name, "arguments": self.arguments}
        return body


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def openai(self) -> dict[str, object]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class _CallObject:
    """One `{"name": ..., "arguments": ...}` object being scanned; positions index `text`. `member` is where the
    scan is in the current member: "key", "colon" (key read), "await" (value next), "string", "nested" or
    "scalar" (inside a value of that kind), "after" (value done)."""
    text: str = ""
    member: str = "key"
    key: object = None
    name: str | None = None
    arguments: tuple[int, int | None] | None = None   # (start, end) of the arguments' text; end None while open
    arguments_quoted: bool = False     # the arguments came as a JSON string holding the JSON text
    sent: int = 0                      # how much of the arguments went out
    sent_as: ToolCall | None = None    # the call it was announced as, once its name was known


@dataclass
class _JsonScanner:
    """Call objects in a stream of JSON: depth, strings and escapes tracked; an object opened outside any call
    (at the outer level, or inside an outer array) is a call."""
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    string_start: int = 0
    call: _CallObject | None = None
    call_depth: int = 0                # depth outside the call's braces

    def feed(self, char: str) -> _CallObject | None:
        """Scans one character; returns the call object that it completed."""
        call = self.call
        if call is not None:
            call.text += char
        position = len(call.text) - 1 if call is not None else 0
        member_level = call is not None and self.depth == self.call_depth + 1
        if self.in_string:
            if self.escape:
                self.escape = False
            elif char == "\\":
                self.escape = True
            elif char == '"':
                self.in_string = False
                if member_level:
                    self._string_done(call, position)
            return None
        if char == '"':
            self.in_string, self.string_start = True, position
            if member_level and call.member == "await":
                self._value_starts(call, position, "string")
            return None
        if char in "{[":
            if call is None and char == "{":
                self.call, self.call_depth = _CallObject(text="{"), self.depth
            elif member_level and call.member == "await":
                self._value_starts(call, position, "nested")
            self.depth += 1
            return None
        if char in "}]":
            self.depth -= 1
            if call is None:
                return None
            if self.depth == self.call_depth + 1:        # a nested value closed
                self._value_ends(call, position + 1)
            elif self.depth == self.call_depth:           # the call itself closed
                self._value_ends(call, position)
                self.call = None
                return call
            return None
        if not member_level:
            return None
        if char == ":" and call.member == "colon":
            call.member = "await"
        elif char == ",":
            self._value_ends(call, position)
            call.member, call.key = "key", None
        elif not char.isspace() and call.member == "await":   # a bare scalar: number, true, false, null
            self._value_starts(call, position, "scalar")
        return None

    @staticmethod
    def _value_starts(call: _CallObject, position: int, kind: str) -> None:
        call.member = kind
        if call.key in ARGUMENT_KEYS and call.arguments is None:
            call.arguments = (position, None)
            call.arguments_quoted = kind == "string"

    def _string_done(self, call: _CallObject, position: int) -> None:
        raw = call.text[self.string_start:position + 1]
        if call.member == "key":
            call.key, call.member = _loads(raw), "colon"
        elif call.member == "string":
            if call.key == "name" and call.name is None:
                name = _loads(raw)
                call.name = name if isinstance(name, str) else None
            self._value_ends(call, position + 1)

    @staticmethod
    def _value_ends(call: _CallObject, end: int) -> None:
        if call.member not in ("string", "nested", "scalar"):
            return
        if call.arguments is not None and call.arguments[1] is None and call.key in ARGUMENT_KEYS:
            start = call.arguments[0]
            call.arguments = (start, start + len(call.text[start:end].rstrip()))
        call.member = "after"


def _loads(raw: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


@dataclass
class ToolCallParser:
    """Splits one completion's text into content and tool-call pieces; `feed` each new text, then `finish`."""
    mode: str                           # "named", "json" or "hermes"
    named: str = ""                     # mode "named": the function
    calls: list[ToolCall] = field(default_factory=list)
    _scanner: _JsonScanner = field(default_factory=_JsonScanner)
    _pending: str = ""                  # hermes: text held back (a tag may be starting)
    _in_block: bool = False
    _block: str = ""                    # hermes: the current block's text, in case it holds no call
    _block_calls: int = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """The content and the call pieces this text adds."""
        if self.mode == "named":
            return "", self._named(text)
        if self.mode == "json":
            return "", self._scan(text)
        return self._hermes(text, final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left at the end of the completion (held-back text; a block that held no call is content)."""
        if self.mode != "hermes":
            return "", self._flush_arguments()
        content, deltas = self._hermes("", final=True)
        deltas += self._flush_arguments()
        if self._in_block and not self._block_calls:
            content += self._block
        return content, deltas

    def _named(self, text: str) -> list[ToolCallDelta]:
        deltas = []
        if not self.calls:
            self.calls.append(ToolCall(new_call_id(), self.named))
            deltas.append(ToolCallDelta(0, self.calls[0].id, self.named, ""))
        if text:
            self.calls[0].arguments += text
            deltas.append(ToolCallDelta(0, arguments=text))
        return deltas

    def _scan(self, text: str) -> list[ToolCallDelta]:
        deltas = []
        for char in text:
            done = self._scanner.feed(char)
            call = done or self._scanner.call
            if call is not None:
                deltas += self._progress(call, complete=done is not None)
        return _merge(deltas)

    def _progress(self, call: _CallObject, complete: bool) -> list[ToolCallDelta]:
        """The pieces of `call` that became known: its header once the name is known, then its arguments."""
        deltas = []
        if call.name is not None and call.sent_as is None:
            call.sent_as = ToolCall(new_call_id(), call.name)
            self.calls.append(call.sent_as)
            self._block_calls += 1
            deltas.append(ToolCallDelta(len(self.calls) - 1, call.sent_as.id, call.name, ""))
        sent_as = call.sent_as
        if sent_as is None:
            return deltas
        index = self.calls.index(sent_as)
        if call.arguments is None:
            if complete:    # no arguments given: an empty object
                sent_as.arguments = "{}"
                deltas.append(ToolCallDelta(index, arguments="{}"))
            return deltas
        start, end = call.arguments
        if call.arguments_quoted:   # a JSON string holding the arguments' JSON: sent whole, unquoted, once done
            if end is None or call.sent:
                return deltas
            value = _loads(call.text[start:end])
            piece = value if isinstance(value, str) else ""
            call.sent = end - start
        else:
            piece = (call.text[start:end] if end is not None else call.text[start:].rstrip())[call.sent:]
            call.sent += len(piece)
        if piece:
            sent_as.arguments += piece
            deltas.append(ToolCallDelta(index, arguments=piece))
        return deltas

    def _flush_arguments(self) -> list[ToolCallDelta]:
        call = self._scanner.call
        return self._progress(call, complete=False) if call is not None else []

    def _hermes(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self._pending += text
        content, deltas = "", []
        while self._pending:
            if not self._in_block:
                at = self._pending.find(HERMES_OPEN)
                if at < 0:
                    keep = 0 if final else _partial_tag(self._pending, HERMES_OPEN)
                    content += self._pending[:len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                content += self._pending[:at]
                self._pending = self._pending[at + len(HERMES_OPEN):]
                self._in_block, self._block, self._block_calls = True, HERMES_OPEN, 0
                continue
            used = 0
            for char in self._pending:    # up to the block's end
                used += 1
                self._block += char
                deltas += self._scan(char)
                if self._scanner.depth <= 0 and not self._scanner.in_string and self._block.endswith(HERMES_CLOSE):
                    self._scanner = _JsonScanner()
                    if not self._block_calls:
                        content += self._block
                    self._in_block = False
                    break
            self._pending = self._pending[used:]
        return content, _merge(deltas)


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` could start `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive argument pieces of one call as one piece."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments
        else:
            merged.append(delta)
    return merged
