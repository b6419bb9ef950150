"""What the user database holds: domains, users, aliases, quotas (pure values).

The fields are vpopmail's (``vpasswd``: name, crypted password, flags, gecos,
quota, optional clear password), so a vpopmail tree or a vpopmail SQL table
maps onto them 1:1. Mailbox folders are not stored: they are always
``<data>/domains/<domain>/<user>/`` (see ``qmailtx.vdomain.layout``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, IntFlag


class QuotaError(ValueError):
    """Not a quota this program understands."""


@dataclass(frozen=True)
class QuotaLimit:
    """A Maildir++ quota: bytes and/or a message count (None: no limit on that)."""

    bytes: int | None = None
    count: int | None = None

    def __str__(self) -> str:
        """The Maildir++ quota definition, as the first line of ``maildirsize``."""
        parts = []
        if self.bytes is not None:
            parts.append(f"{self.bytes}S")
        if self.count is not None:
            parts.append(f"{self.count}C")
        return ",".join(parts)

    @property
    def unlimited(self) -> bool:
        return self.bytes is None and self.count is None


_MAILDIRPP = re.compile(r"\d+[SC](,\d+[SC])*\Z")
_LEGACY = re.compile(r"(\d+)\s*(|B|K|KB|M|MB|G|GB)\Z", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1 << 20, "MB": 1 << 20}
_UNITS.update({"G": 1 << 30, "GB": 1 << 30})


def parseQuota(text: str) -> QuotaLimit | None:
    """Parse a quota as vpopmail and qmailctl accept it; None means no quota.

    Forms: ``NOQUOTA`` (or empty, ``none``, ``0``), Maildir++ ``10000000S`` /
    ``10000000S,1000C`` / ``1000C``, and vpopmail's legacy ``1000000``,
    ``1MB``, ``1000KB`` (also ``G``/``GB``; K and M are powers of 1024, as
    vpopmail's format_maildirquota computes them).
    """
    t = text.strip()
    if t.upper() in ("", "NOQUOTA", "NONE", "0", "0S"):
        return None
    if _MAILDIRPP.match(t.upper()):
        size: int | None = None
        count: int | None = None
        for part in t.upper().split(","):
            n, unit = int(part[:-1]), part[-1]
            if unit == "S":
                size = n
            else:
                count = n
        return QuotaLimit(size, count)
    m = _LEGACY.match(t)
    if m:
        return QuotaLimit(int(m.group(1)) * _UNITS[m.group(2).upper()], None)
    raise QuotaError(f"not a quota: {text!r} (try 100MB, 104857600 or 104857600S,1000C)")


class CatchAllAction(Enum):
    """vdelivermail's instruction for a user that does not exist."""

    BOUNCE = "bounce-no-mailbox"
    DELETE = "delete"
    FORWARD = "forward"  # target: an address
    MAILBOX = "mailbox"  # target: a user of this domain


@dataclass(frozen=True)
class CatchAll:
    action: CatchAllAction = CatchAllAction.BOUNCE
    target: str = ""

    def __str__(self) -> str:
        if self.target:
            return f"{self.action.value} {self.target}"
        return self.action.value


@dataclass(frozen=True)
class Domain:
    """A hosted (virtual) domain.

    ``clearPasswords`` keeps a reversible secret beside each new password hash
    (vpopmail's ``--enable-clear-passwd``): CRAM-MD5 and APOP need it. Off by
    default; turning it on does not recover secrets of existing users.
    """

    name: str
    catchall: CatchAll = field(default_factory=CatchAll)
    clearPasswords: bool = False
    aliases: tuple[str, ...] = ()  # alias domains pointing here


class UserFlags(IntFlag):
    """vpopmail's gid flag bits, 1:1 (vpopmail.h)."""

    NO_PASSWD_CHNG = 0x01
    NO_POP = 0x02
    NO_WEBMAIL = 0x04
    NO_IMAP = 0x08
    BOUNCE_MAIL = 0x10
    NO_RELAY = 0x20
    NO_DIALUP = 0x40
    V_USER0 = 0x80
    V_USER1 = 0x100
    V_USER2 = 0x200
    V_USER3 = 0x400
    NO_SMTP = 0x800
    QA_ADMIN = 0x1000
    V_OVERRIDE = 0x2000
    NO_SPAMASSASSIN = 0x4000
    DELETE_SPAM = 0x8000
    SA_ADMIN = 0x10000
    SA_EXPERT = 0x20000
    NO_MAILDROP = 0x40000


@dataclass(frozen=True)
class User:
    """A mailbox owner. ``name`` and ``domain`` are lower case.

    ``passwordHash`` is a crypt-style string (see ``qmailtx.vdomain.passwords``),
    or "" for an account that cannot log in. ``clearSecret`` is set only in
    domains with ``clearPasswords``.
    """

    name: str
    domain: str
    passwordHash: str = ""
    clearSecret: str | None = None
    quota: QuotaLimit | None = None
    flags: UserFlags = UserFlags(0)
    gecos: str = ""

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"


@dataclass(frozen=True)
class Alias:
    """A valias: one address of a domain delivered to many targets.

    ``name`` is a local part, and may end in ``-default`` to match every
    extension below it (vdelivermail's rule). Each target is one dot-qmail
    line: ``&user@host`` (or a bare address), ``/path/Maildir/``, ``/path/mbox``,
    or ``|command``.
    """

    name: str
    domain: str
    targets: tuple[str, ...]

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"


@dataclass(frozen=True)
class Vacation:
    """An auto-responder: answered at most once per sender per ``period`` seconds."""

    subject: str
    body: str
    period: int = 7 * 24 * 3600
