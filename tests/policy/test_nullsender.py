"""A bounce has a single envelope recipient (P6)."""

from __future__ import annotations

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.address import Address
from qmailtx.domains import DomainTable
from qmailtx.policy.interfaces import IRecipientCheck
from qmailtx.policy.nullsender import NullSenderSingleRecipient
from qmailtx.policy.relay import RelayControl
from qmailtx.policy.verdict import VerdictKind
from qmailtx.registry import makeRegistry
from qmailtx.smtp.session import SMTPSession
from qmailtx.testing import SMTPServerHarness, makeTestConfig

REPLY = "553 5.7.1 sorry, bounce messages should have a single envelope recipient"
LOCAL = DomainTable(frozenset({"mx.test"}), frozenset({"mx.test"}), {})
A = Address("a", "mx.test")
B = Address("b", "mx.test")


def session(sender: Address, accepted: list[Address]) -> SMTPSession:
    s = SMTPSession("192.0.2.3", 4000, sessionId="s3")
    s.sender = sender
    s.recipients = list(accepted)
    return s


class NullSenderCheckTests(SynchronousTestCase):
    check = NullSenderSingleRecipient()

    def judge(self, sender: Address, accepted: list[Address], rcpt: Address) -> VerdictKind:
        return self.check.checkRecipient(session(sender, accepted), rcpt).kind

    def test_providesIRecipientCheck(self) -> None:
        self.assertTrue(verifyObject(IRecipientCheck, self.check))

    def test_firstRecipientOfABounceIsFine(self) -> None:
        self.assertIs(self.judge(Address.null(), [], A), VerdictKind.CONTINUE)

    def test_secondRecipientOfABounceIsRefused(self) -> None:
        verdict = self.check.checkRecipient(session(Address.null(), [A]), B)
        self.assertIs(verdict.kind, VerdictKind.REPLY)
        assert verdict.reply is not None
        self.assertEqual(verdict.reply.toBytes(), (REPLY + "\r\n").encode())

    def test_doubleBounceSenderCounts(self) -> None:
        self.assertIs(self.judge(Address("#", "[]"), [A], B), VerdictKind.REPLY)

    def test_sameRecipientAgainIsNotASecondOne(self) -> None:
        self.assertIs(
            self.judge(Address.null(), [A], Address("A", "MX.test")), VerdictKind.CONTINUE
        )

    def test_ordinarySenderMayHaveMany(self) -> None:
        self.assertIs(self.judge(Address("x", "y.test"), [A], B), VerdictKind.CONTINUE)

    def test_refusalIsLogged(self) -> None:
        with capturedLogs() as events:
            self.check.checkRecipient(session(Address.null(), [A]), B)
        [event] = events
        self.assertEqual(
            (event["policy"], event["rcpt"], event["peer"], event["code"]),
            ("nullsender", "b@mx.test", "192.0.2.3", 553),
        )

    def test_registered(self) -> None:
        registry = makeRegistry(makeTestConfig(self.mktemp()), names=["nullsender"])
        check = registry.getUtility(IRecipientCheck, name="nullsender")
        self.assertIsInstance(check, NullSenderSingleRecipient)


class NullSenderProtocolTests(SynchronousTestCase):
    def harness(self) -> SMTPServerHarness:
        checks = [NullSenderSingleRecipient(), RelayControl(LOCAL)]
        h = SMTPServerHarness(self.mktemp(), recipientChecks=checks)
        h.send(b"HELO c\r\n")
        h.clear()
        return h

    def test_bounceQueuedForTheFirstRecipientOnly(self) -> None:
        h = self.harness()
        h.send(
            b"MAIL FROM:<>\r\nRCPT TO:<a@mx.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\nbounce\r\n.\r\n"
        )
        self.assertEqual(h.codes(), [250, 250, 553, 354, 250])
        self.assertEqual(h.replies()[2], REPLY)
        [message] = h.committed
        self.assertEqual(message.recipients, [A])

    def test_ordinarySenderTwoRecipients(self) -> None:
        h = self.harness()
        h.send(b"MAIL FROM:<x@y.test>\r\nRCPT TO:<a@mx.test>\r\nRCPT TO:<b@mx.test>\r\n")
        self.assertEqual(h.codes(), [250, 250, 250])

    def test_newTransactionStartsAFreshCount(self) -> None:
        h = self.harness()
        h.send(b"MAIL FROM:<>\r\nRCPT TO:<a@mx.test>\r\nRSET\r\n")
        h.send(b"MAIL FROM:<>\r\nRCPT TO:<b@mx.test>\r\nRSET\r\n")
        h.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@mx.test>\r\n")
        self.assertEqual(h.codes(), [250, 250, 250, 250, 250, 250, 250, 250, 250])

    def test_recipientsRefusedByLaterChecksDoNotCount(self) -> None:
        h = self.harness()
        h.send(
            b"MAIL FROM:<>\r\nRCPT TO:<a@elsewhere.test>\r\nRCPT TO:<a@mx.test>\r\n"
            b"RCPT TO:<b@mx.test>\r\n"
        )
        self.assertEqual(h.codes(), [250, 553, 250, 553])
        self.assertEqual(h.replies()[3], REPLY)
