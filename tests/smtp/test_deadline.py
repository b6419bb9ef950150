"""The total DATA deadline (S12): a trickling client is cut off, nothing queued."""

from __future__ import annotations

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.testing import SMTPServerHarness

ENVELOPE = b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"


class DataDeadlineTests(SynchronousTestCase):
    def harness(self, **settings: object) -> SMTPServerHarness:
        return SMTPServerHarness(self.mktemp(), settings=settings)

    def test_tricklingDataIsCutOffAtTheDeadline(self) -> None:
        h = self.harness()  # idle timeout 1200 s, DATA deadline 1800 s
        h.send(ENVELOPE)
        h.clear()
        elapsed = 0
        with capturedLogs() as events:
            while not h.closed:
                h.send(b"x")
                h.clock.advance(299)
                elapsed += 299
        # Never idle for 1200 s, yet cut off at 1800 s, during the 7th wait.
        self.assertEqual(elapsed, 299 * 7)
        self.assertEqual(h.replies(), ["451 4.4.2 timeout"])
        self.assertEqual(h.committed, [])
        self.assertEqual(h.queuedFiles(), [])
        self.assertEqual(h.tmpFiles(), [])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        [event] = [e for e in events if "seconds" in e]
        self.assertEqual((event["peer"], event["seconds"]), ("192.0.2.1", 1800))

    def test_configuredDeadline(self) -> None:
        h = self.harness(dataTimeout=60)
        h.send(ENVELOPE + b"Subject: slow\r\n")
        h.clear()
        h.clock.advance(59)
        self.assertFalse(h.closed)
        h.send(b"more\r\n")
        h.clock.advance(1)
        self.assertEqual(h.replies(), ["451 4.4.2 timeout"])
        self.assertTrue(h.closed)
        self.assertEqual(h.committed, [])
        self.assertEqual(h.tmpFiles(), [])

    def test_zeroMeansNoDeadline(self) -> None:
        h = self.harness(dataTimeout=0)
        h.send(ENVELOPE)
        for _ in range(20):
            h.send(b"x")
            h.clock.advance(299)
        h.send(b"\r\n.\r\n")
        self.assertEqual(len(h.committed), 1)

    def test_normalDataUnaffected(self) -> None:
        h = self.harness(dataTimeout=60)
        for _ in range(3):
            h.clear()
            h.send(ENVELOPE + b"Subject: quick\r\n\r\nbody\r\n")
            h.clock.advance(59)
            h.send(b".\r\n")
            self.assertRegex(h.replies()[-1], r"^250 2\.0\.0 ok ")
            # The deadline went with the message: only the idle timer is left.
            h.clock.advance(59)
            h.send(b"NOOP\r\n")
            self.assertEqual(len(h.clock.getDelayedCalls()), 1)
            self.assertFalse(h.closed)
        self.assertEqual(len(h.committed), 3)

    def test_droppedConnectionCancelsTheDeadline(self) -> None:
        h = self.harness()
        h.send(ENVELOPE + b"partial")
        h.transport.loseConnection()
        h.protocol.connectionLost()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.tmpFiles(), [])
