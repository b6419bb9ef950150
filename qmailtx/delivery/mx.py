"""Where to connect for a domain: MX resolution as qmail-remote does it, over twisted.names.

:meth:`MXResolver.destinations` answers an ordered list of (host, address,
port, preference) to try, or raises :class:`RouteError` carrying
qmail-remote's text (patches.md 2.6) and whether the failure is permanent:

* An smtproutes relay (``route.host`` set): the relay's A/AAAA records, or its
  address literal, on ``route.port``; no MX lookup and no self-MX rule.
* Otherwise the MX records, by preference, shuffled among equal preferences;
  no MX records (NODATA) means the domain's own A/AAAA at preference 0
  (implicit MX); a lone ``MX 0 .`` is RFC 7505's null MX (permanent).
* Addresses of one host: IPv4 first, then IPv6, each in answer order
  ("ordered fallback"; no Happy Eyeballs). An address met twice is kept once.
* Self-MX rule with P11: the lowest preference among MX hosts with one of our
  addresses is ``prefme``; only MX records with a lower preference are used,
  and none left is the permanent "best-preference MX" error. Our addresses
  are ``ourAddresses()`` plus, always, 0.0.0.0/8, 127.0.0.0/8, ``::`` and
  ``::1`` (``alwaysLocal``). Multicast, broadcast and reserved addresses are
  never connected to.
* DNS trouble (timeout, SERVFAIL, refused) is temporary; NXDOMAIN permanent.
  An MX host that does not resolve is skipped; if nothing is left, the failure
  is temporary when some lookup failed temporarily, else permanent.

No CNAME canonicalisation and no ``ANY`` queries (decisions.md, P3, P7): MX,
A and AAAA are asked explicitly. twisted.names repeats a truncated UDP answer
over TCP (P3; tests/delivery/test_mx.py proves it). Answers are cached here
(one cache per resolver, so per process) for their smallest TTL, at most
``maxTTL``; NODATA and NXDOMAIN for ``negativeTTL``; failures are not cached.
"""

from __future__ import annotations

import ipaddress
import random as _random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError

from qmailtx.delivery.routes import DEFAULT_PORT, Route, parseLiteral

log = Logger()

TIMEOUT: tuple[int, ...] = (1, 3, 11)
ALWAYS_LOCAL: tuple[str, ...] = ("0.0.0.0/8", "127.0.0.0/8", "::/128", "::1/128")

# qmail-remote's words (patches.md 2.6, P11).
TEMP_DNS = "Sorry, I couldn't find any host by that name. (#4.1.2)"
PERM_NOMX = "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)"
AMBIGUOUS_MX = (
    "Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
    "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)"
)


def permDNS(host: str) -> str:
    return f"Sorry, I couldn't find any host named {host}. (#5.1.2)"


def nullMX(domain: str) -> str:
    """RFC 7505 section 4.2 / RFC 7505's enhanced code 5.1.10."""
    return f"Sorry, {domain} does not accept mail (null MX). (#5.1.10)"


@dataclass(frozen=True)
class Destination:
    host: str  # MX host name (or the route host / the domain for implicit MX)
    address: str  # IP address (v4 or v6) to connect to
    port: int
    preference: int


class RouteError(Exception):
    """No destination: ``text`` in qmail-remote's words, ``permanent`` or not."""

    def __init__(self, text: str, permanent: bool) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent

    def __repr__(self) -> str:
        return f"RouteError({self.text!r}, permanent={self.permanent})"


class _NoSuchName(Exception):
    """NXDOMAIN."""


class _Trouble(Exception):
    """DNS could not answer now."""


def makeResolver(
    reactor: Any, servers: list[tuple[str, int]] | None = None, timeout: Sequence[int] = TIMEOUT
) -> client.Resolver:
    """The process's twisted.names resolver: ``servers``, else those of /etc/resolv.conf."""
    if servers:
        return client.Resolver(servers=list(servers), reactor=reactor, timeout=tuple(timeout))
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor, timeout=tuple(timeout))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unusable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_multicast or ip.is_reserved:
        return True
    return isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255")


