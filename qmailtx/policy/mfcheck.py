"""The envelope sender's domain must exist in DNS (P15, "mfcheck").

At MAIL, for a sender outside our own domains: an MX record, or else an A
or AAAA record, must exist. A domain that does not exist (NXDOMAIN) or has
none of those is refused; a domain whose only MX is RFC 7505's null MX
(``MX 0 .``) says it takes no mail, so no bounce could reach it either.
Trouble reaching DNS (timeouts, SERVFAIL) is a temporary failure. The null
sender, address literals and our own domains are not looked up.

Off unless a listener lists "mfcheck" in its policies (decisions.md: checks
that need the outside world are off unless configured). Lookups go through
``twisted.names``: the resolver given as ``extra["resolver"]``, else one
asking ``extra["dns_servers"]`` ((host, port) pairs), else the servers of
``/etc/resolv.conf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError, DomainError, ResolverError
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.domains import DomainTable
from qmailtx.policy.interfaces import ISenderCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, reject, tempfail

if TYPE_CHECKING:
    from qmailtx.registry import PolicyContext, Registry
    from qmailtx.vdomain.hosted import HostedDomains

log = Logger()

TIMEOUT: tuple[int, ...] = (1, 4)  # seconds per try: 5 s at most per lookup

NO_DOMAIN = reject(553, "5.7.1", "sorry, your envelope sender domain must exist")
NULL_MX = reject(550, "5.7.27", "sorry, your envelope sender domain does not accept mail")
DNS_TROUBLE = tempfail(451, "4.3.0", "DNS temporary failure")

# Errors that mean "DNS cannot answer now", not "no such domain".
_TEMPORARY = (DomainError, ResolverError, TimeoutError, ConnectError, OSError)


class Found(Enum):
    EXISTS = "exists"
    MISSING = "does not exist"
    NULL_MX = "has a null MX"


async def senderDomainStatus(
    resolver: IResolver, domain: str, timeout: Sequence[int] = TIMEOUT
) -> Found:
    """MX, then A, then AAAA (qmail's dns_mxip, plus IPv6). Raises on DNS trouble."""
    result: Any
    try:
        result = await resolver.lookupMailExchange(domain, timeout)
        answers = result[0]
        exchanges = [rr.payload for rr in answers if rr.type == dns.MX]
        if exchanges:
            if len(exchanges) == 1 and exchanges[0].name.name in (b"", b"."):
                return Found.NULL_MX
            return Found.EXISTS
        for lookup, kind in (
            (resolver.lookupAddress, dns.A),
            (resolver.lookupIPV6Address, dns.AAAA),
        ):
            result = await lookup(domain, timeout)
            if any(rr.type == kind for rr in result[0]):
                return Found.EXISTS
    except (DNSNameError, AuthoritativeDomainError):
        pass
    return Found.MISSING


@implementer(ISenderCheck)
class SenderDomainCheck:
    def __init__(
        self,
        makeResolver: Callable[[], IResolver],
        domains: DomainTable,
        hosted: HostedDomains | None = None,
        timeout: Sequence[int] = TIMEOUT,
    ) -> None:
        """``makeResolver`` is called once, at the first lookup (no I/O before)."""
        self._makeResolver = makeResolver
        self._resolver: IResolver | None = None
        self.domains = domains
        self.hosted = hosted
        self.timeout = tuple(timeout)

    @property
    def resolver(self) -> IResolver:
        if self._resolver is None:
            self._resolver = self._makeResolver()
        return self._resolver

    def isOurs(self, domain: str) -> bool:
        if self.domains.acceptsMailFor(domain) or self.domains.isLocal(domain):
            return True
        return self.hosted is not None and self.hosted.contains(domain)

    def checkSender(
        self, session: ISMTPSession, sender: Address, parameters: dict[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        if sender.isNull or sender.isDoubleBounce:
            return CONTINUE
        domain = sender.domain
        if not domain:
            self._refused(session, sender, "has no domain", NO_DOMAIN)
            return NO_DOMAIN
        if domain.startswith("[") or self.isOurs(domain):
            return CONTINUE
        return Deferred.fromCoroutine(self._check(session, sender))

    async def _check(self, session: ISMTPSession, sender: Address) -> Verdict:
        try:
            found = await senderDomainStatus(self.resolver, sender.domain, self.timeout)
        except _TEMPORARY as e:
            self._refused(session, sender, f"DNS trouble: {type(e).__name__}", DNS_TROUBLE)
            return DNS_TROUBLE
        except Exception:
            log.failure("mfcheck of {sender} crashed", sender=str(sender))
            return DNS_TROUBLE
        if found is Found.EXISTS:
            log.debug("mfcheck passed {sender}", policy="mfcheck", sender=str(sender))
            return CONTINUE
        verdict = NULL_MX if found is Found.NULL_MX else NO_DOMAIN
        self._refused(session, sender, f"domain {found.value}", verdict)
        return verdict

    def _refused(self, session: ISMTPSession, sender: Address, reason: str, v: Verdict) -> None:
        assert v.reply is not None
        log.info(
            "mfcheck refused {sender} ({reason}) at {peer} session {session}",
            policy="mfcheck",
            sender=str(sender),
            reason=reason,
            peer=session.peerHost,
            session=session.sessionId,
            code=v.reply.code,
        )


def _resolverFactory(context: PolicyContext) -> Callable[[], IResolver]:
    servers: Any = context.extra.get("dns_servers")

    def make() -> IResolver:
        if servers:
            return client.Resolver(servers=list(servers), reactor=context.reactor)
        return client.Resolver(resolv="/etc/resolv.conf", reactor=context.reactor)

    return make


def register(registry: Registry, context: PolicyContext) -> None:
    given: IResolver | None = context.extra.get("resolver")
    check = SenderDomainCheck(
        (lambda: given) if given is not None else _resolverFactory(context),
        DomainTable.fromControl(context.config.control),
        context.hosted,
        context.extra.get("dns_timeout", TIMEOUT),
    )
    registry.registerUtility(check, ISenderCheck, name="mfcheck")
