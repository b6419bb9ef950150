"""The qmail-queue interface (pure): the envelope on fd 1 and the exit codes.

A program that queues mail the qmail way (qmail-queue, or a QMAILQUEUE
filter standing in for it) reads the message on fd 0 until end of file and
then the envelope on fd 1::

    F<sender>\\0 T<recipient>\\0 T<recipient>\\0 ... \\0

and answers with its exit code alone: 0 queued, 11-40 permanent refusal,
anything else temporary (``qmail-queue.8``). ``qqReply`` turns a code into
the SMTP reply qmail-smtpd gives for it (qmail.c ``qmail_close``), with an
RFC 3463 enhanced code in place of qmail's ``(#x.y.z)`` suffix.
"""

from __future__ import annotations

from collections.abc import Sequence

from qmailtx.address import Address
from qmailtx.queue.layout import MAX_ENVELOPE
from qmailtx.reply import SMTPReply

# qmail-queue's exit codes (qmail-queue.8); the ones qmailtx-queue uses.
QQ_OK = 0
QQ_ADDRESS_TOO_LONG = 11
QQ_PERMANENT_REFUSAL = 31
QQ_OUT_OF_MEMORY = 51
QQ_TIMEOUT = 52
QQ_WRITE_ERROR = 53
QQ_READ_ERROR = 54
QQ_CONFIGURATION = 55
QQ_HOME = 61
QQ_QUEUE_FILES = 62
QQ_TEMPORARY_REFUSAL = 71
QQ_INTERNAL_BUG = 81
QQ_ENVELOPE_FORMAT = 91
QQ_EXEC_FAILED = 120  # qmail.c's own code when the program cannot be run

MAX_ADDRESS = 1003  # qmail-queue's ADDR: a longer envelope address is exit 11


def _temporary(text: str, enhanced: str = "4.3.0") -> SMTPReply:
    return SMTPReply(451, enhanced, text)


def _permanent(text: str, enhanced: str = "5.3.0") -> SMTPReply:
    return SMTPReply(554, enhanced, text)


_REPLIES: dict[int, SMTPReply] = {
    11: _permanent("envelope address too long for qq", "5.1.3"),
    115: _permanent("envelope address too long for qq", "5.1.3"),  # old qmail-queue
    31: _permanent("mail server permanently rejected message"),
    51: _temporary("qq out of memory"),
    52: _temporary("qq timeout"),
    53: _temporary("qq write error or disk full"),
    54: _temporary("qq read error"),
    55: _temporary("qq unable to read configuration"),
    56: _temporary("qq trouble making network connection"),
    61: _temporary("qq trouble in home directory"),
    62: _temporary("qq trouble creating files in queue"),
    63: _temporary("qq trouble creating files in queue"),
    64: _temporary("qq trouble creating files in queue"),
    65: _temporary("qq trouble creating files in queue"),
    66: _temporary("qq trouble creating files in queue"),
    71: _temporary("mail server temporarily rejected message"),
    72: _temporary("connection to mail server timed out", "4.4.1"),
    73: _temporary("connection to mail server rejected", "4.4.1"),
    74: _temporary("communication with mail server failed", "4.4.2"),
    81: _temporary("qq internal bug"),
    91: _temporary("qq internal bug"),
    120: _temporary("unable to exec qq"),
}
PERMANENT_PROBLEM = _permanent("qq permanent problem")
TEMPORARY_PROBLEM = _temporary("qq temporary problem")
CRASHED = _temporary("qq crashed")
TIMED_OUT = _REPLIES[QQ_TIMEOUT]


def qqReply(exitCode: int) -> SMTPReply | None:
    """The reply for a qmail-queue exit code; None for 0 (queued)."""
    if exitCode == QQ_OK:
        return None
    reply = _REPLIES.get(exitCode)
    if reply is not None:
        return reply
    return PERMANENT_PROBLEM if 11 <= exitCode <= 40 else TEMPORARY_PROBLEM


