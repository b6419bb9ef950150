"""makeMailService: the whole server as one MultiService, for twistd or any Twisted program.

Children, by name, in start order: ``workers`` (the thread pool for disk
work), ``domains`` (the user database's hosted domains, kept fresh),
``dns`` (the resolver for remote delivery), ``queue`` (the queue manager),
``trigger`` (wake-ups from qmailtx-queue), ``tls`` (the certificate,
reloaded on SIGHUP; only with ``[tls]``), then one service per listener
kind with endpoints: ``smtp``, ``submission``, ``smtps``, and ``pop3``
(POP3 and POP3S). Stopping runs in reverse: listeners close,
running deliveries finish, then the pool stops.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorCore,
    IReactorFromThreads,
    IReactorTime,
    IResolver,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from qmailtx.address import Address
from qmailtx.config import Config, ConfigError, ListenerConfig, dnsServers
from qmailtx.delivery.identity import ProgramUser, programIdentity, resolveProgramUser
from qmailtx.delivery.local import LocalDeliveryAgent, LocalSettings
from qmailtx.delivery.maildir import StaleTmpSweeper, makeMaildir
from qmailtx.delivery.mx import MXResolver, makeResolver
from qmailtx.delivery.remote import RemoteDeliveryAgent, RemoteSettings, ownAddresses
from qmailtx.delivery.routes import parseOutgoingIP, parseSmtpRoutes
from qmailtx.delivery.source import openQueuedMessage
from qmailtx.domains import DomainTable
from qmailtx.fs import FileSystem
from qmailtx.pop3.factory import POP3ServerFactory, POP3Settings
from qmailtx.queue.bounce import BounceSettings
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.filter import makeQueueFilter
from qmailtx.queue.manager import QueueManager, QueueSettings
from qmailtx.queue.store import QueueStore
from qmailtx.queue.trigger import triggerPath
from qmailtx.queue.triggerservice import QueueTriggerService
from qmailtx.registry import PolicyContext, Registry, RegistryError, makeRegistry, policyChain
from qmailtx.smtp.factory import SMTPServerFactory, SMTPSettings
from qmailtx.smtp.throttle import AuthThrottle
from qmailtx.smtp.tls import ServerTLS, TLSService
from qmailtx.vdomain.cache import CachedUserStore
from qmailtx.vdomain.checkers import makePortal
from qmailtx.vdomain.hosted import HostedDomains
from qmailtx.vdomain.realm import MailRealm
from qmailtx.vdomain.sqlite import SQLiteUserStore
from qmailtx.workers import WorkerPool

log = Logger()


class OrderedMultiService(MultiService):
    """A MultiService that stops its children one by one, last started first,
    each only after the one before has finished stopping (the queue manager
    needs the thread pool until its last delivery has been recorded)."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stopChildren())

    async def _stopChildren(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child.name)


class WorkerPoolService(Service):
    """Owns the worker threads that do queue and Maildir I/O."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class ProgramIdentityLog(Service):
    """Says once, after twistd dropped privileges, who |program deliveries run as."""

    def __init__(self, configured: ProgramUser) -> None:
        self.configured = configured

    def startService(self) -> None:
        super().startService()
        if programIdentity(self.configured) is not None:
            log.info(
                "|program deliveries run as program_user {user}",
                user=self.configured.describe(),
            )
        else:
            log.info(
                "|program deliveries run as the server's own user (uid {uid}, gid {gid});"
                " program_user applies only when running as root",
                uid=os.geteuid(),
                gid=os.getegid(),
            )


class DataLockService(Service):
    """Creates the data folder and holds ``<data>/lock`` so two servers never share it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._fd: int | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._lock()

    def startService(self) -> None:
        super().startService()
        self._lock()

    def _lock(self) -> None:
        if self._fd is not None:
            return
        prepareDataDirectory(self.config)
        path = os.path.join(self.config.paths.data, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{self.config.paths.data} is in use by another qmailtx process"
            ) from None
        self._fd = fd

    def stopService(self) -> None:
        super().stopService()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prepareDataDirectory(config: Config) -> None:
    """Create the data folder's layout and the postmaster@localhost mailbox (idempotent)."""
    fs = FileSystem()
    data = config.paths.data
    try:
        fs.makedirs(data)
        QueueDisk(os.path.join(data, "queue"), fs).create()
        makeMaildir(fs, os.path.join(data, "domains", "localhost", "postmaster", "Maildir"))
    except OSError as e:
        raise ConfigError(f"cannot set up data folder {data}: {e.strerror}") from e


