"""ConnectionLimiter: open connections per client key and in total (S13)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.connlimit import Admission, ConnectionLimiter


class ConnectionLimiterTests(SynchronousTestCase):
    def test_perClientCapRefusesOnlyThatClient(self) -> None:
        limiter = ConnectionLimiter(Clock(), 10, 2)
        self.assertIs(limiter.acquire("192.0.2.1"), Admission.ADMITTED)
        self.assertIs(limiter.acquire("192.0.2.1"), Admission.ADMITTED)
        self.assertIs(limiter.acquire("192.0.2.1"), Admission.TOO_MANY_FROM_CLIENT)
        self.assertIs(limiter.acquire("192.0.2.2"), Admission.ADMITTED)
        self.assertEqual((limiter.count("192.0.2.1"), limiter.total), (2, 3))

    def test_releaseLetsANewOneIn(self) -> None:
        limiter = ConnectionLimiter(Clock(), 10, 1)
        self.assertTrue(limiter.acquire("192.0.2.1"))
        self.assertFalse(limiter.acquire("192.0.2.1"))
        limiter.release("192.0.2.1")
        self.assertEqual((limiter.count("192.0.2.1"), limiter.total), (0, 0))
        self.assertTrue(limiter.acquire("192.0.2.1"))

    def test_totalCapCountsEveryone(self) -> None:
        limiter = ConnectionLimiter(Clock(), 2, 0, exempt=lambda host: True)
        self.assertTrue(limiter.acquire("192.0.2.1"))
        self.assertTrue(limiter.acquire("127.0.0.1"))
        self.assertIs(limiter.acquire("198.51.100.7"), Admission.TOO_MANY_IN_TOTAL)
        limiter.release("127.0.0.1")
        self.assertTrue(limiter.acquire("198.51.100.7"))

    def test_zeroMeansNoCap(self) -> None:
        limiter = ConnectionLimiter(Clock(), 0, 0)
        for _ in range(1000):
            self.assertTrue(limiter.acquire("192.0.2.1"))
        self.assertEqual(limiter.total, 1000)

    def test_exemptClientsSkipThePerClientCap(self) -> None:
        limiter = ConnectionLimiter(Clock(), 10, 1, exempt=lambda host: host == "192.0.2.9")
        self.assertTrue(limiter.acquire("192.0.2.9"))
        self.assertTrue(limiter.acquire("192.0.2.9"))
        self.assertEqual(limiter.total, 2)
        self.assertTrue(limiter.acquire("192.0.2.1"))
        self.assertFalse(limiter.acquire("192.0.2.1"))

    def test_ipv6CountedPerSlash64(self) -> None:
        limiter = ConnectionLimiter(Clock(), 10, 2)
        self.assertTrue(limiter.acquire("2001:db8:1:2::1"))
        self.assertTrue(limiter.acquire("2001:db8:1:2::ffff:1"))
        self.assertFalse(limiter.acquire("2001:db8:1:2:abcd::7"))
        self.assertTrue(limiter.acquire("2001:db8:1:3::1"))

    def test_ipv4MappedCountsAsTheIPv4Address(self) -> None:
        limiter = ConnectionLimiter(Clock(), 10, 1)
        self.assertTrue(limiter.acquire("::ffff:192.0.2.1"))
        self.assertFalse(limiter.acquire("192.0.2.1"))

    def test_unmatchedReleaseIsIgnored(self) -> None:
        limiter = ConnectionLimiter(Clock(), 10, 2)
        with capturedLogs() as events:
            limiter.release("192.0.2.1")
        self.assertEqual((limiter.total, limiter.count("192.0.2.1")), (0, 0))
        self.assertEqual(len(events), 1)

    def test_refusalsLoggedAtMostOncePerSecondPerClient(self) -> None:
        clock = Clock()
        limiter = ConnectionLimiter(clock, 10, 1, name="smtp")
        limiter.acquire("192.0.2.1")
        limiter.acquire("192.0.2.2")
        with capturedLogs() as events:
            for _ in range(50):
                limiter.acquire("192.0.2.1")
            limiter.acquire("192.0.2.2")
            clock.advance(1)
            limiter.acquire("192.0.2.1")
        self.assertEqual(
            [(e["peer"], e["unlogged"], e["reason"]) for e in events],
            [
                ("192.0.2.1", 0, Admission.TOO_MANY_FROM_CLIENT.value),
                ("192.0.2.2", 0, Admission.TOO_MANY_FROM_CLIENT.value),
                ("192.0.2.1", 49, Admission.TOO_MANY_FROM_CLIENT.value),
            ],
        )
        self.assertEqual({e["listener"] for e in events}, {"smtp"})
        self.assertEqual({e["log_level"].name for e in events}, {"info"})

    def test_logTableStaysBounded(self) -> None:
        clock = Clock()
        limiter = ConnectionLimiter(clock, 1, 0)
        limiter.acquire("192.0.2.1")
        with capturedLogs():
            for i in range(10000):
                limiter.acquire(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        self.assertLessEqual(len(limiter._logged), 4096)
