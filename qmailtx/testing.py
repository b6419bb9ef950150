"""Test kit for qmailtx and for programs that embed it.

- ``makeTestConfig(folder, toml="")``: a Config with data under ``folder``.
- ``RecordingFileSystem``: a FileSystem that logs every durable operation
  (and can be told to fail one), to prove write/fsync/link ordering.
- ``SMTPServerHarness``: an ESMTP server on a StringTransport with a
  MemoryReactorClock and a real on-disk queue run inline (no threads),
  optionally with an AUTH portal and a TLS context (the transport records
  ``startTLS`` calls instead of encrypting).
- ``makeTestCertificate(folder, host)``: a self-signed certificate and key.
- ``makeTestUsers(path, {address: password})`` and ``makeTestPortal(store)``:
  a user database with cheap password hashes, and the portal SMTP AUTH uses.
- ``MemoryZone(records)`` and ``startTestDNSServer(testCase, zone)``: a
  twisted.names server on 127.0.0.1 (UDP and TCP on one port) answering
  from memory, stopped when the test ends.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import authority, common, dns, server
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.config import Config, parseConfig
from qmailtx.connlimit import ConnectionLimiter
from qmailtx.domains import DomainTable
from qmailtx.fs import FileSystem
from qmailtx.policy.interfaces import IDataCheck, IRecipientCheck, ISenderCheck, ISMTPSession
from qmailtx.policy.relay import RelayControl
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.store import QueueStore, Runner, synchronousRunner
from qmailtx.smtp.factory import SMTPServerFactory, SMTPSettings
from qmailtx.smtp.server import ESMTPServer
from qmailtx.smtp.throttle import AuthThrottle
from qmailtx.smtp.tls import ServerTLS
from qmailtx.vdomain.checkers import makePortal
from qmailtx.vdomain.passwords import PasswordHasher
from qmailtx.vdomain.realm import MailRealm
from qmailtx.vdomain.records import Domain, User
from qmailtx.vdomain.sqlite import SQLiteUserStore


class ManualRunner:
    """A worker ``Runner`` whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., object], tuple[object, ...], Deferred[object]]] = []

    def __call__(self, f: Callable[..., object], *args: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self.pending.append((f, args, d))
        return d

    def runOne(self) -> None:
        f, args, d = self.pending.pop(0)
        d.callback(f(*args))

    def runAll(self) -> None:
        """Run what is queued now (not what those jobs queue in turn)."""
        for _ in range(len(self.pending)):
            self.runOne()


def makeTestConfig(folder: str, toml: str = "", me: str = "mx.test") -> Config:
    """Parse ``toml`` with data in ``folder/var``; ``[control] me`` defaults to ``me``."""
    if "me =" not in toml:
        if "[control]" in toml:
            toml = toml.replace("[control]", f'[control]\nme = "{me}"', 1)
        else:
            toml += f'\n[control]\nme = "{me}"\n'
    return parseConfig(toml, folder, source="test config")


class RecordingFileSystem(FileSystem):
    """Records ("op", detail) for every durable step into ``events``.

    ``failOn`` maps an operation name to an errno: the next call of that
    operation raises OSError(errno) (once, unless ``failAlways``).
    ``failAfter`` maps an operation name to how many of its calls succeed
    before ``failOn`` applies (so a test can fault the n-th fsync).
    """

    def __init__(self, events: list[tuple[str, str]] | None = None, anonymous: bool = True) -> None:
        super().__init__(anonymous)
        self.events: list[tuple[str, str]] = events if events is not None else []
        self.failOn: dict[str, int] = {}
        self.failAfter: dict[str, int] = {}
        self.failAlways = False
        self._fdPaths: dict[int, str] = {}

    def _maybeFail(self, op: str) -> None:
        code = self.failOn.get(op)
        if code is not None and self.failAfter.get(op, 0) > 0:
            self.failAfter[op] -= 1
        elif code is not None:
            if not self.failAlways:
                del self.failOn[op]
            raise OSError(code, os.strerror(code))

    def openExclusive(self, path: str) -> int:
        self._maybeFail("open")
        fd = super().openExclusive(path)
        self._fdPaths[fd] = path
        self.events.append(("open", path))
        return fd

    def openRead(self, path: str) -> int:
        self._maybeFail("openRead")
        return super().openRead(path)

    def openUpdate(self, path: str) -> int:
        fd = super().openUpdate(path)
        self._fdPaths[fd] = path
        return fd

    def openAnonymous(self, directory: str, fallbackName: str) -> tuple[int, str | None]:
        if self._anonymous:  # (else openExclusive checks, once per open)
            self._maybeFail("open")
        fd, name = super().openAnonymous(directory, fallbackName)
        if name is None:  # (a named file was recorded by openExclusive)
            self._fdPaths[fd] = os.path.join(directory, "(anonymous)")
            self.events.append(("open", self._fdPaths[fd]))
        return fd, name

    def linkInto(self, fd: int, name: str | None, target: str) -> None:
        self._maybeFail("link")
        super().linkInto(fd, name, target)
        self.events.append(("link", target))

    def write(self, fd: int, data: bytes | memoryview) -> None:
        self._maybeFail("write")
        super().write(fd, data)
        self.events.append(("write", self._fdPaths.get(fd, "?")))

    def copyRange(self, src: int, dst: int, offset: int, length: int) -> None:
        self._maybeFail("write")
        super().copyRange(src, dst, offset, length)
        self.events.append(("write", self._fdPaths.get(dst, "?")))

    def fsync(self, fd: int) -> None:
        self._maybeFail("fsync")
        super().fsync(fd)
        self.events.append(("fsync", self._fdPaths.get(fd, "?")))

    def fdatasync(self, fd: int) -> None:
        self._maybeFail("fsync")
        super().fdatasync(fd)
        self.events.append(("fsync", self._fdPaths.get(fd, "?")))

    def close(self, fd: int) -> None:
        super().close(fd)
        self._fdPaths.pop(fd, None)

    def link(self, src: str, dst: str) -> None:
        self._maybeFail("link")
        super().link(src, dst)
        self.events.append(("link", dst))

    def rename(self, src: str, dst: str) -> None:
        self._maybeFail("rename")
        super().rename(src, dst)
        self.events.append(("rename", dst))

    def unlink(self, path: str) -> None:
        super().unlink(path)
        self.events.append(("unlink", path))

    def fsyncDirectory(self, path: str) -> None:
        self._maybeFail("fsyncdir")
        super().fsyncDirectory(path)
        self.events.append(("fsyncdir", path))


class RecordingTransport(StringTransport):
    """A StringTransport that also logs ("reply", text) into a shared event list.

    ``startTLS`` is recorded (in ``tlsStarted`` and as a ("starttls", "")
    event) and sets ``TLS``; nothing is encrypted.
    """

    TLS = False

    def __init__(self, events: list[tuple[str, str]], peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.events = events
        self.tlsStarted: list[object] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.events.append(("reply", data.decode("utf-8", "replace").strip()))

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tlsStarted.append(contextFactory)
        self.TLS = True
        self.events.append(("starttls", ""))


class SMTPServerHarness:
    """One server connection over a StringTransport, queueing into ``folder``."""

    def __init__(
        self,
        folder: str,
        peerHost: str = "192.0.2.1",
        settings: dict[str, Any] | None = None,
        domains: Sequence[str] = ("mx.test", "localhost"),
        recipientChecks: Sequence[IRecipientCheck] | None = None,
        senderChecks: Sequence[ISenderCheck] = (),
        fs: FileSystem | None = None,
        events: list[tuple[str, str]] | None = None,
        dataChecks: Sequence[tuple[str, Callable[[ISMTPSession], IDataCheck]]] = (),
        portal: Portal | None = None,
        tls: ServerTLS | None = None,
        throttle: AuthThrottle | None = None,
        clock: MemoryReactorClock | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.events: list[tuple[str, str]] = events if events is not None else []
        self.disk = QueueDisk(os.path.join(folder, "queue"), fs)
        self.disk.create()
        self.store = QueueStore(self.disk, synchronousRunner)
        self.committed: list[QueuedMessage] = []
        self.store.addListener(self.committed.append)
        options: dict[str, Any] = {
            "me": "mx.test",
            "greeting": "mx.test",
            "envnoathost": "mx.test",
            "databytes": 10 * 1024 * 1024,
        }
        options.update(settings or {})
        self.settings = SMTPSettings(**options)
        if recipientChecks is None:
            table = DomainTable(frozenset(domains), frozenset(domains), {})
            recipientChecks = [RelayControl(table)]
        self.factory = SMTPServerFactory(
            self.clock,
            self.settings,
            self.store,
            senderChecks,
            recipientChecks,
            dataChecks,
            portal=portal,
            tls=tls,
            throttle=throttle,
            limiter=limiter,
        )
        self.transport = RecordingTransport(self.events, IPv4Address("TCP", peerHost, 40000))
        self.protocol: ESMTPServer = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def connect(self, peerHost: str = "192.0.2.1") -> tuple[ESMTPServer, RecordingTransport]:
        """One more connection to the same factory (same clock, queue, throttle)."""
        transport = RecordingTransport([], IPv4Address("TCP", peerHost, 40001))
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        return bytes(self.transport.value())

    def replies(self) -> list[str]:
        """Reply lines sent so far, CRLF removed."""
        return self.output().decode("utf-8", "replace").split("\r\n")[:-1]

    def codes(self) -> list[int]:
        """Final lines' codes, one per reply (continuation lines skipped)."""
        return [int(line[:3]) for line in self.replies() if len(line) > 3 and line[3] == " "]

    def clear(self) -> None:
        self.transport.clear()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def queuedFiles(self) -> list[str]:
        found: list[str] = []
        for root, _, files in os.walk(self.disk.messDir):
            found.extend(os.path.join(root, f) for f in files)
        return found

    def tmpFiles(self) -> list[str]:
        return os.listdir(self.disk.tmpDir)

    def messageBytes(self, message: QueuedMessage) -> bytes:
        return bytes(self.disk.readMessage(message, message.messageLength))


def makeTestCertificate(
    folder: str, host: str = "mx.test", serial: int | None = None, days: int = 30
) -> tuple[str, str]:
    """A self-signed certificate for ``host`` and 127.0.0.1 (ECDSA P-256, fast
    to make) in ``folder``: returns the paths of ``cert.pem`` and ``key.pem``."""
    os.makedirs(folder, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certPath = os.path.join(folder, "cert.pem")
    keyPath = os.path.join(folder, "key.pem")
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(keyPath, 0o600)
    return certPath, keyPath


def makeTestUsers(
    path: str, users: Mapping[str, str], clearPasswords: bool = True
) -> SQLiteUserStore:
    """A user database at ``path`` holding ``users`` (address -> password),
    their domains created as needed; cheap hashes, and with
    ``clearPasswords`` the clear secrets CRAM-MD5 needs."""
    store = SQLiteUserStore(path)
    hasher = PasswordHasher.cheap()
    for address, password in users.items():
        name, _, domain = address.lower().rpartition("@")
        if store.domain(domain) is None:
            store.addDomain(Domain(domain, clearPasswords=clearPasswords))
        store.addUser(
            User(
                name,
                domain,
                hasher.hashPassword(password),
                clearSecret=password if clearPasswords else None,
            )
        )
    return store


def makeTestPortal(
    store: SQLiteUserStore,
    runner: Runner = synchronousRunner,
    data: str = "/nonexistent",
    hashedSecrets: bool = True,
) -> Portal:
    """The portal ``makeMailService`` gives SMTP AUTH, over ``store`` with a cheap hasher."""
    return makePortal(
        store,
        runner,
        "smtp",
        MailRealm(store, data),
        hasher=PasswordHasher.cheap(),
        hashedSecrets=hashedSecrets,
    )


TEST_SOA = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", serial=1, minimum=60, expire=60)


class BrokenDNSName(Exception):
    """What a MemoryZone raises for its ``broken`` name: the server answers SERVFAIL."""


class MemoryZone(authority.FileAuthority):
    """The zone ``test`` from memory (FileAuthority without the file).

    ``records`` maps lower-case names to twisted.names records; a lookup of
    ``broken`` fails with BrokenDNSName (logged by the server, SERVFAIL).
    """

    def __init__(self, records: Mapping[bytes, Any], broken: bytes = b"broken.test") -> None:
        common.ResolverBase.__init__(self)
        self.soa = (b"test", TEST_SOA)  # type: ignore[assignment]
        self.records = records  # type: ignore[assignment]
        self.broken = broken
        self._cache: dict[Any, Any] = {}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        if name.lower() == self.broken:
            return fail(BrokenDNSName())
        return super()._lookup(name, cls, type, timeout)


def startTestDNSServer(
    testCase: SynchronousTestCase,
    zone: server.DNSServerFactory | Mapping[bytes, Any],
    reactor: Any = None,
) -> tuple[str, int]:
    """Serve ``zone`` (a DNSServerFactory, or records for a MemoryZone) on
    127.0.0.1, UDP and TCP on the same port, until ``testCase`` ends.

    Returns the server's ``(host, port)``.
    """
    if reactor is None:
        from twisted.internet import reactor
    factory = (
        zone
        if isinstance(zone, server.DNSServerFactory)
        else server.DNSServerFactory(authorities=[MemoryZone(zone)])
    )
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        break
    testCase.addCleanup(udp.stopListening)
    testCase.addCleanup(tcp.stopListening)
    return "127.0.0.1", int(port)
