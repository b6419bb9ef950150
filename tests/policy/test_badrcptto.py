"""badrcptto (P9): listed recipients refused, the transaction goes on."""

from __future__ import annotations

from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.address import Address, parseMailbox
from qmailtx.domains import DomainTable
from qmailtx.policy.badmailfrom import listedSet
from qmailtx.policy.badrcptto import BadRcptTo
from qmailtx.policy.interfaces import IRecipientCheck
from qmailtx.policy.relay import RelayControl
from qmailtx.policy.verdict import CONTINUE, VerdictKind
from qmailtx.registry import makeRegistry
from qmailtx.smtp.session import SMTPSession
from qmailtx.testing import SMTPServerHarness, makeTestConfig

REPLY = "553 5.7.1 sorry, mail to that recipient is not accepted"
LISTED = listedSet(["spamtrap@example.com", "@old.example.com"])
LOCAL = frozenset({"example.com", "old.example.com", "mx.test"})


def session(relay: bool = False) -> SMTPSession:
    s = SMTPSession("192.0.2.9", 4000, sessionId="s2", clientRelay=relay)
    s.sender = Address("a", "sender.test")
    return s


class BadRcptToCheckTests(SynchronousTestCase):
    check = BadRcptTo(LISTED)

    def judge(self, text: str, relay: bool = False) -> VerdictKind:
        return self.check.checkRecipient(session(relay), parseMailbox(text)).kind

    def test_providesIRecipientCheck(self) -> None:
        self.assertTrue(verifyObject(IRecipientCheck, self.check))

    def test_specExamples(self) -> None:
        self.assertIs(self.judge("SpamTrap@Example.COM"), VerdictKind.REPLY)
        self.assertIs(self.judge("x@old.example.com"), VerdictKind.REPLY)
        self.assertIs(self.judge("X@OLD.example.COM"), VerdictKind.REPLY)
        self.assertIs(self.judge("x@example.com"), VerdictKind.CONTINUE)
        self.assertIs(self.judge("x@sub.old.example.com"), VerdictKind.CONTINUE)

    def test_replyText(self) -> None:
        verdict = self.check.checkRecipient(session(), Address("spamtrap", "example.com"))
        assert verdict.reply is not None
        self.assertEqual(verdict.reply.toBytes(), (REPLY + "\r\n").encode())

    def test_relayClientsAreRefusedToo(self) -> None:
        self.assertIs(self.judge("spamtrap@example.com", relay=True), VerdictKind.REPLY)

    def test_refusalIsLogged(self) -> None:
        with capturedLogs() as events:
            self.check.checkRecipient(session(), Address("x", "old.example.com"))
            self.assertIs(
                self.check.checkRecipient(session(), Address("x", "example.com")), CONTINUE
            )
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            (event["policy"], event["rcpt"], event["sender"], event["peer"], event["code"]),
            ("badrcptto", "x@old.example.com", "a@sender.test", "192.0.2.9", 553),
        )

    def test_registerReadsControlSetting(self) -> None:
        config = makeTestConfig(self.mktemp(), '[control]\nbadrcptto = ["Trap@Example.com"]\n')
        registry = makeRegistry(config, names=["badrcptto"])
        check = registry.getUtility(IRecipientCheck, name="badrcptto")
        assert isinstance(check, BadRcptTo)
        self.assertEqual(check.listed, frozenset({"trap@example.com"}))


class BadRcptToProtocolTests(SynchronousTestCase):
    def test_transactionContinuesForGoodRecipients(self) -> None:
        table = DomainTable(LOCAL, LOCAL, {})
        h = SMTPServerHarness(
            self.mktemp(), recipientChecks=[BadRcptTo(LISTED), RelayControl(table)]
        )
        h.clear()
        h.send(
            b"HELO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<SpamTrap@Example.COM>\r\n"
            b"RCPT TO:<x@old.example.com>\r\nRCPT TO:<x@example.com>\r\n"
            b"DATA\r\nhi\r\n.\r\n"
        )
        self.assertEqual(h.codes(), [250, 250, 553, 553, 250, 354, 250])
        self.assertEqual(h.replies()[2:4], [REPLY, REPLY])
        [message] = h.committed
        self.assertEqual(message.recipients, [Address("x", "example.com")])
