"""Connection caps on the SMTP server (S13): 421 and a hang-up past them."""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.smtp.server import ESMTPServer
from qmailtx.testing import RecordingTransport, SMTPServerHarness

PER_IP = "421 4.7.0 mx.test too many connections from your address, try again later\r\n"
TOTAL = "421 4.3.2 mx.test too many connections, try again later\r\n"
GREETING = b"220 mx.test ESMTP\r\n"
FLOOD = "192.0.2.66"


def lose(protocol: ESMTPServer) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


def _address(host: str) -> IPv4Address:
    if ":" in host:
        return IPv6Address("TCP", host, 40002)  # type: ignore[return-value]
    return IPv4Address("TCP", host, 40002)


class ConnectionCapTests(SynchronousTestCase):
    def harness(self, **settings: object) -> SMTPServerHarness:
        return SMTPServerHarness(self.mktemp(), peerHost=FLOOD, settings=settings)

    def test_overThePerIPCapGets421AndIsClosed(self) -> None:
        h = self.harness(maxConnectionsPerIP=3)
        kept = [h.connect(FLOOD) for _ in range(2)]
        self.assertEqual([t.value() for _, t in kept], [GREETING, GREETING])
        protocol, transport = h.connect(FLOOD)
        self.assertEqual(transport.value(), PER_IP.encode())
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        # Nothing it sends is read.
        transport.clear()
        protocol.dataReceived(b"HELO x\r\nMAIL FROM:<a@b.example>\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(h.clock.getDelayedCalls()), 3)  # the admitted ones' idle timers

    def test_anotherAddressIsServedMeanwhile(self) -> None:
        h = self.harness(maxConnectionsPerIP=1)
        h.connect(FLOOD)
        protocol, transport = h.connect("198.51.100.7")
        self.assertEqual(transport.value(), GREETING)
        transport.clear()
        protocol.dataReceived(
            b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\nx\r\n.\r\n"
        )
        self.assertEqual(len(h.committed), 1)

    def test_releaseOnConnectionLostLetsANewOneIn(self) -> None:
        h = self.harness(maxConnectionsPerIP=1)
        self.assertEqual(h.connect(FLOOD)[1].value(), PER_IP.encode())
        lose(h.protocol)
        self.assertEqual(h.factory.limiter.count(FLOOD), 0)
        protocol, transport = h.connect(FLOOD)
        self.assertEqual(transport.value(), GREETING)
        self.assertEqual(h.factory.limiter.count(FLOOD), 1)

    def test_refusedConnectionReleasesNothing(self) -> None:
        h = self.harness(maxConnectionsPerIP=1)
        refused, _ = h.connect(FLOOD)
        lose(refused)
        lose(refused)
        self.assertEqual((h.factory.limiter.count(FLOOD), h.factory.limiter.total), (1, 1))
        lose(h.protocol)
        lose(h.protocol)
        self.assertEqual((h.factory.limiter.count(FLOOD), h.factory.limiter.total), (0, 0))

    def test_relayClientsAreExempt(self) -> None:
        h = SMTPServerHarness(
            self.mktemp(),
            peerHost="10.1.2.3",
            settings={
                "maxConnectionsPerIP": 1,
                "relayClients": (ipaddress.ip_network("10.0.0.0/8"),),
            },
        )
        for _ in range(5):
            self.assertEqual(h.connect("10.1.2.3")[1].value(), GREETING)

    def test_loopbackIsExempt(self) -> None:
        h = SMTPServerHarness(
            self.mktemp(), peerHost="127.0.0.1", settings={"maxConnectionsPerIP": 1}
        )
        for host in ["127.0.0.1", "127.0.0.1", "::1", "::1"]:
            protocol = h.factory.buildProtocol(None)
            transport = RecordingTransport([], _address(host))
            protocol.makeConnection(transport)
            self.assertEqual(transport.value(), GREETING)

    def test_totalCapAppliesToEveryone(self) -> None:
        h = SMTPServerHarness(self.mktemp(), peerHost="127.0.0.1", settings={"maxConnections": 2})
        self.assertEqual(h.connect("198.51.100.7")[1].value(), GREETING)
        protocol, transport = h.connect("127.0.0.1")
        self.assertEqual(transport.value(), TOTAL.encode())
        self.assertTrue(transport.disconnecting)
        lose(h.protocol)
        self.assertEqual(h.connect("192.0.2.1")[1].value(), GREETING)

    def test_ipv6SubscriberCountedPerSlash64(self) -> None:
        h = SMTPServerHarness(
            self.mktemp(), peerHost="192.0.2.1", settings={"maxConnectionsPerIP": 1}
        )
        first = RecordingTransport([], _address("2001:db8:5:6::1"))
        h.factory.buildProtocol(None).makeConnection(first)
        second = RecordingTransport([], _address("2001:db8:5:6::2"))
        h.factory.buildProtocol(None).makeConnection(second)
        self.assertEqual((first.value(), second.value()), (GREETING, PER_IP.encode()))
