"""A POP3 server on a StringTransport over a real Maildir, for the protocol tests."""

from __future__ import annotations

import hashlib
import os

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.pop3.factory import POP3ServerFactory, POP3Settings
from qmailtx.pop3.server import POP3Server
from qmailtx.queue.store import synchronousRunner
from qmailtx.smtp.tls import ServerTLS
from qmailtx.testing import RecordingTransport, makeTestUsers
from qmailtx.vdomain.checkers import makePortal
from qmailtx.vdomain.passwords import PasswordHasher
from qmailtx.vdomain.realm import MailRealm

ALICE, PASSWORD = "alice@example.org", "alice-Secr3t"


class POP3Harness:
    def __init__(
        self,
        folder: str,
        apop: bool = True,
        tls: bool = False,
        settings: POP3Settings | None = None,
    ) -> None:
        os.makedirs(folder, exist_ok=True)
        self.data = os.path.join(folder, "data")
        self.users = makeTestUsers(os.path.join(folder, "users.sqlite"), {ALICE: PASSWORD})
        self.maildir = os.path.join(self.data, "domains", "example.org", "alice", "Maildir")
        makeMaildir(FileSystem(), self.maildir)
        portal = makePortal(
            self.users,
            synchronousRunner,
            "pop3",
            MailRealm(self.users, self.data),
            hasher=PasswordHasher.cheap(),
            hashedSecrets=apop,
        )
        self.clock = MemoryReactorClock()
        self.tls = ServerTLS("/nonexistent") if tls else None
        self.factory = POP3ServerFactory(
            self.clock,
            settings or POP3Settings("pop.test"),
            portal,
            synchronousRunner,
            self.tls,
            users=self.users,
        )
        self._count = 0
        self.events: list[tuple[str, str]] = []

    def deliver(self, data: bytes, subdir: str = "new", name: str | None = None) -> str:
        self._count += 1
        name = name or f"17000000{self._count:02d}.M1P1Q{self._count}.pop.test,S={len(data)}"
        path = os.path.join(self.maildir, subdir, name)
        with open(path, "wb") as f:
            f.write(data)
        stamp = 1_700_000_000 + self._count
        os.utime(path, (stamp, stamp))
        return name

    def connect(self, host: str = "192.0.2.1") -> tuple[POP3Server, RecordingTransport]:
        server = self.factory.buildProtocol(None)
        transport = RecordingTransport(self.events, IPv4Address("TCP", host, 4321))
        server.makeConnection(transport)
        return server, transport

    def login(self, host: str = "127.0.0.1") -> tuple[POP3Server, RecordingTransport]:
        server, transport = self.connect(host)
        server.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        assert b"+OK maildrop" in transport.value(), transport.value()
        transport.clear()
        return server, transport

    def files(self, subdir: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.maildir, subdir)))


def apopDigest(greeting: bytes, secret: str) -> str:
    timestamp = greeting[greeting.index(b"<") : greeting.index(b">") + 1]
    return hashlib.md5(timestamp + secret.encode()).hexdigest()  # noqa: S324 (APOP is MD5)
