"""Static routes (``smtproutes``) and outgoing addresses (``outgoingip``), parsed (pure).

``smtproutes`` (qmail-control(5), patches.md 2.6), one route a line::

    example.com:relay.example.net          # mail for example.com goes to the relay, port 25
    .example.org:[192.0.2.7]:2525          # any subdomain of example.org (not example.org itself)
    [192.0.2.1]:[::1]:2525                 # address literals are written in brackets, IPv6 too
    internal.test:                          # empty relay: MX lookup (stops the search here)
    :smarthost.example.net:587 user secret  # the default route, with AUTH (qmailtx extension)

qmail-remote's search order is kept: the exact domain, then each of its
dot-suffixes from the longest (``.b.c`` before ``.c`` for ``a.b.c``), then the
default route ``:relay``. The first line wins for a repeated domain, as in
qmail's constmap. A relay is a host name, an IPv4 address, or a bracketed
literal (``[192.0.2.1]``, ``[::1]``, ``[IPv6:2001:db8::1]``); ``:port`` is
optional (25).

Extension (the smarthost-AUTH patches' syntax): after the relay, separated by
white space, a user name and a password; the password is the rest of the line
(trailing blanks removed), so it may hold spaces. Whole-line ``#`` comments and
blank lines are ignored; a ``#`` elsewhere is data (passwords may hold one).

``outgoingip`` (P12): one address, bound before connecting; ``0.0.0.0``, ``::``
or nothing means "let the system choose". Extension: ``domain:address`` lines
(``.suffix:`` and ``:address`` forms too, searched like smtproutes) choose the
address per destination domain; an IPv6 address may be bracketed, and a name
may carry one IPv4 and one IPv6 address (two lines), so that the address
matching the destination's family can be bound (:meth:`OutgoingIP.forAddress`).
An unparsable line is a ``ValueError`` naming it; qmail-remote's own answer to
that, a deferral, is :data:`INVALID_OUTGOINGIP`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

DEFAULT_PORT = 25

INVALID_OUTGOINGIP = "invalid ipaddr in control/outgoingip (#4.3.0)"


@dataclass(frozen=True)
class Route:
    """One smtproutes entry.

    ``host`` is the relay as written (a name, an IPv4 address, or a bracketed
    literal such as ``[::1]``); ``""`` means "no relay: look up the MX".
    """

    host: str
    port: int = DEFAULT_PORT
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def usesMX(self) -> bool:
        return not self.host


def _candidates(domain: str) -> Iterator[str]:
    """The exact domain, its dot-suffixes from the longest, then "" (qmail-remote's loop)."""
    domain = domain.lower().rstrip(".")
    yield domain
    for i, c in enumerate(domain):
        if c == ".":
            yield domain[i:]
    yield ""


def _bad(number: int, line: str, why: str) -> ValueError:
    return ValueError(f"line {number} {line!r}: {why}")


def parseLiteral(text: str) -> str | None:
    """``[192.0.2.1]``, ``[::1]`` or ``[IPv6:...]`` -> the address; None if not a literal."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _parsePort(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r}")
    return int(text)


def _parseRelay(text: str) -> tuple[str, int]:
    """``host[:port]``, ``[literal][:port]`` -> (host, port); host keeps its brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed [")
        host, rest = text[: end + 1], text[end + 1 :]
        if parseLiteral(host) is None:
            raise ValueError(f"bad address literal {host!r}")
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after {host!r}")
        return host, _parsePort(rest[1:]) if rest else DEFAULT_PORT
    host, colon, port = text.partition(":")
    if not host:
        if colon:
            raise ValueError("a port needs a relay host")
        return "", DEFAULT_PORT
    if ":" in port:
        raise ValueError("too many ':' (write IPv6 relays in brackets)")
    if not all(c.isalnum() or c in "-._" for c in host):
        raise ValueError(f"bad relay host {host!r}")
    return host.lower(), _parsePort(port) if colon else DEFAULT_PORT


def _parseDomain(text: str) -> str:
    domain = text.strip().lower().rstrip(".") if text != "." else text
    if domain.startswith("[") and parseLiteral(domain) is not None:
        return domain
    if any(c.isspace() or c in "[]@" for c in domain):
        raise ValueError(f"bad domain {text!r}")
    return domain


@dataclass(frozen=True)
class SmtpRoutes:
    """Parsed smtproutes: domain (``""`` = default, ``.x`` = suffix) -> Route."""

    routes: dict[str, Route] = field(default_factory=dict)

    def lookup(self, domain: str) -> Route | None:
        """The route for ``domain``, or None when no line applies (look up the MX).

        A route whose ``host`` is ``""`` also means MX lookup: such a line
        stops the search (so a specific ``domain:`` line beats ``:relay``).
        """
        for key in _candidates(domain):
            route = self.routes.get(key)
            if route is not None:
                return route
        return None

    def __bool__(self) -> bool:
        return bool(self.routes)


def parseSmtpRoutes(lines: Sequence[str]) -> SmtpRoutes:
    """Parse smtproutes lines; a line that cannot be used is a ``ValueError`` naming it."""
    routes: dict[str, Route] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip(" \t\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            spec, _, credentials = line.strip().partition(" ")
            if "\t" in spec:
                spec, _, more = spec.partition("\t")
                credentials = f"{more} {credentials}".strip()
            domainText, colon, relayText = spec.partition(":")
            if not colon:
                raise ValueError("no ':' (write domain:relay[:port])")
            domain = _parseDomain(domainText)
            host, port = _parseRelay(relayText)
            auth: tuple[str, str] | None = None
            credentials = credentials.strip()
            if credentials:
                user, _, password = credentials.replace("\t", " ").partition(" ")
                password = password.strip()
                if not password:
                    raise ValueError("a user name needs a password after it")
                if not host:
                    raise ValueError("AUTH needs a relay host")
                auth = (user, password)
        except ValueError as e:
            raise _bad(number, line if not credentials else spec + " ...", str(e)) from None
        routes.setdefault(domain, Route(host, port, auth))
    return SmtpRoutes(routes)


def _parseAddress(text: str) -> str:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"bad address {text!r}") from None


_UNSPECIFIED = frozenset({"0.0.0.0", "::"})  # noqa: S104 (means "do not bind")


@dataclass(frozen=True)
class OutgoingIP:
    """Parsed outgoingip: domain (``""`` = default, ``.x`` = suffix) -> addresses to bind.

    An entry of ``()`` (from ``0.0.0.0`` or ``::``) means "no bind".
    """

    addresses: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def _entry(self, domain: str) -> tuple[str, ...]:
        for key in _candidates(domain):
            found = self.addresses.get(key)
            if found is not None:
                return found
        return ()

    def forDomain(self, domain: str) -> str | None:
        """The address to bind for mail to ``domain`` (IPv4 first), or None: the system chooses."""
        entry = self._entry(domain)
        return entry[0] if entry else None

    def forAddress(self, domain: str, destination: str) -> str | None:
        """Like forDomain, but only an address of the destination IP's family (else None)."""
        try:
            version = ipaddress.ip_address(destination).version
        except ValueError:
            return self.forDomain(domain)
        for address in self._entry(domain):
            if ipaddress.ip_address(address).version == version:
                return address
        return None


def parseOutgoingIP(lines: Sequence[str]) -> OutgoingIP:
    """Parse outgoingip lines; a line that cannot be used is a ``ValueError`` naming it."""
    found: dict[str, list[str]] = {}
    unbound: set[str] = set()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            try:
                domain, address = "", _parseAddress(line)
            except ValueError:
                domainText, colon, addressText = line.partition(":")
                if not colon:
                    raise
                domain, address = _parseDomain(domainText), _parseAddress(addressText)
            if address in _UNSPECIFIED:
                unbound.add(domain)
                continue
            version = ipaddress.ip_address(address).version
            if version in [ipaddress.ip_address(a).version for a in found.get(domain, [])]:
                what = f"for {domain!r}" if domain else "as the default"
                raise ValueError(f"a second IPv{version} address {what}")
        except ValueError as e:
            raise _bad(number, line, str(e)) from None
        found.setdefault(domain, []).append(address)
    table = {
        d: tuple(sorted(a, key=lambda x: ipaddress.ip_address(x).version)) for d, a in found.items()
    }
    for domain in unbound - table.keys():
        table[domain] = ()
    return OutgoingIP(table)
