"""Remote delivery: qmail-remote as a delivery agent.

One ``deliver`` call carries every due recipient of one domain (``batchKey``)
in one SMTP transaction. The route comes from smtproutes (a smarthost, with
AUTH) or from MX records (``mx.py``); the destinations are tried in order as
RFC 5321 section 5.1 and the "RFC 2821" patch (P5) ask: a refused or timed-out
connection, a 4xx or 5xx greeting, a refused EHLO or a failed TLS handshake
move on to the next address. Once a server has answered MAIL, its answers are
the results: 2xx delivered, 4xx temporary, 5xx permanent, per recipient.
Only when every destination failed is the delivery temporary (any temporary
answer, or no connection at all) or permanent (every answer permanent).

Recipients are sent exactly as queued: no CNAME canonicalisation (RFC 5321
section 2.3.5; see decisions.md), so the address logged is the address sent
(P7). Each result's text names the host and IP that answered and carries
the remote reply, and every attempt is logged with the same fields.

Connections leave from ``outgoingip`` (P12, per destination domain) when it
matches the destination's address family. Concurrency is the queue
manager's: ``concurrencyremote`` bounds all deliveries, and ``batchLimit``
tells it ``[remote] concurrency_per_domain``, the bound for one domain. The
agent itself delivers whatever it is given at once: a delivery waiting for
its domain's turn waits in the queue manager, holding none of its slots.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.delivery.interfaces import (
    DeliveryResult,
    IDeliveryAgent,
    Outcome,
    delivered,
    permanent,
    temporary,
)
from qmailtx.delivery.mx import Destination, RouteError
from qmailtx.delivery.routes import OutgoingIP, Route, SmtpRoutes
from qmailtx.delivery.verh import isVerpFor, rewrite
from qmailtx.queue.layout import QueuedMessage
from qmailtx.smtp.client import ClientOptions, Reply, TransactionResult, sendMessage
from qmailtx.smtp.source import BytesSource, MessageSource

log = Logger()

NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"
NO_HOST = "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)"
TLS_CHOICES = ("none", "opportunistic", "verify")
MAX_SUMMARIES = 5  # failed attempts named in one result text


class Sender(Protocol):
    """``qmailtx.smtp.client.sendMessage``'s signature (tests pass fakes)."""

    def __call__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        options: ClientOptions,
        sender: str,
        recipients: list[str],
        message: MessageSource,
        tlsCreator: Any = None,
    ) -> Awaitable[TransactionResult]: ...


class DestinationFinder(Protocol):
    """``MXResolver.destinations``: raises RouteError."""

    def __call__(self, domain: str, route: Route | None = None) -> Awaitable[list[Destination]]: ...


@dataclass(frozen=True)
class RemoteSettings:
    heloName: str
    routes: SmtpRoutes | None = None
    outgoing: OutgoingIP | None = None
    tls: str = "opportunistic"  # none | opportunistic | verify
    tlsPolicy: Mapping[str, str] = field(default_factory=dict)  # domain -> tls
    perDomain: int = 20  # simultaneous deliveries to one domain
    replyTimeout: float = 1200.0
    connectTimeout: float = 60.0
    verh: bool = False  # P4: rewrite ##L/##H for VERP-expanded senders

    def tlsFor(self, domain: str) -> str:
        """The TLS policy for ``domain``: its own entry, a parent's (".example.com"
        entries and plain "example.com" both cover subdomains), or the default."""
        labels = domain.lower().split(".")
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            for key in (suffix, "." + suffix) if i == 0 else ("." + suffix, suffix):
                if key in self.tlsPolicy:
                    return self.tlsPolicy[key]
        return self.tls


@dataclass
class _Attempt:
    """How one destination went, when it did not settle the delivery."""

    summary: str
    permanent: bool
    connected: bool


def describeReply(reply: Reply) -> str:
    return f"Remote host said: {reply.code} {reply.text}".rstrip()


def _where(destination: Destination) -> str:
    if destination.host and destination.host != destination.address:
        return f"{destination.host} [{destination.address}]"
    return destination.address


def _path(address: Address) -> str:
    """The address as written between < and > (quoted if need be): what is
    sent, and so what is logged (P7)."""
    return address.smtpPath()[1:-1]


def _named(destination: Destination, text: str) -> str:
    """The client's sentence (naming the IP), with the host name in front."""
    if destination.host and destination.host != destination.address:
        return f"{destination.host}: {text}"
    return text


