"""Bounded parsing of SMTP replies as a client reads them (pure).

A reply is one or more lines ``NNN-text`` ending with a line ``NNN text``
(or a bare ``NNN``). The parser is fed bytes and hands back complete
``Reply`` values; it refuses, with ``ReplyError``, anything a hostile or
broken server could use to make the client grow without bound or read
something other than what was meant (CVE-2020-8794 abused an OpenSMTPD
client that took multi-line replies too lightly):

- a line longer than ``maxLineLength`` octets (terminator included), even
  before its end has arrived;
- a reply of more than ``maxLines`` lines;
- a line that is not ``[2-5][0-9][0-9]`` followed by ``-``, a space or the
  end of the line;
- a continuation line whose code differs from the first line's.

Lines end in CRLF; a bare LF is accepted as the end of a line too (being
lenient on input does no harm here), a trailing CR is stripped. The text is
decoded as UTF-8 with replacement characters, and other control characters
are replaced by ``?``, so logs and bounces never carry raw bytes from the
peer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LINE_LENGTH = 4096
MAX_LINES = 100

_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class ReplyError(Exception):
    """The server's bytes are not an acceptable reply; the message says why
    in words fit for a delivery report ("remote reply line too long")."""


@dataclass(frozen=True)
class Reply:
    """One complete server reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The lines joined with spaces (as qmail-remote reports them)."""
        return " ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class ReplyParser:
    """Turns a stream of bytes into replies, within fixed bounds."""

    def __init__(self, maxLineLength: int = MAX_LINE_LENGTH, maxLines: int = MAX_LINES) -> None:
        self.maxLineLength = maxLineLength
        self.maxLines = maxLines
        self._buffer = b""
        self._code: bytes | None = None
        self._lines: list[str] = []

    def add(self, data: bytes) -> None:
        """Add bytes; ``next`` takes replies out of them."""
        self._buffer += data

    def feed(self, data: bytes) -> list[Reply]:
        """Add bytes; return the replies they completed (raises ReplyError)."""
        self.add(data)
        replies: list[Reply] = []
        while True:
            reply = self.next()
            if reply is None:
                return replies
            replies.append(reply)

    def next(self) -> Reply | None:
        """The next complete reply from what was fed, or None if more bytes
        are needed. Bytes after the returned reply stay buffered."""
        while True:
            end = self._buffer.find(b"\n", 0, self.maxLineLength)
            if end < 0:
                if len(self._buffer) >= self.maxLineLength:
                    raise ReplyError("remote reply line too long")
                return None
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._addLine(line)
            if reply is not None:
                return reply

    def discard(self) -> bytes:
        """Drop (and return) whatever is buffered past the last reply."""
        rest, self._buffer = self._buffer, b""
        self._code, self._lines = None, []
        return rest

    @property
    def pending(self) -> bool:
        """Whether part of a reply has been received."""
        return bool(self._buffer) or self._code is not None

    def _addLine(self, line: bytes) -> Reply | None:
        match = _LINE.match(line)
        if match is None:
            raise ReplyError("remote reply syntax error")
        code, separator = match.group(1), match.group(2)
        if self._code is None:
            self._code = code
        elif code != self._code:
            raise ReplyError("remote reply code changed within a multi-line reply")
        if len(self._lines) >= self.maxLines:
            raise ReplyError("remote reply has too many lines")
        text = line[4:].decode("utf-8", "replace")
        self._lines.append(_CONTROL.sub("?", text))
        if separator == b"-":
            return None
        reply = Reply(int(code), tuple(self._lines))
        self._code, self._lines = None, []
        return reply
