"""Incremental DATA framing (pure): strict CRLF, dot-unstuffing, size and hops.

Only ``<CR><LF>.<CR><LF>`` ends a message. A LF that does not follow a CR, or
a CR that is not followed by LF, anywhere before the end is an error
(qmail's 451, and the defence against SMTP smuggling: every end-of-data
variant that another MTA might honour contains one of them).

The parser works on whole buffers with ``bytes`` methods rather than one
Python call per line; only the header block is looked at line by line (for
the hop count). Its output is the message with LF line endings, as qmail
stores it. Memory is bounded: an unfinished line is carried over only up to
``MAX_CARRY`` bytes, after which its beginning is passed on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CARRY = 64 * 1024
_HOP = re.compile(rb"^(?:received|delivered)", re.IGNORECASE | re.MULTILINE)


class BareLineEnding(Exception):
    """A bare LF or bare CR inside DATA."""


@dataclass
class DataResult:
    output: bytes  # message bytes to store (LF line endings), possibly empty
    done: bool  # the end-of-data line was seen
    rest: bytes  # bytes after the end-of-data line (pipelined commands)


class DataParser:
    """Feed the bytes received after ``354``; get message bytes back.

    ``size`` counts the bytes stored (after unstuffing and CRLF -> LF, as
    qmail's databytes does). Once it passes ``maxBytes`` (0: no limit) the
    parser keeps reading to the end but returns no more output and sets
    ``overflow``. ``hops`` counts Received/Delivered header lines.
    """

    def __init__(self, maxBytes: int = 0) -> None:
        self.maxBytes = maxBytes
        self.size = 0
        self.hops = 0
        self.overflow = False
        self.finished = False
        self._carry = b""
        self._atLineStart = True  # the carry begins a line
        self._inHeader = True
        self._headerLineStart = True  # the last header byte output ended a line

    def feed(self, data: bytes) -> DataResult:
        if self.finished:
            raise RuntimeError("DataParser already finished")
        buf = self._carry + data if self._carry else data
        last = buf.rfind(b"\n")
        if last < 0:
            return DataResult(self._feedPartial(buf), False, b"")
        complete = buf[: last + 1]
        end = -1
        if self._atLineStart and complete.startswith(b".\r\n"):
            end = 0
        else:
            i = complete.find(b"\r\n.\r\n")
            if i >= 0:
                end = i + 2
        if end >= 0:
            content = complete[:end]
            rest = buf[end + 3 :]
            self.finished = True
            self._carry = b""
        else:
            content = complete
            rest = b""
            self._carry = buf[last + 1 :]
        out = self._process(content, self._atLineStart)
        self._atLineStart = True
        if not self.finished and len(self._carry) > MAX_CARRY:
            out += self._feedPartial(self._carry)
        return DataResult(out, self.finished, rest)

    def _feedPartial(self, buf: bytes) -> bytes:
        """Buffer an unfinished line, or pass its beginning on once it is long."""
        if len(buf) <= MAX_CARRY:
            self._carry = buf
            return b""
        # Keep a final CR: its LF may be in the next packet.
        keep = 1 if buf.endswith(b"\r") else 0
        head = buf[: len(buf) - keep]
        self._carry = buf[len(buf) - keep :]
        if b"\r" in head:
            raise BareLineEnding()
        if self._atLineStart and head.startswith(b"."):
            head = head[1:]
        self._atLineStart = False
        return self._store(head)

    def _process(self, content: bytes, atLineStart: bool) -> bytes:
        if not content:
            return b""
        # Delete every CR; the message is clean exactly when there were as
        # many CRs as LFs and as CRLF pairs. (translate and count run at
        # memory speed; this is the hot path for big messages.)
        text = content.translate(None, b"\r")
        crs = len(content) - len(text)
        if text.count(b"\n") != crs or content.count(b"\r\n") != crs:
            raise BareLineEnding()
        if atLineStart and text.startswith(b"."):
            text = text[1:]
        return self._store(text.replace(b"\n.", b"\n"))

    def _store(self, content: bytes) -> bytes:
        if self._inHeader and content:
            self._scanHeader(content)
        self.size += len(content)
        if self.overflow or (self.maxBytes and self.size > self.maxBytes):
            self.overflow = True
            return b""
        return content

    def _scanHeader(self, content: bytes) -> None:
        if self._headerLineStart and content.startswith(b"\n"):
            header = b""
            self._inHeader = False
        else:
            blank = content.find(b"\n\n")
            if blank >= 0:
                header = content[: blank + 1]
                self._inHeader = False
            else:
                header = content
        for match in _HOP.finditer(header):
            if match.start() == 0 and not self._headerLineStart:
                continue
            self.hops += 1
        self._headerLineStart = content.endswith(b"\n")
