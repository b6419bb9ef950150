"""Connection caps on the POP3 server (S13): -ERR [SYS/TEMP] and a hang-up past them."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.pop3.factory import POP3Settings
from tests.pop3.harness import ALICE, PASSWORD, POP3Harness

REFUSED = b"-ERR [SYS/TEMP] too many connections\r\n"
FLOOD = "192.0.2.66"


class POP3ConnectionCapTests(SynchronousTestCase):
    def harness(self, **settings: int) -> POP3Harness:
        return POP3Harness(self.mktemp(), settings=POP3Settings("pop.test", **settings))  # type: ignore[arg-type]

    def test_overThePerIPCapIsRefusedAndClosed(self) -> None:
        pop = self.harness(maxConnectionsPerIP=2)
        admitted = [pop.connect(FLOOD) for _ in range(2)]
        self.assertTrue(all(t.value().startswith(b"+OK pop.test") for _, t in admitted))
        server, transport = pop.connect(FLOOD)
        self.assertEqual(transport.value(), REFUSED)
        self.assertTrue(transport.disconnecting)
        transport.clear()
        server.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        self.assertEqual(transport.value(), b"")
        # Another address is served meanwhile.
        _, other = pop.connect("198.51.100.7")
        self.assertTrue(other.value().startswith(b"+OK pop.test"))

    def test_releaseOnConnectionLostLetsANewOneIn(self) -> None:
        pop = self.harness(maxConnectionsPerIP=1)
        first, _ = pop.connect(FLOOD)
        refused, transport = pop.connect(FLOOD)
        self.assertEqual(transport.value(), REFUSED)
        refused.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(pop.factory.limiter.count(FLOOD), 1)
        first.connectionLost(Failure(ConnectionDone()))
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((pop.factory.limiter.count(FLOOD), pop.factory.limiter.total), (0, 0))
        _, again = pop.connect(FLOOD)
        self.assertTrue(again.value().startswith(b"+OK pop.test"))

    def test_loopbackIsExemptFromThePerIPCap(self) -> None:
        pop = self.harness(maxConnectionsPerIP=1)
        for _ in range(3):
            server, transport = pop.login("127.0.0.1")
            self.assertFalse(transport.disconnecting)

    def test_totalCap(self) -> None:
        pop = self.harness(maxConnections=2)
        pop.connect("127.0.0.1")
        pop.connect("198.51.100.7")
        _, transport = pop.connect("192.0.2.1")
        self.assertEqual(transport.value(), REFUSED)

    def test_pop3sSharesTheLimiter(self) -> None:
        pop = self.harness()
        self.assertIs(pop.factory.withImplicitTLS().limiter, pop.factory.limiter)
