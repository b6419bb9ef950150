"""qmail-verh (P4): ``##L`` and ``##H`` tags rewritten per recipient.

Pure functions. A message is rewritten for a recipient only when its envelope
sender was VERP-expanded for that recipient (the sender's local part ends
with ``-<local>=<host>``); ``[delivery] verh`` turns this on (off by default).

In the header (up to the first empty line) ``##L`` becomes the recipient's
local part and ``##H`` its domain; ``##`` followed by anything else is left
alone. A header line beginning with ``#`` is a flag: the ``#`` is removed and
the substitution extends to the body. The delivery agents apply it to the
bytes they deliver, never to the queue file.

A message with a ``DKIM-Signature:`` header is left untouched (and logged):
rewriting a signed header would break the signature.
"""

from __future__ import annotations

import re

from twisted.logger import Logger

from qmailtx.address import Address

log = Logger()

_TAG = re.compile(rb"##([LH])")


def isVerpFor(sender: Address, recipient: Address) -> bool:
    """The sender's local part ends with ``-<rcptlocal>=<rcpthost>``."""
    if sender.isNull or not recipient.local:
        return False
    head, dash, tail = sender.local.rpartition("-")
    if not dash or not head:
        return False
    local, equals, host = tail.rpartition("=")
    return bool(equals) and local == recipient.local and host.lower() == recipient.domain.lower()


def isSigned(header: bytes) -> bool:
    """The header has a DKIM-Signature field."""
    return any(line[:15].lower() == b"dkim-signature:" for line in header.split(b"\n"))


def rewrite(message: bytes, recipient: Address) -> bytes:
    """The message (LF line ends) with its tags rewritten for ``recipient``."""
    end = message.find(b"\n\n")
    if message.startswith(b"\n"):
        header, body = b"", message
    elif end < 0:
        header, body = message, b""
    else:
        header, body = message[: end + 1], message[end + 1 :]
    if isSigned(header):
        log.info("verh: DKIM-signed message left untouched for {rcpt}", rcpt=str(recipient))
        return message
    local = recipient.local.encode("utf-8", "replace")
    domain = recipient.domain.encode("utf-8", "replace")

    def tag(match: re.Match[bytes]) -> bytes:
        return local if match.group(1) == b"L" else domain

    lines = header.split(b"\n")
    extend = False
    for i, line in enumerate(lines):
        if line.startswith(b"#"):
            extend = True
            line = line[1:]
        lines[i] = _TAG.sub(tag, line)
    header = b"\n".join(lines)
    if extend:
        body = _TAG.sub(tag, body)
    return header + body
