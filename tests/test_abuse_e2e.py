"""Abusive clients on real loopback sockets do not hurt the others.

threats.md S11 (a junk-command flood is cut off, SMTP and POP3), S12 (a
client trickling DATA a byte a second is cut off at ``data_timeout`` with
nothing queued) and S13 (hundreds of abandoned connections, then released).
Meanwhile, and afterwards, smtplib and poplib clients are served normally.
"""

from __future__ import annotations

import os
import poplib
import socket
from typing import cast

from twisted.application.service import MultiService
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from qmailtx.connlimit import ConnectionLimiter
from qmailtx.testing import makeTestConfig
from qmailtx.vdomain.passwords import hashPassword
from qmailtx.vdomain.records import Domain, User
from qmailtx.vdomain.sqlite import SQLiteUserStore
from tests.test_connections_e2e import waitFor
from tests.test_duplicates_e2e import queuedFiles, waitForHosted
from tests.test_service import LISTEN, RunningServer, send

MAX_BAD = 5
DATA_TIMEOUT = 3
FLOOD = 300
PASSWORD = "s3cret pass"
MESSAGE = b"From: bob@remote.test\r\nSubject: served\r\n\r\nStill here.\r\n"
CONFIG = (
    LISTEN
    + f"max_bad_commands = {MAX_BAD}\ndata_timeout = {DATA_TIMEOUT}\n"
    + '[pop3]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
    + f"max_bad_commands = {MAX_BAD}\n"
)


