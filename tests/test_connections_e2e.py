"""Connection caps end to end on loopback sockets (S13).

127.0.0.0/8 is loopback, and loopback is exempt from the per-address cap,
so the per-address test serves a listener whose limiter exempts nobody
(passed in, as any collaborator); the total cap is tested through the
config and ``makeMailService``.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from typing import cast

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from qmailtx.connlimit import ConnectionLimiter
from qmailtx.smtp.factory import SMTPServerFactory
from qmailtx.testing import SMTPServerHarness, makeTestConfig
from tests.test_service import LISTEN, RunningServer

FLOOD = "127.0.0.2"
MESSAGE = b"Subject: still served\r\n\r\nhello\r\n"


def openRaw(port: int, source: str) -> tuple[socket.socket, bytes]:
    """A raw connection from ``source``: the socket and the first reply line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        reply += chunk
    return sock, reply


def atEOF(sock: socket.socket) -> bool:
    """The server closed the connection (and sent nothing more)."""
    return sock.recv(1024) == b""


def sendFrom(port: int, source: str, recipient: str) -> dict[str, object]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        return cast(dict[str, object], client.sendmail("a@example.org", [recipient], MESSAGE))


async def waitFor(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"still waiting for {what}")


class ConnectionCapEndToEndTests(TestCase):
    def setUp(self) -> None:
        try:
            socket.create_server((FLOOD, 0)).close()
        except OSError as e:
            raise SkipTest(f"cannot use {FLOOD}: {e}") from e

    def closeAll(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            sock.close()

    async def test_perAddressCapOnRealSockets(self) -> None:
        limiter = ConnectionLimiter(reactor, 0, 3)  # nobody exempt, loopback included
        h = SMTPServerHarness(self.mktemp(), limiter=limiter)
        factory: SMTPServerFactory = h.factory
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        listening: IListeningPort = await endpoint.listen(factory)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port  # type: ignore[attr-defined]
        socks: list[socket.socket] = []
        self.addCleanup(self.closeAll, socks)
        for _ in range(3):
            sock, greeting = await deferToThread(openRaw, port, FLOOD)
            socks.append(sock)
            self.assertEqual(greeting, b"220 mx.test ESMTP\r\n")
        extra, refused = await deferToThread(openRaw, port, FLOOD)
        socks.append(extra)
        self.assertEqual(
            refused,
            b"421 4.7.0 mx.test too many connections from your address, try again later\r\n",
        )
        self.assertTrue(await deferToThread(atEOF, extra))
        # Another address is served meanwhile.
        self.assertEqual(await deferToThread(sendFrom, port, "127.0.0.1", "u@mx.test"), {})
        # Closing some lets the flooding address in again.
        self.closeAll(socks[:2])
        await waitFor(lambda: limiter.count(FLOOD) == 1, "the closed sockets' release")
        self.assertEqual(await deferToThread(sendFrom, port, FLOOD, "u@mx.test"), {})
        self.assertEqual(len(h.committed), 2)

    async def test_totalCapFromTheConfig(self) -> None:
        config = makeTestConfig(self.mktemp(), LISTEN + "max_connections = 3\n")
        server = RunningServer(config)
        port = await server.start()
        self.addCleanup(server.stop)
        smtp = cast(MultiService, server.mail.getServiceNamed("smtp"))
        limiter = list(smtp)[0].factory.limiter
        socks: list[socket.socket] = []
        self.addCleanup(self.closeAll, socks)
        for _ in range(3):
            sock, greeting = await deferToThread(openRaw, port, FLOOD)
            socks.append(sock)
            self.assertTrue(greeting.startswith(b"220 "), greeting)
        extra, refused = await deferToThread(openRaw, port, "127.0.0.1")
        socks.append(extra)
        self.assertTrue(refused.startswith(b"421 4.3.2 "), refused)
        self.assertTrue(refused.endswith(b" too many connections, try again later\r\n"))
        self.assertTrue(await deferToThread(atEOF, extra))
        self.closeAll(socks[:1])
        await waitFor(lambda: limiter.total == 2, "the closed socket's release")
        self.assertEqual(await deferToThread(sendFrom, port, FLOOD, "postmaster@localhost"), {})
        await server.waitForMail("postmaster")
