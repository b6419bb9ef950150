"""P20: refuse DOS/Windows executables at end of DATA (qmail-smtpd-viruscan).

The message streams through a ``MimeWalker`` (``qmailtx.policy.mime``), which
hands over the start of every body; a body is executable content when

* its first non-empty line, as sent, starts with one of the ``signatures``
  (control/signatures, one per line; the classic base64 forms of MZ headers
  when there are none): qmail-smtpd-viruscan's rule, applied like qmail to
  the first line of every header section's body whatever its encoding, and
  nowhere else (a signature further down a text is not content we refuse);
* its first bytes, with the transfer encoding undone, start with a signature
  that is itself base64 (8 characters or more), decoded: the same signatures
  whatever the line width or white space of the encoding (patches.md P20,
  "Modern");
* its first decoded bytes are a DOS header, ``MZ`` (or ``ZM``). For text/*
  bodies, where "MZ..." may be words, only when the PE signature ``PE\\0\\0``
  sits where the header's e_lfanew points, within the first KiB;
* it is a uuencoded file (in a plain body) whose data starts with ``MZ``.

A message whose MIME structure is nested deeper than the walker follows is
refused too: what cannot be followed cannot be checked (threats.md S17).
The verdict is qmail's reply, ``552 5.3.4 we don't accept email with
executable content``, with the part's type, name and the rule in the log.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.policy.interfaces import IDataCheck, ISMTPSession
from qmailtx.policy.mime import MimeWalker, Part
from qmailtx.policy.verdict import CONTINUE, Verdict, reject

log = Logger()

# Base64 first lines of DOS/PE executables: the Microsoft linker's stub, Borland's
# (two forms), and other MZ header layouts seen in the wild.
DEFAULT_SIGNATURES = (
    "TVqQAAMAAAAEAAAA//8AALgAAAAA",
    "TVpQAAIAAAAEAA8A//8AALgAAAAA",
    "TVpQAAIAAAAEAA8A//8AAAAAAAAA",
    "TVqAAAEAAAAEABAAAAAAAAAAAAAA",
    "TVpTAQEAAAAEAAAA//8AALgAAAAA",
    "TVoAAAAAAAAAAAAAAAAAAAAAAAAA",
    "TVoFAQUAAAAEAAAAAQAAAAAAAAAA",
)

R_EXECUTABLE = reject(552, "5.3.4", "we don't accept email with executable content")
R_UNCHECKABLE = reject(
    554, "5.6.0", "sorry, the MIME structure of this message is too complex to be checked"
)

_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_MIN_DECODED_SIGNATURE = 8  # base64 characters (6 bytes)


@dataclass(frozen=True)
class Signatures:
    """Signatures as written (prefixes of encoded lines) and, for those that
    are base64, the bytes they stand for (prefixes of decoded content)."""

    encoded: tuple[bytes, ...]
    decoded: tuple[tuple[bytes, bytes], ...]  # (decoded prefix, the signature)

    @classmethod
    def fromLines(cls, lines: Iterable[str]) -> Signatures:
        encoded: list[bytes] = []
        decoded: list[tuple[bytes, bytes]] = []
        for line in lines:
            signature = line.strip().encode("utf-8")
            if not signature or signature in encoded:
                continue
            encoded.append(signature)
            usable = len(signature) - len(signature) % 4
            if usable >= _MIN_DECODED_SIGNATURE and all(c in _BASE64 for c in signature):
                decoded.append((binascii.a2b_base64(signature[:usable]), signature))
        return cls(tuple(encoded), tuple(decoded))


DEFAULT = Signatures.fromLines(DEFAULT_SIGNATURES)


def _hasPEHeader(head: bytes) -> bool:
    if len(head) < 0x40:
        return False
    offset = int.from_bytes(head[0x3C:0x40], "little")
    return head[offset : offset + 4] == b"PE\0\0"


def findExecutable(
    signatures: Signatures, part: Part, firstLine: bytes, head: bytes
) -> tuple[str, str] | None:
    """Why this body is executable content (a rule and a detail), or None."""
    for signature in signatures.encoded:
        if firstLine.startswith(signature):
            return "signature", signature.decode("utf-8", "replace")
    for prefix, signature in signatures.decoded:
        if head.startswith(prefix):
            return "decoded signature", signature.decode("utf-8", "replace")
    if head[:2] in (b"MZ", b"ZM"):
        if _hasPEHeader(head):
            return "PE header", ""
        if not part.isText:
            return "DOS header", ""
    return None


@implementer(IDataCheck)
class ExecutableBlocker:
    """An IDataCheck adapting one ISMTPSession, made fresh per message."""

    def __init__(self, session: ISMTPSession, signatures: Signatures = DEFAULT) -> None:
        self.session = session
        self.signatures = signatures
        self.walker = MimeWalker(self)
        self._found: tuple[Part, str, str] | None = None

    def dataReceived(self, chunk: bytes) -> None:
        self.walker.feed(chunk)

    def partHead(self, part: Part, firstLine: bytes, head: bytes) -> bool:
        """The walker's sink: True (stop walking) once a body is refused."""
        found = findExecutable(self.signatures, part, firstLine, head)
        if found is None:
            return False
        self._found = (part, *found)
        return True

    def endOfData(self) -> Verdict:
        self.walker.close()
        session = self.session
        if self._found is not None:
            part, rule, detail = self._found
            log.info(
                "exeblock refused a message from {peer} session {session}: {rule} {detail}"
                " in a {contentType} part ({encoding}) named {filename}",
                policy="exeblock",
                peer=session.peerHost,
                session=session.sessionId,
                rule=rule,
                detail=detail,
                contentType=part.contentType,
                encoding=part.encoding,
                filename=part.filename,
                depth=part.depth,
            )
            return R_EXECUTABLE
        if self.walker.problem is not None:
            log.info(
                "exeblock refused a message from {peer} session {session}: {problem}",
                policy="exeblock",
                peer=session.peerHost,
                session=session.sessionId,
                problem=self.walker.problem,
            )
            return R_UNCHECKABLE
        return CONTINUE


def register(registry: Any, context: Any) -> None:
    lines = context.config.control.signatures or DEFAULT_SIGNATURES
    factory = partial(ExecutableBlocker, signatures=Signatures.fromLines(lines))
    registry.registerAdapter(factory, (ISMTPSession,), IDataCheck, name="exeblock")