def _connectReason(failure: str) -> str:
    """ "Sorry, I wasn't able to establish an SMTP connection (refused). (#4.4.1)" -> "refused"."""
    found = re.search(r"\(([^()#]+)\)\. \(#", failure)
    return found.group(1) if found else failure


def _family(address: str) -> int | None:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


@implementer(IDeliveryAgent)
class RemoteDeliveryAgent:
    def __init__(
        self,
        reactor: Any,
        openMessage: Callable[[QueuedMessage], Awaitable[MessageSource]],
        runner: Callable[..., Deferred[Any]],
        destinations: DestinationFinder,
        settings: RemoteSettings,
        send: Sender | None = None,
        tlsCreator: Any = None,
    ) -> None:
        """``openMessage(message)`` answers the queued message as a source the
        client streams from (``qmailtx.delivery.source``, reading in a worker);
        ``runner`` runs blocking work (``whenDelivered``) in a worker;
        ``destinations`` is ``MXResolver.destinations``."""
        self.reactor = reactor
        self._open = openMessage
        self._run = runner
        self._destinations = destinations
        self.settings = settings
        self._send: Sender = send if send is not None else sendMessage
        self.tlsCreator = tlsCreator
        self.active = 0  # deliveries running (connections open or opening)

    def batchKey(self, recipient: Address) -> object:
        return recipient.domain.lower()

    def batchLimit(self, key: object) -> int | None:
        """``[remote] concurrency_per_domain``, for every domain (the key)."""
        return max(self.settings.perDomain, 1)

    def deliver(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        return Deferred.fromCoroutine(self._deliverCounted(message, recipients, whenDelivered))

    async def _deliverCounted(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None,
    ) -> list[DeliveryResult]:
        domain = recipients[0].domain.lower() if recipients else ""
        self.active += 1
        try:
            results = await self._deliver(message, recipients, domain)
        finally:
            self.active -= 1
        if whenDelivered is not None and all(r.outcome is Outcome.DELIVERED for r in results):
            try:
                await self._run(whenDelivered)
            except OSError:
                pass  # the queue manager removes the file itself
        return results

    # -- one delivery ------------------------------------------------------------

    async def _deliver(
        self, message: QueuedMessage, recipients: list[Address], domain: str
    ) -> list[DeliveryResult]:
        route = self.settings.routes.lookup(domain) if self.settings.routes else None
        try:
            destinations = await self._destinations(domain, route)
        except RouteError as e:
            log.info(
                "remote delivery of msg {msgid} to {domain}: {text}",
                msgid=message.msgid,
                domain=domain,
                text=e.text,
            )
            make = permanent if e.permanent else temporary
            return [make(e.text) for _ in recipients]
        if not destinations:
            return [permanent(NO_HOST) for _ in recipients]
        # The message is streamed from the queue file; a partial final line
        # is completed on the wire (qmail refuses them; completing is kinder).
        try:
            source = await self._open(message)
        except OSError as e:
            return [self._unreadable(e) for _ in recipients]
        if not self.settings.verh:
            return await self._sendAll(message, recipients, source, domain, route, destinations)
        # verh (P4): a recipient the sender was VERP-expanded for gets its own
        # transaction with its own rewritten copy, made in memory (the one
        # case that reads the whole message); the others go together, streamed.
        results: dict[int, DeliveryResult] = {}
        plain = [i for i, r in enumerate(recipients) if not isVerpFor(message.sender, r)]
        groups: list[tuple[list[int], MessageSource]] = []
        if len(plain) < len(recipients):
            try:
                body = await source.readAll()
            except OSError as e:
                return [self._unreadable(e) for _ in recipients]
            if body and not body.endswith(b"\n"):
                body += b"\n"
            groups = [
                ([i], BytesSource(rewrite(body, r)))
                for i, r in enumerate(recipients)
                if i not in plain
            ]
            del body
        if plain:
            groups.append((plain, source))
        for indices, content in groups:
            batch = [recipients[i] for i in indices]
            done = await self._sendAll(message, batch, content, domain, route, destinations)
            results.update(zip(indices, done, strict=True))
        return [results[i] for i in range(len(recipients))]

    @staticmethod
    def _unreadable(e: OSError) -> DeliveryResult:
        return temporary(f"Unable to read message: {e.strerror}. (#4.3.0)")

    async def _sendAll(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        body: MessageSource,
        domain: str,
        route: Route | None,
        destinations: list[Destination],
    ) -> list[DeliveryResult]:
        """One transaction for ``recipients``, the destinations tried in order."""
        sent = [_path(r) for r in recipients]
        attempts: list[_Attempt] = []
        for destination in destinations:
            results = await self._tryDestination(
                message, sent, body, domain, route, destination, attempts
            )
            if results is not None:
                return results
        return [self._giveUp(attempts) for _ in recipients]

    def _giveUp(self, attempts: list[_Attempt]) -> DeliveryResult:
        summaries = " / ".join(a.summary for a in attempts[-MAX_SUMMARIES:])
        if attempts and all(a.permanent for a in attempts):
            return permanent(summaries)
        if not any(a.connected for a in attempts):
            return temporary(f"{NO_CONNECTION} {summaries}".rstrip())
        return temporary(summaries)

    def _options(self, domain: str, route: Route | None, destination: Destination) -> ClientOptions:
        s = self.settings
        return ClientOptions(
            heloName=s.heloName,
            tls=s.tlsFor(domain),
            tlsHostname=destination.host or None,
            auth=route.auth if route is not None else None,
            replyTimeout=s.replyTimeout,
            connectTimeout=s.connectTimeout,
        )

    def endpoint(self, destination: Destination, port: int, domain: str) -> IStreamClientEndpoint:
        """The connection to ``destination``, bound to outgoingip for ``domain``."""
        outgoing = self.settings.outgoing
        bind = outgoing.forAddress(domain, destination.address) if outgoing else None
        family = _family(destination.address)
        bindAddress = (bind, 0) if bind and _family(bind) == family else None
        timeout = self.settings.connectTimeout
        if family == 6:
            return TCP6ClientEndpoint(self.reactor, destination.address, port, timeout, bindAddress)
        return TCP4ClientEndpoint(self.reactor, destination.address, port, timeout, bindAddress)

    async def _tryDestination(
        self,
        message: QueuedMessage,
        sent: list[str],
        body: MessageSource,
        domain: str,
        route: Route | None,
        destination: Destination,
        attempts: list[_Attempt],
    ) -> list[DeliveryResult] | None:
        """Results when this destination settled the delivery, None to go on."""
        port = destination.port
        where = _where(destination)
        try:
            endpoint = self.endpoint(destination, port, domain)
            result = await self._send(
                self.reactor,
                endpoint,
                self._options(domain, route, destination),
                _path(message.sender),
                sent,
                body,
                self.tlsCreator,
            )
        except Exception as e:  # a bug in the client: try the next host, and say so
            log.failure("SMTP client crashed delivering msg {msgid}", msgid=message.msgid)
            attempts.append(_Attempt(f"{where}: internal error {e!r}. (#4.3.0)", False, False))
            return None
        logFields = {
            "msgid": message.msgid,
            "host": destination.host,
            "ip": destination.address,
            "port": port,
            "tls": result.tls or "none",
        }
        if not result.connected:
            why = _connectReason(result.failure or "connection failed")
            attempts.append(_Attempt(f"{where}: {why}", result.permanent, False))
            log.info("remote msg {msgid}: {host} [{ip}]:{port} {reason}", reason=why, **logFields)
            return None
        greeting = result.greeting
        if greeting is None or not 200 <= greeting.code < 300:
            said = describeReply(greeting) if greeting else result.failure or "no greeting"
            perm = greeting is not None and greeting.code >= 500
            attempts.append(
                _Attempt(f"Connected to {where} but greeting failed. {said}", perm, True)
            )
            log.info(
                "remote msg {msgid}: {host} [{ip}] greeting: {reason}", reason=said, **logFields
            )
            return None
        mail = result.mail
        if mail is None:
            # EHLO refused, TLS failed, the peer's SIZE is too small, or the
            # connection died: the next host may do better.
            why = result.failure or f"Connected to {where} but the session failed. (#4.4.2)"
            attempts.append(_Attempt(_named(destination, why), result.permanent, True))
            log.info("remote msg {msgid}: {host} [{ip}] {reason}", reason=why, **logFields)
            return None
        return self._transactionResults(result, sent, where, destination, logFields)

    def _transactionResults(
        self,
        result: TransactionResult,
        sent: list[str],
        where: str,
        destination: Destination,
        logFields: dict[str, Any],
    ) -> list[DeliveryResult]:
        mail = result.mail
        assert mail is not None
        results: list[DeliveryResult]
        if mail.code >= 400:
            make = permanent if mail.code >= 500 else temporary
            text = f"{where} does not like the sender. {describeReply(mail)}"
            results = [make(text) for _ in sent]
        else:
            results = [
                self._recipientResult(result, i, where, destination) for i in range(len(sent))
            ]
        for rcpt, r in zip(sent, results, strict=True):
            log.info(
                "remote msg {msgid}: {rcpt_sent} via {host} [{ip}] tls {tls}: {outcome}: {text}",
                rcpt_sent=rcpt,
                outcome=r.outcome.value,
                text=r.text,
                **logFields,
            )
        return results

    def _recipientResult(
        self, result: TransactionResult, index: int, where: str, destination: Destination
    ) -> DeliveryResult:
        reply = result.recipients[index] if index < len(result.recipients) else None
        if reply is None:
            why = result.failure or f"Connected to {where} but connection died. (#4.4.2)"
            return temporary(_named(destination, why))
        if reply.code >= 500:
            return permanent(f"{where} does not like recipient. {describeReply(reply)}")
        if reply.code >= 400 or reply.code < 200:
            return temporary(f"{where} does not like recipient. {describeReply(reply)}")
        data = result.data
        if data is None:
            why = result.failure or f"Connected to {where} but connection died. (#4.4.2)"
            return temporary(_named(destination, why))
        if data.code >= 500:
            return permanent(f"{where} failed after I sent the message. {describeReply(data)}")
        if data.code >= 400 or data.code < 200:
            return temporary(f"{where} failed after I sent the message. {describeReply(data)}")
        return delivered(f"{destination.address} accepted message. {describeReply(data)}")


# -- our own addresses (P11) ---------------------------------------------------

ALWAYS_OURS = ("0.0.0.0/8", "::/128")
LOOPBACK = ("127.0.0.0/8", "::1/128")


def interfaceAddresses() -> set[str]:
    """This host's interface addresses, best effort and without DNS (Linux:
    SIOCGIFADDR per interface, /proc/net/if_inet6); empty where unavailable."""
    found: set[str] = set()
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(
                        s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15])
                    )
                except OSError:
                    continue  # no IPv4 address on this interface
                found.add(socket.inet_ntoa(packed[20:24]))
    except (OSError, ImportError, AttributeError):
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexa = line.split()[0]
                found.add(str(ipaddress.ip_address(bytes.fromhex(hexa))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def listenerAddresses(descriptions: Iterable[str]) -> tuple[set[str], set[int]]:
    """The interfaces and ports named by server endpoint strings ("tcp:25:interface=...")."""
    addresses: set[str] = set()
    ports: set[int] = set()
    for description in descriptions:
        parts = description.replace("\\:", "\0").split(":")
        if len(parts) < 2 or parts[0] not in ("tcp", "tcp6", "ssl"):
            continue
        positional = [p for p in parts[1:] if "=" not in p]
        named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        port = named.get("port", positional[0] if positional else "")
        if port.isdigit():
            ports.add(int(port))
        interface = named.get("interface", positional[2] if len(positional) > 2 else "")
        if interface:
            addresses.add(interface.replace("\0", ":"))
    return addresses, ports


def ownAddresses(
    ipme: Iterable[str], listeners: Iterable[str], remotePort: int = 25
) -> tuple[Callable[[], set[str]], tuple[str, ...]]:
    """P11's ipme, as ``MXResolver`` takes it: a function answering our
    addresses, and the networks that are always ours.

    Always: 0.0.0.0/8, ``::`` and the configured ``ipme``. When connecting
    to this host at the delivery port could reach us (port 25, or a port we
    listen on) also loopback, this host's interface addresses and our
    listeners' addresses; tests deliver to loopback servers on other ports.
    The addresses are found once, on first use.
    """
    listening, ports = listenerAddresses(listeners)
    loops = remotePort == 25 or remotePort in ports
    cached: list[set[str]] = []

    def addresses() -> set[str]:
        if not cached:
            found = set(ipme)
            if loops:
                found |= listening | interfaceAddresses()
            cached.append(found)
        return cached[0]

    return addresses, ALWAYS_OURS + (LOOPBACK if loops else ())