class RawClient:
    """A blocking socket that reads whole reply lines (call it in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def line(self) -> bytes:
        """The next line without its CRLF; b"" at the end of the connection."""
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        return self.line()

    def atEOF(self) -> bool:
        return self.line() == b"" and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def deliver(port: int) -> dict[str, object]:
    """One smtplib message to postmaster@localhost; the refused recipients."""
    return send(port, "bob@remote.test", ["postmaster@localhost"], MESSAGE)


def popStat(port: int) -> tuple[int, int]:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user("alice@example.com")
        client.pass_(PASSWORD)
        return client.stat()
    finally:
        client.quit()


class AbuseTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        config = makeTestConfig(self.mktemp(), CONFIG)
        os.makedirs(config.paths.data)
        store = SQLiteUserStore(config.users.database)
        store.addDomain(Domain("example.com"))
        store.addUser(User("alice", "example.com", passwordHash=hashPassword(PASSWORD)))
        store.close()
        self.server = RunningServer(config)
        self.port = await self.server.start()
        self.addCleanup(self.server.stop)
        await waitForHosted(self.server, "example.com")
        pop3 = list(cast(MultiService, self.server.mail.getServiceNamed("pop3")))[0]
        listening: IListeningPort = await pop3._waitingForPort
        self.pop3 = int(listening.getHost().port)  # type: ignore[attr-defined]
        smtp = list(cast(MultiService, self.server.mail.getServiceNamed("smtp")))[0]
        self.limiter: ConnectionLimiter = smtp.factory.limiter

    def raw(self, port: int) -> RawClient:
        client = RawClient(port)
        self.addCleanup(client.close)
        return client

    async def waitForEmptyQueue(self) -> None:
        data = self.server.config.paths.data
        await waitFor(lambda: not queuedFiles(data), "an empty queue")

    async def test_smtpJunkFloodIsCutOffAndOthersAreServed(self) -> None:
        junk = self.raw(self.port)
        self.assertTrue((await deferToThread(junk.line)).startswith(b"220 "))
        replies = [await deferToThread(junk.command, b"XJUNK %d" % i) for i in range(2)]
        # Meanwhile another client delivers.
        self.assertEqual(await deferToThread(deliver, self.port), {})
        for i in range(2, MAX_BAD + 5):
            reply = await deferToThread(junk.command, b"XJUNK %d" % i)
            replies.append(reply)
            if not reply.startswith(b"502 "):
                break
        self.assertEqual(len(replies), MAX_BAD)
        self.assertEqual(replies[:-1], [b"502 5.5.1 unimplemented"] * (MAX_BAD - 1))
        self.assertEqual(replies[-1], b"421 4.7.0 mx.test too many errors")
        self.assertTrue(await deferToThread(junk.atEOF))
        # And afterwards.
        self.assertEqual(await deferToThread(deliver, self.port), {})
        self.assertEqual(len(await self.server.waitForMail("postmaster", 2)), 2)

    async def test_pop3JunkFloodIsCutOffAndOthersAreServed(self) -> None:
        self.assertEqual(
            await deferToThread(send, self.port, "bob@remote.test", ["alice@example.com"], MESSAGE),
            {},
        )
        await self.server.waitForMail("alice", domain="example.com")
        junk = self.raw(self.pop3)
        self.assertTrue((await deferToThread(junk.line)).startswith(b"+OK"))
        replies = [await deferToThread(junk.command, b"XJUNK %d" % i) for i in range(2)]
        self.assertEqual((await deferToThread(popStat, self.pop3))[0], 1)
        for i in range(2, MAX_BAD + 5):
            reply = await deferToThread(junk.command, b"XJUNK %d" % i)
            replies.append(reply)
            if reply == b"" or b"too many" in reply:
                break
        self.assertEqual(replies[:-1], [b"-ERR unimplemented"] * (MAX_BAD - 1))
        self.assertEqual(replies[-1], b"-ERR too many bad commands, closing connection")
        self.assertTrue(await deferToThread(junk.atEOF))
        self.assertEqual((await deferToThread(popStat, self.pop3))[0], 1)

    async def test_tricklingDataTimesOutWhileOthersDeliver(self) -> None:
        trickler = self.raw(self.port)

        def start() -> list[bytes]:
            replies = [trickler.line()]
            for text in (b"HELO slow.example", b"MAIL FROM:<slow@remote.test>"):
                replies.append(trickler.command(text))
            replies.append(trickler.command(b"RCPT TO:<postmaster@localhost>"))
            replies.append(trickler.command(b"DATA"))
            return replies

        def trickle() -> tuple[int, bytes]:
            """A byte a second until the server answers; the bytes sent and the answer."""
            trickler.sock.settimeout(1)
            sent = 0
            for _ in range(10 * DATA_TIMEOUT):
                try:
                    trickler.sock.sendall(b"x")
                    sent += 1
                except OSError:
                    break
                try:
                    chunk = trickler.sock.recv(4096)
                except TimeoutError:
                    continue
                trickler.buffer += chunk
                break
            trickler.sock.settimeout(10)
            return sent, trickler.line()

        replies = await deferToThread(start)
        self.assertEqual([r[:4] for r in replies], [b"220 ", b"250 ", b"250 ", b"250 ", b"354 "])
        trickling = deferToThread(trickle)
        # Another client's message is accepted while the trickler is connected.
        self.assertEqual(await deferToThread(deliver, self.port), {})
        self.assertFalse(trickling.called, "the trickler was cut off before the other delivered")
        [mail] = await self.server.waitForMail("postmaster")
        self.assertTrue(mail.endswith(b"Subject: served\n\nStill here.\n"))
        sent, answer = await trickling
        self.assertGreater(sent, 1)
        self.assertEqual(answer, b"451 4.4.2 timeout")
        self.assertTrue(await deferToThread(trickler.atEOF))
        # Nothing of the trickled message was queued or delivered.
        await self.waitForEmptyQueue()
        self.assertEqual(len(await self.server.waitForMail("postmaster")), 1)
        self.assertEqual(
            os.listdir(os.path.join(self.server.config.paths.data, "queue", "tmp")), []
        )

    async def test_abandonedConnectionsDoNotWedgeTheServer(self) -> None:
        before = self.limiter.total
        socks: list[socket.socket] = []

        def closeAll() -> None:
            for sock in socks:
                sock.close()

        self.addCleanup(closeAll)

        def flood() -> None:
            for _ in range(FLOOD):
                socks.append(socket.create_connection(("127.0.0.1", self.port), timeout=10))

        await deferToThread(flood)
        await waitFor(lambda: self.limiter.total == before + FLOOD, "the flood's connections")
        # A fresh client still gets its banner and delivers.
        fresh = self.raw(self.port)
        self.assertTrue((await deferToThread(fresh.line)).startswith(b"220 mx.test "))
        self.assertTrue((await deferToThread(fresh.command, b"QUIT")).startswith(b"221 "))
        self.assertEqual(await deferToThread(deliver, self.port), {})
        await self.server.waitForMail("postmaster")
        closeAll()
        await waitFor(lambda: self.limiter.total == before, "the abandoned connections' release")