def makeMailService(
    reactor: Any,
    config: Config,
    registry: Registry | None = None,
) -> MultiService:
    """Build the server. ``reactor`` must provide IReactorTime, IReactorFromThreads
    and IReactorCore (any real reactor does)."""
    assert IReactorTime.providedBy(reactor) and IReactorFromThreads.providedBy(reactor)
    assert IReactorCore.providedBy(reactor)
    control = config.control
    top = OrderedMultiService()
    top.setName("qmailtx")

    DataLockService(config).setServiceParent(top)

    pool = WorkerPool(reactor, config.queue.threads)
    workers = WorkerPoolService(pool)
    workers.setName("workers")
    workers.setServiceParent(top)
    runner = pool.run

    users = SQLiteUserStore(config.users.database)
    # Delivery and rcptcheck read through a cache valid for one generation of
    # the database; logins (checkers, realm, POP3) and HostedDomains ask it directly.
    cachedUsers = CachedUserStore(users)
    hosted = HostedDomains(users, runner, reactor)
    hosted.setName("domains")
    hosted.setServiceParent(top)

    queueRoot = os.path.join(config.paths.data, "queue")
    store = QueueStore(QueueDisk(queueRoot), runner, makeQueueFilter(reactor, config))
    domains = DomainTable.fromControl(control)

    def classify(recipient: Address) -> str:
        local = domains.isLocal(recipient.domain) or hosted.contains(recipient.domain)
        return "local" if local else "remote"

    def hostedAmong(names: frozenset[str]) -> frozenset[str]:
        """(worker thread) Those of ``names`` the user database hosts now."""
        return frozenset(n for n in names if cachedUsers.canonicalDomain(n) is not None)

    def confirmRemote(names: frozenset[str]) -> Deferred[frozenset[str]]:
        # The in-memory list lags qmailctl by up to a second, and is empty
        # until its first load: ask the database before mail goes remote.
        return runner(hostedAmong, names)

    programUser = config.delivery.programIdentity or resolveProgramUser(
        config.delivery.program_user
    )
    ProgramIdentityLog(programUser).setServiceParent(top)
    tmpSweeper = StaleTmpSweeper()  # one hourly sweep per Maildir: delivery and POP3
    local = LocalDeliveryAgent(
        runner,
        LocalSettings(
            data=config.paths.data,
            domains=domains,
            me=control.me,
            overQuota=config.delivery.over_quota,
            warnPercent=config.delivery.quota_warning_percent,
            delimiters=config.delivery.recipient_delimiter,
            programTimeout=config.delivery.program_timeout,
            timezone=config.timezone,
            verh=config.delivery.verh,
            programUser=programUser,
        ),
        cachedUsers,
        store,
        reactor,
        tmpSweeper=tmpSweeper,
    )
    remote = _makeRemote(reactor, config, store, runner, top)
    manager = QueueManager(
        reactor,
        store,
        {"local": local, "remote": remote},
        classify,
        QueueSettings(
            concurrency={"local": control.concurrencylocal, "remote": control.concurrencyremote},
            lifetime=control.queuelifetime,
            bounce=BounceSettings.fromControl(
                control, config.queue.bounce_body_bytes, config.timezone
            ),
        ),
        confirmRemote,
    )
    manager.setName("queue")
    manager.setServiceParent(top)
    # qmailtx-queue (a QMAILQUEUE filter's, or a local program's) wakes the manager.
    trigger = QueueTriggerService(reactor, triggerPath(queueRoot), store.arrived)
    trigger.setName("trigger")
    trigger.setServiceParent(top)

    extra = {
        "max_bad_recipients": config.smtp.max_bad_recipients,
        "dns_servers": dnsServers(config.dns) or None,
        # retries with growing waits, as twisted.names takes them: 1 s, then the rest
        "dns_timeout": (1, max(config.dns.timeout - 1, 1)),
    }
    registry = registry or makeRegistry(
        config, PolicyContext(config, reactor, runner, cachedUsers, hosted, extra)
    )
    tls = _makeTLS(config, runner)
    if tls is not None:
        tls.setServiceParent(top)  # before the listeners: it loads the files
    portal = makePortal(
        users,
        runner,
        "smtp",
        MailRealm(users, config.paths.data),
        hashedSecrets=config.smtp.cram_md5,
    )
    throttle = AuthThrottle(reactor)
    for listener in config.listeners:
        if listener.listen:
            _listen(
                reactor,
                config,
                listener,
                registry,
                store,
                portal,
                tls.tls if tls is not None else None,
                throttle,
            ).setServiceParent(top)

    if config.pop3.listen or config.pop3.tls_listen:
        _listenPOP3(
            reactor,
            config,
            users,
            runner,
            tls.tls if tls is not None else None,
            throttle,
            tmpSweeper,
        ).setServiceParent(top)

    _reportStartup(config)
    return top


