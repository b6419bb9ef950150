"""POP3ServerFactory: what every POP3 connection of one instance shares.

The cred ``portal`` (service "pop3": vpopmail's NO_POP flag refuses), the
worker ``runner`` for Maildir scans and updates, the ``tls`` context for
STLS (None: no STLS; a POP3S listener wraps this factory in
``TLSMemoryBIOFactory`` and says so with ``implicitTLS``), the failed-login
``throttle`` (shared with SMTP AUTH: one guesser, one penalty), the user
store for quota limits, the cache of message sizes, and the connection
``limiter`` (POP3 and POP3S share one: ``[pop3] max_connections`` and
``max_connections_per_ip``, loopback exempt from the latter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from qmailtx.config import Config
from qmailtx.connlimit import ConnectionLimiter
from qmailtx.delivery.maildir import StaleTmpSweeper
from qmailtx.pop3.mailbox import SizeCache
from qmailtx.pop3.server import POP3Server
from qmailtx.queue.store import Runner
from qmailtx.smtp.auth import (
    ORDER,
    PLAINTEXT,
    CramMD5Exchange,
    Exchange,
    LoginExchange,
    PlainExchange,
    isLoopback,
)
from qmailtx.smtp.throttle import AuthThrottle
from qmailtx.smtp.tls import ServerTLS
from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.records import QuotaLimit

log = Logger()


@dataclass(frozen=True)
class POP3Settings:
    me: str
    timeout: float = 600  # RFC 1939: at least 10 minutes
    maxBadCommands: int = 20
    authBeforeTLS: bool = False
    implicitTLS: bool = False
    maxConnections: int = 500  # open POP3 and POP3S connections (0: no cap)
    maxConnectionsPerIP: int = 20  # from one client address or IPv6 /64; loopback exempt

    @classmethod
    def fromConfig(cls, config: Config) -> POP3Settings:
        return cls(
            me=config.control.me,
            timeout=config.pop3.timeout,
            maxBadCommands=config.pop3.max_bad_commands,
            authBeforeTLS=config.pop3.auth_before_tls,
            maxConnections=config.pop3.max_connections,
            maxConnectionsPerIP=config.pop3.max_connections_per_ip,
        )


class POP3ServerFactory(Factory):
    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        settings: POP3Settings,
        portal: Portal,
        runner: Runner,
        tls: ServerTLS | None = None,
        throttle: AuthThrottle | None = None,
        users: IUserStore | None = None,
        sizes: SizeCache | None = None,
        tmpSweeper: StaleTmpSweeper | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.portal = portal
        self.runner = runner
        self.tls = tls
        self.throttle = throttle if throttle is not None else AuthThrottle(clock)
        self.users = users
        self.sizes = sizes if sizes is not None else SizeCache()
        self.tmpSweeper = tmpSweeper if tmpSweeper is not None else StaleTmpSweeper()
        if limiter is None:
            limiter = ConnectionLimiter(
                clock,
                settings.maxConnections,
                settings.maxConnectionsPerIP,
                isLoopback,
                name="pop3",
            )
        self.limiter = limiter
        interfaces = set(portal.listCredentialsInterfaces())
        self.offersUSER = IUsernamePassword in interfaces
        self.offersAPOP = IUsernameHashedPassword in interfaces
        available = set(PLAINTEXT) if self.offersUSER else set()
        if self.offersAPOP:
            available.add("CRAM-MD5")
        self._mechanisms = tuple(name for name in ORDER if name in available)

    def withImplicitTLS(self) -> POP3ServerFactory:
        """The same factory for a POP3S listener (TLS from the first byte)."""
        twin = POP3ServerFactory(
            self.clock,
            replace(self.settings, implicitTLS=True),
            self.portal,
            self.runner,
            None,
            self.throttle,
            self.users,
            self.sizes,
            self.tmpSweeper,
            self.limiter,
        )
        return twin

    def buildProtocol(self, addr: IAddress | None) -> POP3Server:
        protocol = POP3Server(self)
        protocol.factory = self
        return protocol

    def plaintextAllowed(self, peerHost: str, secure: bool) -> bool:
        return secure or self.settings.authBeforeTLS or isLoopback(peerHost)

    def mechanisms(self, plaintextAllowed: bool) -> tuple[str, ...]:
        """SASL mechanisms to offer and accept (RFC 5034)."""
        return tuple(m for m in self._mechanisms if plaintextAllowed or m not in PLAINTEXT)

    def exchange(self, name: str) -> Exchange:
        if name == "PLAIN":
            return PlainExchange()
        if name == "LOGIN":
            return LoginExchange()
        if name == "CRAM-MD5":
            return CramMD5Exchange(self.settings.me, self.clock.seconds())
        raise KeyError(name)

    def quotaLimitFor(self, address: str) -> Callable[[], QuotaLimit | None]:
        """A blocking lookup of the user's quota, for the UPDATE in a worker thread."""
        users = self.users

        def lookup() -> QuotaLimit | None:
            if users is None:
                return None
            name, _, domain = address.rpartition("@")
            try:
                user = users.user(name, domain)
            except Exception:
                log.failure("quota lookup for {user} failed", user=address)
                return None
            return user.quota if user is not None else None

        return lookup
