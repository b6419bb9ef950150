"""The queue's files on disk (pure): names, the record format, parsing.

Directories under ``<data>/queue``:

- ``tmp/``      messages being received; anything here at start-up is a leftover
- ``mess/N/``   committed messages, split over 16 folders by arrival second
- ``corrupt/``  files found damaged at start-up, kept for the administrator

One committed message is one file::

    "QTX1" | u32 envelope length | envelope records | message bytes | "QTXE" | u64 message length

Envelope records are qmail-style, each a letter, text and NUL, ended by an
empty record: ``B<birth>`` (Unix time), ``F<sender>``, then one record per
recipient whose letter is its state: ``T`` to do, ``D`` delivered, ``X``
failed and bounced. Lower-case letters carry information (``c`` client
address, ``s`` SMTP session, ``r`` the client could relay, ``u`` its AUTH
user) and are ignored by older readers. A recipient's
state changes by overwriting that one letter in place (qmail's markdone).
The trailer proves the file was written to the end: a file without it is
torn and goes to ``corrupt/``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from qmailtx.address import Address

MAGIC = b"QTX1"
TRAILER_MAGIC = b"QTXE"
HEADER = struct.Struct(">4sI")
TRAILER = struct.Struct(">4sQ")
SPLIT = "0123456789abcdef"
MAX_ENVELOPE = 64 * 1024 * 1024

TODO, DELIVERED, FAILED = "T", "D", "X"


class QueueFileError(ValueError):
    """A queue file that is torn or not ours."""


@dataclass
class QueuedMessage:
    """A committed message as the queue manager knows it."""

    msgid: str
    path: str
    birth: float
    sender: Address
    recipients: list[Address]
    states: list[str]  # TODO / DELIVERED / FAILED per recipient
    stateOffsets: list[int]  # file offset of each recipient's state letter
    messageOffset: int
    messageLength: int
    info: dict[str, str] = field(default_factory=dict)
    nextAttempt: float | None = None  # from the file's mtime when read back from disk

    def pending(self) -> list[int]:
        return [i for i, s in enumerate(self.states) if s == TODO]


def splitName(msgid: str) -> str:
    """The split folder: the second of arrival modulo 16.

    Messages that arrive together share a folder, so their commits share one
    directory fsync (see FileSystem.syncDirectory); over time every folder
    gets a sixteenth of the queue, so none grows without bound.
    """
    try:
        second = int(msgid[:-3], 16) // 1_000_000
    except ValueError:
        return msgid[-1]
    return SPLIT[second % len(SPLIT)]


def encodeEnvelope(
    birth: float, sender: Address, recipients: list[Address], info: dict[str, str]
) -> bytes:
    parts = [b"B%d\0" % int(birth), b"F" + str(sender).encode("ascii") + b"\0"]
    for key, value in sorted(info.items()):
        clean = value.encode("ascii", "replace").replace(b"\0", b"?")
        parts.append(key.encode("ascii") + clean + b"\0")
    parts.extend(b"T" + str(r).encode("ascii") + b"\0" for r in recipients)
    parts.append(b"\0")
    return b"".join(parts)


def fileHeader(envelope: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(envelope)) + envelope


def fileTrailer(messageLength: int) -> bytes:
    return TRAILER.pack(TRAILER_MAGIC, messageLength)


def parseQueueFile(
    msgid: str, path: str, head: bytes, trailer: bytes, fileSize: int
) -> QueuedMessage:
    """Check a queue file from its first bytes (header + envelope) and last 12 bytes."""
    if len(head) < HEADER.size:
        raise QueueFileError("file too short")
    magic, envLength = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise QueueFileError("not a qmailtx queue file")
    if envLength > MAX_ENVELOPE or len(head) < HEADER.size + envLength:
        raise QueueFileError("envelope truncated")
    if len(trailer) != TRAILER.size:
        raise QueueFileError("trailer missing")
    tmagic, messageLength = TRAILER.unpack(trailer)
    messageOffset = HEADER.size + envLength
    if tmagic != TRAILER_MAGIC or messageOffset + messageLength + TRAILER.size != fileSize:
        raise QueueFileError("torn file: trailer does not match the size")
    envelope = head[HEADER.size : messageOffset]
    if not envelope.endswith(b"\0\0"):
        raise QueueFileError("envelope not terminated")
    birth: float | None = None
    sender: Address | None = None
    recipients: list[Address] = []
    states: list[str] = []
    offsets: list[int] = []
    info: dict[str, str] = {}
    pos = 0
    end = len(envelope) - 1
    while pos < end:
        nul = envelope.index(b"\0", pos)
        record = envelope[pos:nul]
        if not record:
            raise QueueFileError("empty record inside envelope")
        try:
            letter, text = chr(record[0]), record[1:].decode("ascii")
        except UnicodeDecodeError as e:
            raise QueueFileError("non-ASCII envelope record") from e
        if letter == "B":
            try:
                birth = float(text)
            except ValueError as e:
                raise QueueFileError("bad birth record") from e
        elif letter == "F":
            sender = Address.fromStored(text)
        elif letter in (TODO, DELIVERED, FAILED):
            if not text:
                raise QueueFileError("empty recipient")
            recipients.append(Address.fromStored(text))
            states.append(letter)
            offsets.append(HEADER.size + pos)
        elif letter.islower():
            info[letter] = text
        else:
            raise QueueFileError(f"unknown record {letter!r}")
        pos = nul + 1
    if birth is None or sender is None or not recipients:
        raise QueueFileError("envelope lacks birth, sender or recipients")
    return QueuedMessage(
        msgid=msgid,
        path=path,
        birth=birth,
        sender=sender,
        recipients=recipients,
        states=states,
        stateOffsets=offsets,
        messageOffset=messageOffset,
        messageLength=messageLength,
        info=info,
    )
