"""qmail-verh (P4): ##L/##H rewritten per recipient for VERP senders."""

from __future__ import annotations

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.address import Address
from qmailtx.delivery.interfaces import Outcome
from qmailtx.delivery.verh import isVerpFor, rewrite
from tests.delivery.test_local import _Fixture
from tests.delivery.test_remote import MX1, Harness, accepted, message

ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.com")
VERP = Address("list-return-alice=example.com", "lists.example")
LIST = b"List-Unsubscribe: <mailto:list-unsubscribe-##L=##H@lists.example>\n"
MESSAGE = b"Subject: news\n" + LIST + b"\nbody ##L=##H\n"


class RuleTests(SynchronousTestCase):
    def test_isVerpFor(self) -> None:
        self.assertTrue(isVerpFor(VERP, ALICE))
        self.assertTrue(isVerpFor(Address("l-alice=EXAMPLE.com", "x"), ALICE))
        self.assertFalse(isVerpFor(VERP, BOB))
        self.assertFalse(isVerpFor(Address("list", "lists.example"), ALICE))
        self.assertFalse(isVerpFor(Address("alice=example.com", "x"), ALICE))  # no "-"
        self.assertFalse(isVerpFor(Address.null(), ALICE))

    def test_headerOnly(self) -> None:
        self.assertEqual(
            rewrite(MESSAGE, ALICE),
            b"Subject: news\n"
            b"List-Unsubscribe: <mailto:list-unsubscribe-alice=example.com@lists.example>\n"
            b"\nbody ##L=##H\n",
        )

    def test_flagLineExtendsToTheBodyAndLosesItsHash(self) -> None:
        content = b"#X-Foo: 1 ##L\nSubject: s\n\nhello ##L at ##H\n"
        self.assertEqual(
            rewrite(content, ALICE), b"X-Foo: 1 alice\nSubject: s\n\nhello alice at example.com\n"
        )

    def test_otherTagsUntouched(self) -> None:
        content = b"X: ##X ##l ###L\n\n"
        self.assertEqual(rewrite(content, ALICE), b"X: ##X ##l #alice\n\n")

    def test_dkimSignedMessageUntouched(self) -> None:
        content = b"DKIM-Signature: v=1; h=List-Unsubscribe\n" + LIST + b"\nbody\n"
        with capturedLogs() as events:
            self.assertEqual(rewrite(content, ALICE), content)
        self.assertTrue(any("DKIM" in e.get("log_format", "") for e in events))


class LocalTests(_Fixture, SynchronousTestCase):
    def deliverBoth(self, verh: bool) -> bytes:
        self.setUpFixture(self.mktemp, verh=verh)
        queued = self.disk.inject(1000.0, VERP, [ALICE, BOB], MESSAGE, {})
        with open(queued.path, "rb") as f:
            before = f.read()
        results = self.successResultOf(self.agent().deliver(queued, [ALICE, BOB]))
        self.assertEqual([r.outcome for r in results], [Outcome.DELIVERED] * 2)
        with open(queued.path, "rb") as f:
            self.assertEqual(f.read(), before)  # the queue file is never rewritten
        [alice] = self.delivered("alice")
        [bob] = self.delivered("bob")
        self.assertIn(b"list-unsubscribe-##L=##H@", bob)  # not VERP for bob
        return alice

    def test_rewrittenForTheVerpRecipientOnly(self) -> None:
        alice = self.deliverBoth(verh=True)
        self.assertIn(b"list-unsubscribe-alice=example.com@", alice)
        self.assertTrue(alice.startswith(b"Return-Path: <list-return-alice=example.com@"))
        self.assertTrue(alice.endswith(b"\nbody ##L=##H\n"))

    def test_offByDefault(self) -> None:
        alice = self.deliverBoth(verh=False)
        self.assertIn(b"list-unsubscribe-##L=##H@", alice)

    def test_mbox(self) -> None:
        self.setUpFixture(self.mktemp, verh=True)
        home = self.maildir("alice")[: -len("/Maildir")]
        self.writeFile(home + "/.qmail", "./mbox\n")
        queued = self.disk.inject(1000.0, VERP, [ALICE], MESSAGE, {})
        [r] = self.successResultOf(self.agent().deliver(queued, [ALICE]))
        self.assertEqual(r.outcome, Outcome.DELIVERED, r.text)
        with open(home + "/mbox", "rb") as f:
            self.assertIn(b"list-unsubscribe-alice=example.com@", f.read())


class RemoteTests(SynchronousTestCase):
    def test_verpRecipientGetsItsOwnRewrittenTransaction(self) -> None:
        h = Harness({"192.0.2.1": accepted(2)}, [MX1], body=MESSAGE, verh=True)
        m = message(["bob@example.com", "alice@example.com"], str(VERP))
        results = self.successResultOf(h.agent.deliver(m, m.recipients))
        self.assertEqual([r.outcome for r in results], [Outcome.DELIVERED] * 2)
        sent = {tuple(c["recipients"]): c["message"] for c in h.sender.calls}
        self.assertEqual(sent[("alice@example.com",)], rewrite(MESSAGE, ALICE))
        self.assertIn(b"list-unsubscribe-alice=example.com@", sent[("alice@example.com",)])
        self.assertEqual(sent[("bob@example.com",)], MESSAGE)

    def test_offByDefault(self) -> None:
        h = Harness({"192.0.2.1": accepted(2)}, [MX1], body=MESSAGE)
        m = message(["bob@example.com", "alice@example.com"], str(VERP))
        self.successResultOf(h.agent.deliver(m, m.recipients))
        [call] = h.sender.calls
        self.assertEqual(call["message"], MESSAGE)