def encodeQmailEnvelope(sender: Address, recipients: Sequence[Address]) -> bytes:
    """The envelope as qmail-queue reads it on fd 1."""
    parts = [b"F" + str(sender).encode("ascii") + b"\0"]
    parts.extend(b"T" + str(r).encode("ascii") + b"\0" for r in recipients)
    parts.append(b"\0")
    return b"".join(parts)


class EnvelopeError(ValueError):
    """An envelope qmail-queue would refuse; ``exitCode`` says how."""

    def __init__(self, exitCode: int, reason: str) -> None:
        super().__init__(reason)
        self.exitCode = exitCode


class EnvelopeParser:
    """Reads a qmail-queue envelope fed in pieces, stopping at its final NUL.

    ``feed`` answers True once the envelope is complete (bytes after it are
    ignored, as qmail-queue ignores them) and raises EnvelopeError with exit
    code 91 for a record that is not ``F`` first and ``T`` after, 11 for an
    address longer than qmail's limit, 51 for an envelope larger than a
    queue file may hold. Beyond qmail-queue, addresses must be printable
    ASCII and recipients non-empty (91): the queue stores nothing else.
    ``finish`` is for end of input: an envelope cut short is 54.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0
        self._consumed = 0
        self.sender: Address | None = None
        self.recipients: list[Address] = []
        self.done = False

    def feed(self, data: bytes) -> bool:
        if self.done:
            return True
        self._buffer += data
        while not self.done:
            if self._pos >= len(self._buffer):
                return self._compact()
            letter = self._buffer[self._pos]
            if self.sender is None:
                if letter != ord("F"):
                    raise EnvelopeError(QQ_ENVELOPE_FORMAT, "envelope does not start with F")
            elif letter == 0:
                self.done = True
                break
            elif letter != ord("T"):
                raise EnvelopeError(QQ_ENVELOPE_FORMAT, f"unknown envelope record {letter:#04x}")
            nul = self._buffer.find(b"\0", self._pos)
            if nul < 0:
                if len(self._buffer) - self._pos - 1 > MAX_ADDRESS:
                    raise EnvelopeError(QQ_ADDRESS_TOO_LONG, "envelope address too long")
                return self._compact()
            self._record(bytes(self._buffer[self._pos + 1 : nul]))
            self._consumed += nul + 1 - self._pos
            self._pos = nul + 1
            if self._consumed > MAX_ENVELOPE:
                raise EnvelopeError(QQ_OUT_OF_MEMORY, "envelope too large")
        del self._buffer[:]
        return True

    def _compact(self) -> bool:
        del self._buffer[: self._pos]
        self._pos = 0
        return False

    def _record(self, raw: bytes) -> None:
        if len(raw) > MAX_ADDRESS:
            raise EnvelopeError(QQ_ADDRESS_TOO_LONG, "envelope address too long")
        if any(b < 0x20 or b > 0x7E for b in raw):
            raise EnvelopeError(QQ_ENVELOPE_FORMAT, "control or 8-bit byte in an address")
        text = raw.decode("ascii")
        if self.sender is None:
            self.sender = Address.fromStored(text)
        elif not text:
            raise EnvelopeError(QQ_ENVELOPE_FORMAT, "empty recipient")
        else:
            self.recipients.append(Address.fromStored(text))

    def finish(self) -> None:
        """End of input: raises EnvelopeError(54) unless the envelope was complete."""
        if not self.done:
            raise EnvelopeError(QQ_READ_ERROR, "envelope ends early")


def parseQmailEnvelope(data: bytes) -> tuple[Address, list[Address]]:
    """A whole envelope (sender, recipients); EnvelopeError as ``EnvelopeParser``."""
    parser = EnvelopeParser()
    parser.feed(data)
    parser.finish()
    assert parser.sender is not None
    return parser.sender, parser.recipients
