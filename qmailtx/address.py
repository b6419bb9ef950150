"""RFC 5321 envelope addresses: parsing and normalisation (pure).

Parsing follows qmail-smtpd's addrparse where that is safe (source routes are
stripped, quotes removed, the form without angle brackets accepted) and is
stricter where qmail was lenient: no control characters, no 8-bit bytes
(SMTPUTF8 is not offered), a bounded length, and domains that are host names
or address literals only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass

MAX_ADDRESS = 320  # 64 (local part) + 1 + 255 (domain), RFC 5321 4.5.3.1

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+\Z")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]")


class AddressError(ValueError):
    """The text is not an acceptable envelope address."""


@dataclass(frozen=True, order=True)
class Address:
    """An envelope address. ``local`` keeps its case; ``domain`` is lower-cased.

    The null sender is ``Address("", "")``. An address given without a domain
    keeps ``domain == ""`` until the caller qualifies it (qmail's envnoathost).
    """

    local: str
    domain: str

    @classmethod
    def null(cls) -> Address:
        return cls("", "")

    @property
    def isNull(self) -> bool:
        return not self.local and not self.domain

    @property
    def isDoubleBounce(self) -> bool:
        """qmail's ``#@[]``: the envelope sender of a double bounce."""
        return self.local == "#" and self.domain == "[]"

    def lowered(self) -> str:
        return str(self).lower()

    def atDomain(self) -> str:
        return "@" + self.domain

    def withDomain(self, domain: str) -> Address:
        return Address(self.local, domain.lower())

    def __str__(self) -> str:
        """The address as stored in envelopes and logged (qmail's form: no quotes)."""
        if self.isNull:
            return ""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"

    def smtpPath(self) -> str:
        """The address as written inside ``<...>`` on the wire, quoted when needed."""
        if self.isNull:
            return "<>"
        local = self.local
        if _NEEDS_QUOTING.search(local) or local.startswith(".") or local.endswith("."):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"<{local}@{self.domain}>" if self.domain else f"<{local}>"

    @classmethod
    def fromStored(cls, text: str) -> Address:
        """Inverse of ``str()`` for addresses read back from the queue."""
        if not text:
            return cls.null()
        local, sep, domain = text.rpartition("@")
        if not sep:
            return cls(text, "")
        return cls(local, domain.lower())


def _checkText(text: str) -> None:
    for ch in text:
        o = ord(ch)
        if o < 0x20 or o >= 0x7F:
            raise AddressError("control or 8-bit character in address")


def normaliseDomain(domain: str) -> str:
    """Lower-case, strip one trailing dot, and check a domain or address literal."""
    domain = domain.lower()
    if domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("bad address literal")
        inner = domain[1:-1]
        try:
            if inner.startswith("ipv6:"):
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError as e:
            raise AddressError("bad address literal") from e
        return domain
    if not domain or len(domain) > 255:
        raise AddressError("bad domain length")
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise AddressError("bad domain")
    return domain


def _unquoteLocal(local: str) -> str:
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise AddressError("unterminated quoted local part")
        out = []
        inner = local[1:-1]
        i = 0
        while i < len(inner):
            ch = inner[i]
            if ch == "\\":
                i += 1
                if i >= len(inner):
                    raise AddressError("dangling backslash")
                ch = inner[i]
            elif ch == '"':
                raise AddressError("stray quote")
            out.append(ch)
            i += 1
        return "".join(out)
    if not _ATEXT.match(local):
        raise AddressError("bad character in local part")
    return local


def _unquoted(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """The characters of ``text`` outside double quotes (and their escapes)."""
    inQuote = False
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if escaped:
            escaped = False
        elif ch == "\\" and inQuote:
            escaped = True
        elif ch == '"':
            inQuote = not inQuote
        elif not inQuote:
            yield i, ch
    if inQuote:
        raise AddressError("unterminated quote")


def _splitMailbox(text: str) -> tuple[str, str]:
    """Split ``local@domain`` at the last ``@`` outside quotes."""
    at = max((i for i, ch in _unquoted(text) if ch == "@"), default=-1)
    if at < 0:
        return text, ""
    return text[:at], text[at + 1 :]


def _stripSourceRoute(text: str) -> str:
    if text.startswith("@"):
        colon = text.find(":")
        if colon < 0:
            raise AddressError("bad source route")
        for hop in text[:colon].split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            normaliseDomain(hop[1:])
        return text[colon + 1 :]
    return text


def parseMailbox(text: str, allowNull: bool = False) -> Address:
    """Parse the inside of an SMTP path (no angle brackets).

    >>> parseMailbox("@relay.example:User@Example.COM.")
    Address(local='User', domain='example.com')
    """
    _checkText(text)
    if len(text) > MAX_ADDRESS + 256:
        raise AddressError("address too long")
    if text == "":
        if allowNull:
            return Address.null()
        raise AddressError("empty address")
    text = _stripSourceRoute(text)
    local, domain = _splitMailbox(text)
    if not local:
        raise AddressError("empty local part")
    local = _unquoteLocal(local)
    if not local:
        raise AddressError("empty local part")
    if domain or text.endswith("@"):
        domain = normaliseDomain(domain)
    address = Address(local, domain)
    if len(str(address)) > MAX_ADDRESS:
        raise AddressError("address too long")
    return address


def splitPath(argument: str) -> tuple[str, str]:
    """Split ``<path> params`` (or a bare path) into the path text and the rest.

    The path text excludes the angle brackets. A ``>`` inside a quoted local
    part does not end the path.
    """
    argument = argument.lstrip(" ")
    if argument.startswith("<"):
        try:
            for i, ch in _unquoted(argument, 1):
                if ch == ">":
                    return argument[1:i], argument[i + 1 :].strip(" ")
        except AddressError:
            pass
        raise AddressError("missing '>'")
    path, _, rest = argument.partition(" ")
    return path, rest.strip(" ")
