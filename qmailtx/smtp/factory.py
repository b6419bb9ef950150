"""SMTPServerFactory: what every connection of one listener shares.

Besides the settings, the queue and the policy checks: the cred ``portal``
for AUTH (None: no AUTH), the ``tls`` context for STARTTLS (None: no
STARTTLS; an SMTPS listener wraps this factory in ``TLSMemoryBIOFactory``
with the same object), the failed-AUTH ``throttle``, which one instance
shares between its listeners, and the connection ``limiter``, which is this
factory's own: the smtp, submission and smtps listener groups are capped
separately.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory

from qmailtx.config import Config, IPNetwork, ListenerConfig
from qmailtx.connlimit import ConnectionLimiter
from qmailtx.policy.interfaces import IDataCheck, IRecipientCheck, ISenderCheck, ISMTPSession
from qmailtx.queue.store import QueueStore
from qmailtx.smtp.auth import SMTPAuthenticator, isLoopback
from qmailtx.smtp.server import ESMTPServer
from qmailtx.smtp.throttle import AuthThrottle
from qmailtx.smtp.tls import ServerTLS


@dataclass(frozen=True)
class SMTPSettings:
    me: str
    greeting: str
    envnoathost: str
    databytes: int = 0
    timeout: float = 1200
    maxRecipients: int = 1000
    maxBadCommands: int = 20
    maxCommandLine: int = 512
    maxHops: int = 100
    relayClients: tuple[IPNetwork, ...] = ()
    listener: str = "smtp"
    requireAuth: bool = False
    implicitTLS: bool = False
    authBeforeTLS: bool = False
    timezone: str = ""
    maxConnections: int = 500  # open connections to this listener group (0: no cap)
    maxConnectionsPerIP: int = 20  # from one client address or IPv6 /64 (0: no cap)
    dataTimeout: float = 1800  # seconds one message's DATA may take in all (0: no limit)

    @classmethod
    def fromConfig(cls, config: Config, listener: ListenerConfig | None = None) -> SMTPSettings:
        control = config.control
        listener = listener or config.listeners[0]
        return cls(
            me=control.me,
            greeting=control.smtpgreeting,
            envnoathost=control.envnoathost,
            databytes=control.databytes,
            timeout=control.timeoutsmtpd,
            maxRecipients=config.smtp.max_recipients,
            maxBadCommands=config.smtp.max_bad_commands,
            maxCommandLine=config.smtp.max_command_line,
            maxHops=config.smtp.max_hops,
            relayClients=config.smtp.relay_clients,
            listener=listener.name,
            requireAuth=listener.requireAuth,
            implicitTLS=listener.implicitTLS,
            authBeforeTLS=config.smtp.auth_before_tls,
            timezone=config.timezone,
            maxConnections=config.smtp.max_connections,
            maxConnectionsPerIP=config.smtp.max_connections_per_ip,
            dataTimeout=config.smtp.data_timeout,
        )

    def isRelayClient(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.relayClients)

    def isExemptFromClientCap(self, host: str) -> bool:
        """Relay clients and loopback may hold any number of connections
        (Postfix: ``smtpd_client_event_limit_exceptions = $mynetworks``)."""
        return isLoopback(host) or self.isRelayClient(host)


class SMTPServerFactory(Factory):
    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        settings: SMTPSettings,
        store: QueueStore,
        senderChecks: Sequence[ISenderCheck] = (),
        recipientChecks: Sequence[IRecipientCheck] = (),
        dataChecks: Sequence[tuple[str, Callable[[ISMTPSession], IDataCheck]]] = (),
        portal: Portal | None = None,
        tls: ServerTLS | None = None,
        throttle: AuthThrottle | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.store = store
        self.senderChecks = tuple(senderChecks)
        self.recipientChecks = tuple(recipientChecks)
        self.dataChecks = tuple(dataChecks)
        self.portal = portal
        self.auth = SMTPAuthenticator(portal, settings.me) if portal is not None else None
        self.tls = tls
        self.throttle = throttle if throttle is not None else AuthThrottle(clock)
        if limiter is None:
            limiter = ConnectionLimiter(
                clock,
                settings.maxConnections,
                settings.maxConnectionsPerIP,
                settings.isExemptFromClientCap,
                name=settings.listener,
            )
        self.limiter = limiter

    def buildProtocol(self, addr: IAddress | None) -> ESMTPServer:
        protocol = ESMTPServer(self)
        protocol.factory = self
        return protocol

    def authMechanisms(self, session: ISMTPSession) -> tuple[str, ...]:
        """The AUTH mechanisms this session may use: PLAIN and LOGIN only
        inside TLS, from loopback, or with ``auth_before_tls``."""
        if self.auth is None:
            return ()
        plaintextAllowed = (
            session.secure or self.settings.authBeforeTLS or isLoopback(session.peerHost)
        )
        return self.auth.offered(plaintextAllowed)

    def offersSTARTTLS(self, session: ISMTPSession) -> bool:
        return self.tls is not None and not session.secure

    def extensions(self, session: ISMTPSession) -> list[str]:
        """EHLO keywords after the greeting line, in qmail-toaster order."""
        lines = []
        mechanisms = " ".join(self.authMechanisms(session))
        if mechanisms:
            lines += [f"AUTH {mechanisms}", f"AUTH={mechanisms}"]
        if self.offersSTARTTLS(session):
            lines.append("STARTTLS")
        size = f"SIZE {self.settings.databytes}" if self.settings.databytes else "SIZE"
        return [*lines, size, "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
