"""badmailfrom: listed senders refused at every RCPT, each hit logged (P23)."""

from __future__ import annotations

from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.address import Address
from qmailtx.domains import DomainTable
from qmailtx.policy.badmailfrom import BadMailFrom, listedSet
from qmailtx.policy.interfaces import IRecipientCheck
from qmailtx.policy.relay import RelayControl
from qmailtx.policy.verdict import CONTINUE, VerdictKind
from qmailtx.registry import makeRegistry
from qmailtx.smtp.session import SMTPSession
from qmailtx.testing import SMTPServerHarness, makeTestConfig

REPLY = "553 5.7.1 sorry, your envelope sender is in my badmailfrom list"
LOCAL = DomainTable(frozenset({"mx.test"}), frozenset({"mx.test"}), {})


def session(sender: Address | None) -> SMTPSession:
    s = SMTPSession("192.0.2.7", 4000, sessionId="s1")
    s.sender = sender
    return s


class BadMailFromCheckTests(SynchronousTestCase):
    check = BadMailFrom(listedSet(["Spammer@Example.COM", "@spam.test", "  ", "@"]))
    rcpt = Address("u", "mx.test")

    def judge(self, sender: Address | None) -> VerdictKind:
        return self.check.checkRecipient(session(sender), self.rcpt).kind

    def test_providesIRecipientCheck(self) -> None:
        self.assertTrue(verifyObject(IRecipientCheck, self.check))

    def test_refusesListedAddressWithQmailReply(self) -> None:
        verdict = self.check.checkRecipient(session(Address("spammer", "example.com")), self.rcpt)
        self.assertIs(verdict.kind, VerdictKind.REPLY)
        assert verdict.reply is not None
        self.assertEqual(verdict.reply.toBytes(), (REPLY + "\r\n").encode())

    def test_matchIsCaseInsensitive(self) -> None:
        self.assertIs(self.judge(Address("SPAMMER", "example.com")), VerdictKind.REPLY)
        self.assertIs(self.judge(Address.fromStored("X@SPAM.TEST")), VerdictKind.REPLY)

    def test_refusesWholeListedDomainOnly(self) -> None:
        self.assertIs(self.judge(Address("anyone", "spam.test")), VerdictKind.REPLY)
        self.assertIs(self.judge(Address("anyone", "sub.spam.test")), VerdictKind.CONTINUE)
        self.assertIs(self.judge(Address("other", "example.com")), VerdictKind.CONTINUE)

    def test_nullSenderNeverMatches(self) -> None:
        self.assertIs(self.judge(Address.null()), VerdictKind.CONTINUE)

    def test_noTransactionNoOpinion(self) -> None:
        self.assertIs(self.judge(None), VerdictKind.CONTINUE)

    def test_hitIsLoggedWithSenderRecipientAndClient(self) -> None:
        with capturedLogs() as events:
            self.check.checkRecipient(session(Address("x", "spam.test")), self.rcpt)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            (event["policy"], event["sender"], event["rcpt"], event["peer"], event["code"]),
            ("badmailfrom", "x@spam.test", "u@mx.test", "192.0.2.7", 553),
        )

    def test_missIsNotLogged(self) -> None:
        with capturedLogs() as events:
            verdict = self.check.checkRecipient(session(Address("x", "ok.test")), self.rcpt)
        self.assertIs(verdict, CONTINUE)
        self.assertEqual(list(events), [])


class BadMailFromRegisterTests(SynchronousTestCase):
    def test_readsControlSetting(self) -> None:
        config = makeTestConfig(
            self.mktemp(), '[control]\nbadmailfrom = ["@Spam.Test", "a@b.test"]\n'
        )
        registry = makeRegistry(config, names=["badmailfrom"])
        check = registry.getUtility(IRecipientCheck, name="badmailfrom")
        assert isinstance(check, BadMailFrom)
        self.assertEqual(check.listed, frozenset({"@spam.test", "a@b.test"}))


class BadMailFromProtocolTests(SynchronousTestCase):
    def harness(self) -> SMTPServerHarness:
        checks = [BadMailFrom(listedSet(["@spam.test"])), RelayControl(LOCAL)]
        return SMTPServerHarness(self.mktemp(), recipientChecks=checks)

    def test_mailIsAcceptedEveryRcptRefused(self) -> None:
        h = self.harness()
        h.clear()
        with capturedLogs() as events:
            h.send(
                b"HELO c\r\nMAIL FROM:<x@SPAM.test>\r\nRCPT TO:<u@mx.test>\r\n"
                b"RCPT TO:<v@mx.test>\r\nDATA\r\n"
            )
        self.assertEqual(h.codes(), [250, 250, 553, 553, 503])
        self.assertEqual(h.replies()[2:4], [REPLY, REPLY])
        self.assertEqual(h.committed, [])
        hits = [e for e in events if e.get("policy") == "badmailfrom"]
        self.assertEqual(
            [(e["sender"], e["peer"]) for e in hits], [("x@spam.test", "192.0.2.1")] * 2
        )

    def test_nextTransactionWithGoodSenderIsAccepted(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\nMAIL FROM:<x@spam.test>\r\nRCPT TO:<u@mx.test>\r\nRSET\r\n")
        h.clear()
        h.send(b"MAIL FROM:<x@good.test>\r\nRCPT TO:<u@mx.test>\r\n")
        self.assertEqual(h.codes(), [250, 250])

    def test_nullSenderPasses(self) -> None:
        h = SMTPServerHarness(
            self.mktemp(), recipientChecks=[BadMailFrom(listedSet(["@"])), RelayControl(LOCAL)]
        )
        h.clear()
        h.send(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@mx.test>\r\n")
        self.assertEqual(h.codes(), [250, 250, 250])
