"""The Received: trace line, in qmail-smtpd's format (pure).

``Received: from <remotehost> (HELO <helo>) (<remoteinfo>@<ip>)
  by <me> with <protocol> (<tls> encrypted); <date>``: qmail's line, with
the authenticated user as qmail-smtpd-auth's remote info, the RFC 3848
protocol names (ESMTPS, ESMTPA, ESMTPSA) and the TLS version and cipher as
qmail-tls writes them. The date is local time with a numeric offset (P14),
in the configured zone.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from zoneinfo import ZoneInfo

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-[]")
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_TLS_UNSAFE = re.compile(r"[^A-Za-z0-9._+ -]")


def safe(text: str) -> str:
    """qmail's received.c: characters outside a small safe set become "?".

    The set is qmail's plus "[" and "]", so address literals read as written.
    """
    return "".join(c if c in _SAFE else "?" for c in text)


def qmailDate(when: float, timezone: str = "") -> str:
    """``25 Nov 2026 14:41:00 +0100``: time in ``timezone`` (an IANA name;
    "" is the system's zone, or $TZ) with its numeric offset (P14). The day
    is not zero-padded and there is no weekday, as in qmail."""
    if timezone:
        moment = datetime.fromtimestamp(when, ZoneInfo(timezone))
        offsetDelta = moment.utcoffset()
        offset = int(offsetDelta.total_seconds()) // 60 if offsetDelta is not None else 0
        fields = (moment.day, moment.month, moment.year, moment.hour, moment.minute, moment.second)
    else:
        t = time.localtime(when)
        offset = t.tm_gmtoff // 60
        fields = (t.tm_mday, t.tm_mon, t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
    day, month, year, hour, minute, second = fields
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return (
        f"{day} {_MONTHS[month - 1]} {year} {hour:02d}:{minute:02d}:{second:02d} "
        f"{sign}{offset // 60:02d}{offset % 60:02d}"
    )


def protocolName(esmtp: bool, secure: bool, authenticated: bool) -> str:
    """``SMTP``, ``ESMTP``, or RFC 3848's ``ESMTPS``, ``ESMTPA``, ``ESMTPSA``."""
    if not (esmtp or secure or authenticated):
        return "SMTP"
    return "ESMTP" + ("S" if secure else "") + ("A" if authenticated else "")


def receivedLine(
    helo: str | None,
    peerHost: str,
    me: str,
    protocol: str,
    when: float,
    remoteHost: str = "unknown",
    remoteInfo: str | None = None,
    tls: str | None = None,
    timezone: str = "",
) -> bytes:
    """The trace line, LF-terminated. ``remoteInfo`` is the AUTH identity,
    ``tls`` the TLS version and cipher (``TLSv1.3 TLS_AES_256_GCM_SHA384``)."""
    parts = [f"Received: from {safe(remoteHost)}"]
    if helo is not None and helo.lower() != remoteHost.lower():
        parts.append(f" (HELO {safe(helo)})")
    info = f"{safe(remoteInfo)}@" if remoteInfo else ""
    parts.append(f" ({info}{safe(peerHost)})\n  by {safe(me)} with {protocol}")
    if tls:
        parts.append(f" ({_TLS_UNSAFE.sub('?', tls)} encrypted)")
    parts.append(f"; {qmailDate(when, timezone)}\n")
    return "".join(parts).encode("ascii")
