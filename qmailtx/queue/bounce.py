"""Bounce messages: qmail's QSBMF text inside an RFC 3464 multipart/report (pure).

Part 1 is the text qmail-send writes (the ``Hi. This is the`` intro, one
``<address>:`` paragraph per failed recipient, the ``--- Below this line``
break), so QSBMF parsers such as ezmlm's keep working; part 2 is the
machine-readable ``message/delivery-status``; part 3 is the original's header
(``text/rfc822-headers``, the "delete the body" default) or, when configured
and small enough, the whole original (``message/rfc822``).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from zoneinfo import ZoneInfo

from qmailtx.address import Address
from qmailtx.control import Control

_STATUS = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)")
DOUBLE_BOUNCE_SENDER = Address("#", "[]")


@dataclass(frozen=True)
class BounceSettings:
    me: str
    bouncefrom: str
    bouncehost: str
    doublebounceto: str
    doublebouncehost: str
    bouncesubject: str
    bouncemessage: str
    doublebouncesubject: str
    doublebouncemessage: str
    bodyBytes: int = 0
    timezone: str = ""  # for Date and Arrival-Date ("": local)

    @classmethod
    def fromControl(
        cls, control: Control, bodyBytes: int = 0, timezone: str = ""
    ) -> BounceSettings:
        return cls(
            me=control.me,
            bouncefrom=control.bouncefrom,
            bouncehost=control.bouncehost,
            doublebounceto=control.doublebounceto,
            doublebouncehost=control.doublebouncehost,
            bouncesubject=control.bouncesubject,
            bouncemessage=control.bouncemessage,
            doublebouncesubject=control.doublebouncesubject,
            doublebouncemessage=control.doublebouncemessage,
            bodyBytes=bodyBytes,
            timezone=timezone,
        )


@dataclass(frozen=True)
class FailedRecipient:
    recipient: Address
    text: str


@dataclass(frozen=True)
class Bounce:
    sender: Address
    recipients: list[Address]
    content: bytes


def rfc5322Date(when: float, timezone: str = "") -> str:
    """A Date header value with a numeric offset (P14), in ``timezone`` (an
    IANA name; "" for the system's local zone, which follows $TZ)."""
    if timezone:
        return format_datetime(datetime.fromtimestamp(when, ZoneInfo(timezone)))
    return format_datetime(datetime.fromtimestamp(when).astimezone())


def statusOf(text: str, default: str = "5.0.0") -> str:
    found = _STATUS.findall(text)
    return found[-1] if found else default


def qsbmfParagraph(failure: FailedRecipient) -> str:
    address = str(failure.recipient).replace("\n", "_")
    lines = [line if line.strip() else "/" for line in failure.text.rstrip("\n").split("\n")]
    return f"<{address}>:\n" + "\n".join(lines) + "\n"


def bounceKind(sender: Address) -> str:
    """ "bounce" to the sender, "double" to the postmaster, or "triple" (discard)."""
    if sender.isDoubleBounce:
        return "triple"
    if sender.isNull:
        return "double"
    return "bounce"


def buildBounce(
    settings: BounceSettings,
    originalSender: Address,
    failures: list[FailedRecipient],
    originalHeader: bytes,
    originalMessage: bytes | None,
    arrival: float,
    now: float,
    boundary: str | None = None,
) -> Bounce:
    """Build the bounce for ``failures``.

    ``originalMessage`` is the whole original when it is to be included, else None.
    """
    kind = bounceKind(originalSender)
    if kind == "triple":
        raise ValueError("a double bounce that fails is discarded, not bounced")
    double = kind == "double"
    host = settings.bouncehost
    if double:
        sender = DOUBLE_BOUNCE_SENDER
        recipient = Address(settings.doublebounceto, settings.doublebouncehost.lower())
        subject = settings.doublebouncesubject
        intro = settings.doublebouncemessage
    else:
        sender = Address.null()
        recipient = originalSender
        subject = settings.bouncesubject
        intro = settings.bouncemessage
    intro = intro.replace("{host}", host)
    if not intro.endswith("\n"):
        intro += "\n"
    included = originalMessage if originalMessage is not None else originalHeader
    boundary = boundary or f"qmailtx-{secrets.token_hex(12)}"
    while boundary.encode("ascii") in included:
        boundary = f"qmailtx-{secrets.token_hex(12)}"

    if double:
        breakLine = "--- Below this line is the original bounce."
    elif originalMessage is not None:
        breakLine = "--- Below this line is a copy of the message."
    else:
        breakLine = "--- Below this line is the header of the message."
    human = intro + "\n" + "\n".join(qsbmfParagraph(f) for f in failures) + "\n" + breakLine + "\n"

    dsn = [
        f"Reporting-MTA: dns; {settings.me}",
        f"Arrival-Date: {rfc5322Date(arrival, settings.timezone)}",
        "",
    ]
    for f in failures:
        one = " ".join(f.text.split())
        dsn += [
            f"Final-Recipient: rfc822; {f.recipient}",
            "Action: failed",
            f"Status: {statusOf(f.text)}",
            f"Diagnostic-Code: X-qmailtx; {one}",
            "",
        ]

    to = str(recipient)
    headers = [
        f"Date: {rfc5322Date(now, settings.timezone)}",
        f"From: {settings.bouncefrom}@{host}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Message-ID: <{boundary}@{host}>",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Auto-Submitted: auto-replied",
    ]
    returnPath = f"Return-Path: <{originalSender}>\n".encode("ascii", "replace")
    if originalMessage is not None:
        thirdType = "message/rfc822"
    else:
        thirdType = "text/rfc822-headers"
    third = [f"Content-Type: {thirdType}"]
    if any(b > 127 for b in included):
        third.append("Content-Transfer-Encoding: 8bit")
    parts = [
        "\n".join(headers) + "\n\n",
        "This is a MIME-formatted message.  Portions of it may be unreadable without a\n"
        "MIME-capable mail program.\n\n",
        f"--{boundary}\nContent-Type: text/plain; charset=us-ascii\n\n{human}\n",
        f"--{boundary}\nContent-Type: message/delivery-status\n\n" + "\n".join(dsn) + "\n",
        f"--{boundary}\n" + "\n".join(third) + "\n\n",
    ]
    body = "".join(parts).encode("ascii", "replace") + returnPath + included
    if not body.endswith(b"\n"):
        body += b"\n"
    body += f"\n--{boundary}--\n".encode("ascii")
    return Bounce(sender, [recipient], body)