@dataclass
class _Cached:
    expires: float
    records: list[Any] | None  # None: NXDOMAIN


class MXResolver:
    """Destinations for a domain; one per process (it holds the answer cache)."""

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        ourAddresses: Callable[[], Iterable[str]] = frozenset,
        timeout: Sequence[int] = TIMEOUT,
        *,
        random: _random.Random | None = None,
        alwaysLocal: Sequence[str] = ALWAYS_LOCAL,
        mxPort: int = DEFAULT_PORT,
        maxTTL: int = 3600,
        negativeTTL: int = 60,
    ) -> None:
        """``mxPort``: the port of MX destinations (25; tests use others)."""
        self.resolver = resolver
        self.clock = clock
        self.ourAddresses = ourAddresses
        self.timeout = tuple(timeout)
        self.random = random if random is not None else _random.Random()  # noqa: S311 (MX order, not secrets)
        self.alwaysLocal = tuple(ipaddress.ip_network(n) for n in alwaysLocal)
        self.mxPort = mxPort
        self.maxTTL = maxTTL
        self.negativeTTL = negativeTTL
        self._cache: dict[tuple[str, int], _Cached] = {}

    # -- DNS with a cache ---------------------------------------------------

    async def _query(self, name: str, kind: int) -> list[Any]:
        """Payloads of type ``kind`` answering ``name``; raises _NoSuchName or _Trouble."""
        key = (name, kind)
        now = self.clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires > now:
                if cached.records is None:
                    raise _NoSuchName(name)
                return cached.records
            del self._cache[key]
        lookup = {
            dns.MX: self.resolver.lookupMailExchange,
            dns.A: self.resolver.lookupAddress,
            dns.AAAA: self.resolver.lookupIPV6Address,
        }[kind]
        result: Any
        try:
            result = await lookup(name, self.timeout)
        except (DNSNameError, AuthoritativeDomainError):
            self._store(key, None, self.negativeTTL)
            raise _NoSuchName(name) from None
        except Exception as e:
            log.info(
                "DNS {kind} lookup of {name} failed: {error}",
                kind=dns.QUERY_TYPES.get(kind, kind),
                name=name,
                error=repr(e),
            )
            raise _Trouble(name) from e
        wanted = [rr for rr in result[0] if rr.type == kind]  # (answers, authority, additional)
        records = [rr.payload for rr in wanted]
        ttl = min((rr.ttl for rr in wanted), default=self.negativeTTL)
        self._store(key, records, min(ttl, self.maxTTL))
        return records

    def _store(self, key: tuple[str, int], records: list[Any] | None, ttl: int) -> None:
        if ttl > 0:
            self._cache[key] = _Cached(self.clock.seconds() + ttl, records)

    async def _addresses(self, host: str) -> list[str]:
        """A then AAAA of ``host``; _NoSuchName if it does not exist, _Trouble if DNS fails.

        One family failing temporarily is ignored when the other answered.
        """
        results = await gatherResults(
            [
                Deferred.fromCoroutine(self._outcome(host, dns.A)),
                Deferred.fromCoroutine(self._outcome(host, dns.AAAA)),
            ]
        )
        found: list[str] = []
        errors: list[Exception] = []
        for family, result in zip((socket.AF_INET, socket.AF_INET6), results, strict=True):
            if isinstance(result, Exception):
                errors.append(result)
            else:
                found.extend(socket.inet_ntop(family, r.address) for r in result)
        if found:
            return [str(ipaddress.ip_address(a)) for a in found]
        if any(isinstance(e, _Trouble) for e in errors):
            raise _Trouble(host)
        if errors:
            raise _NoSuchName(host)
        return []

    async def _outcome(self, host: str, kind: int) -> list[Any] | Exception:
        try:
            return await self._query(host, kind)
        except (_NoSuchName, _Trouble) as e:
            return e

    # -- the rules ------------------------------------------------------------

    def _isLocal(self, address: str, ours: set[str]) -> bool:
        ip = ipaddress.ip_address(address)
        return address in ours or any(
            ip in net for net in self.alwaysLocal if ip.version == net.version
        )

    async def destinations(self, domain: str, route: Route | None = None) -> list[Destination]:
        """Where to try delivering mail for ``domain``, best first; RouteError if nowhere."""
        if route is not None and route.host:
            return await self._relay(route)
        domain = domain.lower().rstrip(".")
        ours = {str(ipaddress.ip_address(a)) for a in self.ourAddresses() if _ip(a) is not None}
        literal = parseLiteral(domain)
        if literal is not None:
            if self._isLocal(literal, ours):
                raise RouteError(AMBIGUOUS_MX, permanent=True)
            return [Destination(domain, literal, self.mxPort, 0)]
        name = _asciiName(domain)
        if name is None:
            raise RouteError(permDNS(domain), permanent=True)
        try:
            exchanges = await self._query(name, dns.MX)
        except _NoSuchName:
            raise RouteError(permDNS(domain), permanent=True) from None
        except _Trouble:
            raise RouteError(TEMP_DNS, permanent=False) from None
        hosts: list[tuple[int, str]]
        if len(exchanges) == 1 and exchanges[0].name.name in (b"", b"."):
            raise RouteError(nullMX(domain), permanent=True)
        if exchanges:
            hosts = self._ordered(
                [
                    (mx.preference, mx.name.name.decode("ascii", "replace").lower())
                    for mx in exchanges
                    if mx.name.name not in (b"", b".")
                ]
            )
        else:
            hosts = [(0, name)]  # implicit MX
        soft = False
        resolved: list[tuple[int, str, list[str]]] = []
        for preference, host in hosts:
            try:
                addresses = await self._addresses(host)
            except _Trouble:
                soft = True
                continue
            except _NoSuchName:
                if not exchanges:  # the implicit MX: the domain exists (no NXDOMAIN on MX)
                    continue
                log.info("MX {host} of {domain} does not exist", host=host, domain=domain)
                continue
            resolved.append((preference, host, addresses))
        if not any(addresses for _, _, addresses in resolved):
            if soft:
                raise RouteError(TEMP_DNS, permanent=False)
            raise RouteError(PERM_NOMX, permanent=True)
        prefme = min(
            (p for p, _, addresses in resolved if any(self._isLocal(a, ours) for a in addresses)),
            default=None,
        )
        result: list[Destination] = []
        seen: set[str] = set()
        for preference, host, addresses in resolved:
            if prefme is not None and preference >= prefme:
                continue
            for address in addresses:
                ip = ipaddress.ip_address(address)
                if address in seen or _unusable(ip):
                    continue
                seen.add(address)
                result.append(Destination(host, address, self.mxPort, preference))
        if not result:
            if prefme is not None:
                raise RouteError(AMBIGUOUS_MX, permanent=True)
            raise RouteError(TEMP_DNS if soft else PERM_NOMX, permanent=not soft)
        return result

    def _ordered(self, hosts: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference, shuffled among equals."""
        shuffled = list(hosts)
        self.random.shuffle(shuffled)
        return sorted(shuffled, key=lambda h: h[0])

    async def _relay(self, route: Route) -> list[Destination]:
        """An smtproutes relay: its literal, or its addresses (qmail's dns_ip)."""
        literal = parseLiteral(route.host)
        if literal is None and _ip(route.host) is not None:
            literal = str(ipaddress.ip_address(route.host))
        if literal is not None:
            return [Destination(route.host, literal, route.port, 0)]
        name = _asciiName(route.host)
        if name is None:
            raise RouteError(permDNS(route.host), permanent=True)
        try:
            addresses = await self._addresses(name)
        except _NoSuchName:
            raise RouteError(permDNS(route.host), permanent=True) from None
        except _Trouble:
            raise RouteError(TEMP_DNS, permanent=False) from None
        if not addresses:
            raise RouteError(PERM_NOMX, permanent=True)
        return [Destination(route.host, a, route.port, 0) for a in addresses]


def _asciiName(domain: str) -> str | None:
    """The DNS name for ``domain`` (IDNA for non-ASCII), or None if it cannot be one."""
    try:
        name = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if not name or any(c.isspace() for c in name):
        return None
    return name