def _listenPOP3(
    reactor: Any,
    config: Config,
    users: SQLiteUserStore,
    runner: Any,
    tls: ServerTLS | None,
    throttle: AuthThrottle,
    tmpSweeper: StaleTmpSweeper,
) -> MultiService:
    """The "pop3" service: ``[pop3] listen`` (STLS with ``[tls]``) and
    ``[pop3s] listen`` (TLS from the first byte)."""
    if config.pop3.tls_listen and tls is None:
        raise ConfigError(
            f"{config.source}: [pop3s] listen is set, but implicit TLS needs [tls] certificate"
            " and key"
        )
    portal = makePortal(
        users,
        runner,
        "pop3",
        MailRealm(users, config.paths.data),
        hashedSecrets=config.pop3.apop,
    )
    factory = POP3ServerFactory(
        reactor,
        POP3Settings.fromConfig(config),
        portal,
        runner,
        tls,
        throttle,
        users,
        tmpSweeper=tmpSweeper,
    )
    service = MultiService()
    service.setName("pop3")
    kinds: list[tuple[str, tuple[str, ...], IProtocolFactory]] = [
        ("pop3", config.pop3.listen, factory)
    ]
    if config.pop3.tls_listen:
        assert tls is not None
        implicit = TLSMemoryBIOFactory(tls, False, factory.withImplicitTLS(), clock=reactor)
        kinds.append(("pop3s", config.pop3.tls_listen, implicit))
    for name, descriptions, serving in kinds:
        for description in descriptions:
            try:
                endpoint = serverFromString(reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(
                    f"{config.source}: [{name}] listen: bad endpoint {description!r}: {e}"
                ) from e
            StreamServerEndpointService(endpoint, serving).setServiceParent(service)
    log.info(
        "POP3 on {listen}, POP3S on {tlsListen}; STLS {stls}; SASL {mechanisms}; APOP {apop}",
        listen=", ".join(config.pop3.listen) or "nothing",
        tlsListen=", ".join(config.pop3.tls_listen) or "nothing",
        stls="on" if tls is not None else "off",
        mechanisms=" ".join(factory.mechanisms(True)) or "none",
        apop="on" if factory.offersAPOP else "off",
    )
    return service


class ResolverService(Service):
    """Owns the process's DNS resolver (twisted.names) for remote delivery.

    The resolver is made at start, as one reading /etc/resolv.conf re-reads
    it on a timer, and that timer is cancelled at stop. Its lookups are
    offered here, so users can hold this service from the beginning.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._resolver: Any = None

    def _current(self) -> Any:
        if self._resolver is None:
            self._resolver = self._make()
        return self._resolver

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Any:
        return self._current().lookupMailExchange(name, timeout)

    def lookupAddress(self, name: str, timeout: Any = None) -> Any:
        return self._current().lookupAddress(name, timeout)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Any:
        return self._current().lookupIPV6Address(name, timeout)

    def startService(self) -> None:
        super().startService()
        self._current()

    def stopService(self) -> None:
        super().stopService()
        call = getattr(self._resolver, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()
        self._resolver = None


def _makeRemote(
    reactor: Any, config: Config, store: QueueStore, runner: Any, top: MultiService
) -> RemoteDeliveryAgent:
    """The remote channel: one MX resolver for the process, smtproutes, outgoingip."""
    control, remote = config.control, config.remote
    try:
        routes = parseSmtpRoutes(control.smtproutes)
    except ValueError as e:
        raise ConfigError(f"{config.source}: smtproutes: {e}") from e
    try:
        outgoing = parseOutgoingIP(control.outgoingip)
    except ValueError as e:
        raise ConfigError(f"{config.source}: outgoingip: {e}") from e
    timeout = (1, max(config.dns.timeout - 1, 1))
    listeners = [d for listener in config.listeners for d in listener.listen]
    ours, alwaysOurs = ownAddresses(remote.ipme, listeners, remote.port)
    dnsService = ResolverService(
        lambda: makeResolver(reactor, dnsServers(config.dns) or None, timeout)
    )
    dnsService.setName("dns")
    dnsService.setServiceParent(top)
    resolver = MXResolver(
        cast(IResolver, dnsService),  # the three lookups MXResolver uses
        reactor,
        ours,
        timeout,
        alwaysLocal=alwaysOurs,
        mxPort=remote.port,
    )
    return RemoteDeliveryAgent(
        reactor,
        lambda message: openQueuedMessage(runner, store.disk, message),
        runner,
        resolver.destinations,
        RemoteSettings(
            heloName=control.helohost,
            routes=routes,
            outgoing=outgoing,
            tls=remote.tls,
            tlsPolicy=dict(remote.tls_policy),
            perDomain=remote.concurrency_per_domain,
            replyTimeout=float(control.timeoutremote),
            connectTimeout=float(control.timeoutconnect),
            verh=config.delivery.verh,
        ),
    )


def _makeTLS(config: Config, runner: Any) -> TLSService | None:
    """The "tls" service for ``[tls]`` (None without a certificate)."""
    certificate, key = config.tls.certificate, config.tls.key
    if certificate is None:
        if key is not None:
            raise ConfigError(f"{config.source}: [tls] key is set but certificate is not")
        return None
    return TLSService(ServerTLS(certificate, key), runner)


def _listen(
    reactor: Any,
    config: Config,
    listener: ListenerConfig,
    registry: Registry,
    store: QueueStore,
    portal: Portal | None = None,
    tls: ServerTLS | None = None,
    throttle: AuthThrottle | None = None,
) -> MultiService:
    """One listener kind (smtp, submission, smtps): its policies and endpoints.

    With ``tls`` the smtp and submission listeners offer STARTTLS, and smtps
    speaks TLS from the first byte (it cannot run without it). ``portal``
    enables AUTH; ``throttle`` is shared by all listeners.
    """
    where = f"{config.source}: [{listener.name}]"
    if listener.implicitTLS and tls is None:
        raise ConfigError(
            f"{where} listen is set, but implicit TLS needs [tls] certificate and key"
        )
    if "relay" not in listener.policies:
        raise ConfigError(f'{where} policies must include "relay" (without it anyone could relay)')
    try:
        chain = policyChain(registry, listener.policies)
    except RegistryError as e:
        raise ConfigError(f"{where} policies: {e}") from e
    factory = SMTPServerFactory(
        reactor,
        SMTPSettings.fromConfig(config, listener),
        store,
        chain.senderChecks,
        chain.recipientChecks,
        chain.data,
        portal=portal,
        tls=tls,
        throttle=throttle,
    )
    serving: IProtocolFactory = factory
    if listener.implicitTLS:
        assert tls is not None
        serving = TLSMemoryBIOFactory(tls, False, factory, clock=reactor)
    service = MultiService()
    service.setName(listener.name)
    for description in listener.listen:
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{where} listen: bad endpoint {description!r}: {e}") from e
        StreamServerEndpointService(endpoint, serving).setServiceParent(service)
    log.info(
        "{listener} on {listen}: {policies}; {tls}; AUTH {auth}",
        listener=listener.name,
        listen=", ".join(listener.listen),
        policies=chain.describe(),
        tls="implicit TLS" if listener.implicitTLS else "STARTTLS" if tls else "no TLS",
        auth=" ".join(factory.auth.mechanisms) if factory.auth else "off",
    )
    return service


def _reportStartup(config: Config) -> None:
    log.info(
        "qmailtx: config {source}, data {data}, SMTP on {listen}, local domains {domains},"
        " user database {database}",
        source=config.source,
        data=config.paths.data,
        listen=", ".join(config.smtp.listen) or "nothing",
        domains=", ".join(config.control.locals),
        database=config.users.database,
    )
    for name in config.unusedControlFiles:
        log.warn(
            "control file {name} in {control} is not used by this version of qmailtx",
            name=name,
            control=config.paths.control,
        )
    listed = {name for listener in config.listeners for name in listener.policies}
    if config.control.mfcheck and "mfcheck" not in listed:
        log.warn(
            "control mfcheck is {level}, but no listener lists the mfcheck policy:"
            " sender domains are not checked",
            level=config.control.mfcheck,
        )
