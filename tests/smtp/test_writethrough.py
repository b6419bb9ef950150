"""writeNow: straight to a plain TCP socket, through transport.write otherwise."""

from __future__ import annotations

import socket
import ssl

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from qmailtx.smtp.tls import ServerTLS
from qmailtx.smtp.writethrough import writeNow
from qmailtx.testing import makeTestCertificate


class Capture(Protocol):
    def __init__(self, connected: Deferred[Protocol]) -> None:
        self.whenConnected = connected

    def connectionMade(self) -> None:
        self.whenConnected.callback(self)


class RealSocketTests(TestCase):
    async def connection(self) -> tuple[Protocol, socket.socket]:
        connected: Deferred[Protocol] = Deferred()
        factory = ServerFactory.forProtocol(lambda: Capture(connected))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
        self.addCleanup(client.close)
        server = await connected
        self.addCleanup(server.transport.loseConnection)  # type: ignore[union-attr]
        return server, client

    async def test_plainTcpIsWrittenAtOnce(self) -> None:
        server, client = await self.connection()
        transport = server.transport
        writeNow(transport, b"250 ok\r\n")
        self.assertEqual(transport._tempDataLen, 0)  # type: ignore[union-attr]
        self.assertEqual(transport.dataBuffer, b"")  # type: ignore[union-attr]
        client.settimeout(5)
        self.assertEqual(client.recv(100), b"250 ok\r\n")

    async def test_tlsTransportsAreLeftAlone(self) -> None:
        server, client = await self.connection()
        transport = server.transport
        written: list[bytes] = []
        transport.write = written.append  # type: ignore[union-attr,method-assign]
        transport.TLS = True  # type: ignore[union-attr]
        try:
            writeNow(transport, b"secret\r\n")
        finally:
            transport.TLS = False  # type: ignore[union-attr]
        self.assertEqual(written, [b"secret\r\n"])
        client.setblocking(False)
        await deferLater(reactor, 0.05, lambda: None)
        with self.assertRaises(BlockingIOError):
            client.recv(100)

    async def test_pendingBytesKeepTheirOrder(self) -> None:
        server, client = await self.connection()
        transport = server.transport
        transport.write(b"first ")  # type: ignore[union-attr]
        writeNow(transport, b"second\r\n")
        self.assertEqual(transport._tempDataLen, len(b"first second\r\n"))  # type: ignore[union-attr]
        client.settimeout(5)
        received = b""
        while not received.endswith(b"\r\n"):
            received += await deferLater(reactor, 0.01, client.recv, 100)
        self.assertEqual(received, b"first second\r\n")

    async def test_afterStartTLSWritesGoThroughTLS(self) -> None:
        """Once STARTTLS has begun, a reply written raw would break the client's
        TLS: it must go through the TLS layer, even before the handshake ends."""
        server, client = await self.connection()
        cert, key = makeTestCertificate(self.mktemp())
        tls = ServerTLS(cert, key)
        tls.load()
        transport = server.transport
        transport.startTLS(tls)  # type: ignore[union-attr]
        writeNow(transport, b"250 inside\r\n")
        self.assertEqual(transport.dataBuffer, b"")  # type: ignore[union-attr]

        def clientSide() -> bytes:
            context = ssl.create_default_context(cafile=cert)
            wrapped = context.wrap_socket(client, server_hostname="mx.test")
            received = b""
            while not received.endswith(b"\r\n"):
                received += wrapped.recv(100)
            return received

        self.assertEqual(await deferToThread(clientSide), b"250 inside\r\n")


class OtherTransportTests(SynchronousTestCase):
    def test_stringTransportGetsAWrite(self) -> None:
        transport = StringTransport()
        writeNow(transport, b"x\r\n")
        self.assertEqual(transport.value(), b"x\r\n")
