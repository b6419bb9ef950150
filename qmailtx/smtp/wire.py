"""A stored message in SMTP DATA form, whole or chunk by chunk (pure).

The message is stored with LF line ends. On the wire every LF becomes CRLF,
a CRLF already present stays one line end, and a CR not followed by LF is
dropped (so no bare CR or LF ever leaves); lines starting with ``.`` are
dot-stuffed; a last line without LF gets one; the data ends in exactly one
``CRLF.CRLF``.

``wireMessage`` is the reference for a whole message; ``WireConverter``
gives the same bytes for any chunking of it, carrying across chunk
boundaries the one thing that matters: whether the next byte starts a line.
(Dropping every CR is what "CRLF stays, bare CR goes" amounts to once LF
becomes CRLF, so a CR at a chunk's end needs no look-ahead.) POP3 keeps bare
CRs and has its own converter (``qmailtx.pop3.mailbox``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WireConverter", "WireInfo", "measureWire", "wireMessage"]

END = b".\r\n"


def wireMessage(message: bytes) -> bytes:
    """The message as sent after DATA: CRLF, dot-stuffed, ``CRLF.CRLF``-ended."""
    body = message.replace(b"\r\n", b"\n").replace(b"\r", b"")
    if body and not body.endswith(b"\n"):
        body += b"\n"
    body = body.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\n", b"\r\n") + END


class WireConverter:
    """``wireMessage`` chunk by chunk: ``feed`` each chunk, then ``finish``."""

    def __init__(self) -> None:
        self.atLineStart = True  # also true for an empty message: no line to complete

    def feed(self, chunk: bytes) -> bytes:
        body = chunk.replace(b"\r", b"")
        if not body:
            return b""
        body = body.replace(b"\n.", b"\n..")
        if self.atLineStart and body.startswith(b"."):
            body = b"." + body
        self.atLineStart = body.endswith(b"\n")
        return body.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """The line end a last line lacks, and the terminating dot."""
        return END if self.atLineStart else b"\r\n" + END


@dataclass(frozen=True)
class WireInfo:
    """What MAIL FROM needs to know before the data: ``size`` is the length
    of the wire form including the final ``.\\r\\n``; ``eightBit`` whether any
    byte is not ASCII."""

    size: int
    eightBit: bool


class WireMeter:
    """``WireInfo`` chunk by chunk, without keeping the output."""

    def __init__(self) -> None:
        self.converter = WireConverter()
        self.size = 0
        self.eightBit = False

    def feed(self, chunk: bytes) -> None:
        self.size += len(self.converter.feed(chunk))
        if not self.eightBit and not chunk.isascii():
            self.eightBit = True

    def finish(self) -> WireInfo:
        return WireInfo(self.size + len(self.converter.finish()), self.eightBit)


def measureWire(message: bytes) -> WireInfo:
    return WireInfo(len(wireMessage(message)), not message.isascii())
