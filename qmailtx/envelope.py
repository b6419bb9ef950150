"""Envelopes and qmail's NUL-terminated envelope format (pure).

The format is the one qmail-queue reads on fd 1: ``F<sender>\\0``, then
``T<recipient>\\0`` for each recipient, then one more ``\\0``. Addresses never
hold NUL (the parser refuses control characters), so the records cannot be
confused, and no newline ever separates anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qmailtx.address import Address


class EnvelopeFormatError(ValueError):
    """Bytes that are not a well-formed envelope."""


@dataclass(frozen=True)
class Envelope:
    sender: Address
    recipients: tuple[Address, ...]
    # Facts about where the message came from, for logs and Received lines.
    client: str = field(default="", compare=False)

    def encode(self) -> bytes:
        return encodeEnvelope(self.sender, self.recipients)


def encodeEnvelope(sender: Address, recipients: Sequence[Address]) -> bytes:
    parts = [b"F" + str(sender).encode("ascii") + b"\0"]
    parts.extend(b"T" + str(r).encode("ascii") + b"\0" for r in recipients)
    parts.append(b"\0")
    return b"".join(parts)


def decodeEnvelope(data: bytes) -> tuple[Address, list[Address]]:
    """Parse ``F..\\0T..\\0..\\0``; every byte must be accounted for."""
    if not data.startswith(b"F"):
        raise EnvelopeFormatError("envelope does not start with F")
    if not data.endswith(b"\0\0"):
        raise EnvelopeFormatError("envelope is not terminated")
    records = data[:-2].split(b"\0")
    try:
        texts = [r.decode("ascii") for r in records]
    except UnicodeDecodeError as e:
        raise EnvelopeFormatError("non-ASCII envelope") from e
    sender = Address.fromStored(texts[0][1:])
    recipients = []
    for text in texts[1:]:
        if not text.startswith("T") or len(text) < 2:
            raise EnvelopeFormatError(f"bad envelope record {text[:20]!r}")
        recipients.append(Address.fromStored(text[1:]))
    if not recipients:
        raise EnvelopeFormatError("envelope has no recipients")
    return sender, recipients
