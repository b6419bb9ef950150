"""The Received: trace line, in qmail-smtpd's format (pure)."""

from __future__ import annotations

import time

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-[]")
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def safe(text: str) -> str:
    """qmail's received.c: characters outside a small safe set become "?".

    The set is qmail's plus "[" and "]", so address literals read as written.
    """
    return "".join(c if c in _SAFE else "?" for c in text)


def qmailDate(when: float) -> str:
    """``25 Nov 2026 14:41:00 +0100``: local time with a numeric offset (P14)."""
    t = time.localtime(when)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return (
        f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{offset // 60:02d}{offset % 60:02d}"
    )


def receivedLine(
    helo: str | None,
    peerHost: str,
    me: str,
    protocol: str,
    when: float,
    remoteHost: str = "unknown",
) -> bytes:
    parts = [f"Received: from {safe(remoteHost)}"]
    if helo is not None and helo.lower() != remoteHost.lower():
        parts.append(f" (HELO {safe(helo)})")
    parts.append(f" ({safe(peerHost)})\n  by {safe(me)} with {protocol}; {qmailDate(when)}\n")
    return "".join(parts).encode("ascii")
