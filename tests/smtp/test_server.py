"""The ESMTP server on a StringTransport: replies, ordering, limits, bad input."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.policy.interfaces import IRecipientCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, disconnect, reject
from qmailtx.smtp.received import protocolName, qmailDate, receivedLine
from qmailtx.smtp.tls import ServerTLS
from qmailtx.testing import SMTPServerHarness, makeTestPortal, makeTestUsers

SIMPLE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"


class ServerTestCase(SynchronousTestCase):
    def harness(self, **kw: object) -> SMTPServerHarness:
        return SMTPServerHarness(self.mktemp(), **kw)  # type: ignore[arg-type]


class GreetingAndBasicsTests(ServerTestCase):
    def test_greeting(self) -> None:
        h = self.harness()
        self.assertEqual(h.replies(), ["220 mx.test ESMTP"])

    def test_ehloAdvertisesExtensions(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"EHLO client.example\r\n")
        self.assertEqual(
            h.replies(),
            [
                "250-mx.test",
                "250-SIZE 10485760",
                "250-PIPELINING",
                "250-8BITMIME",
                "250 ENHANCEDSTATUSCODES",
            ],
        )

    def test_qmailReplies(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"HELO c\r\nNOOP\r\nVRFY x\r\nRSET\r\nHELP\r\nQUIT\r\n")
        self.assertEqual(
            h.replies(),
            [
                "250 mx.test",
                "250 2.0.0 ok",
                "252 2.0.0 send some mail, i'll try my best",
                "250 2.0.0 flushed",
                "214 2.0.0 qmail home page: http://pobox.com/~djb/qmail.html",
                "221 2.0.0 mx.test",
            ],
        )
        self.assertTrue(h.closed)

    def test_commandsAreCaseInsensitive(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"helo c\r\nmail from:<a@b.example>\r\nrcpt to:<u@MX.TEST>\r\n")
        self.assertEqual(h.codes(), [250, 250, 250])

    def test_unknownCommand(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"FROB\r\n")
        self.assertEqual(h.replies(), ["502 5.5.1 unimplemented"])

    def test_sequenceErrors(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"RCPT TO:<u@mx.test>\r\nDATA\r\nMAIL FROM:<>\r\nDATA\r\nMAIL FROM:<b@c.d>\r\n")
        self.assertEqual(
            h.replies(),
            [
                "503 5.5.1 MAIL first",
                "503 5.5.1 MAIL first",
                "250 2.1.0 ok",
                "503 5.5.1 RCPT first",
                "503 5.5.1 only one MAIL command allowed",
            ],
        )

    def test_lineEndedByLFAloneIsOneCommand(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"NOOP\nNOOP\r\nNOOP\n")
        self.assertEqual(h.codes(), [250, 250, 250])


class TransactionTests(ServerTestCase):
    def test_messageIsQueuedWithReceivedLine(self) -> None:
        h = self.harness()
        h.send(b"EHLO client.example\r\n" + SIMPLE)
        h.clear()
        h.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n")
        [reply] = h.replies()
        self.assertRegex(reply, r"^250 2\.0\.0 ok \d+ qp [0-9a-f]+$")
        [message] = h.committed
        self.assertEqual(message.sender, Address("a", "example.org"))
        self.assertEqual(message.recipients, [Address("u", "mx.test")])
        content = h.messageBytes(message)
        received, rest = content.split(b"\n", 1)[0], content.split(b"\n", 2)[2]
        self.assertEqual(received, b"Received: from unknown (HELO client.example) (192.0.2.1)")
        self.assertEqual(rest, b"Subject: hi\n\n.dot\nbody\n")
        self.assertIn(b"\n  by mx.test with ESMTP; ", content)
        self.assertEqual(h.tmpFiles(), [])

    def test_pipelinedTransactionRepliesInOrder(self) -> None:
        h = self.harness()
        h.clear()
        h.send(
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@elsewhere.example>\r\n"
            b"RCPT TO:<u@mx.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"
        )
        codes = h.codes()
        self.assertEqual(codes, [250, 250, 553, 250, 354, 250, 221])
        self.assertEqual(h.committed[0].recipients, [Address("u", "mx.test")])

    def test_duplicateRecipientStoredOnce(self) -> None:
        h = self.harness()
        h.send(
            b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.test>\r\n"
            b"RCPT TO:<U@MX.test>\r\nDATA\r\nx\r\n.\r\n"
        )
        self.assertEqual(len(h.committed[0].recipients), 1)

    def test_tooManyRecipientsKeepsTheEarlierOnes(self) -> None:
        h = self.harness(settings={"maxRecipients": 100})
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n")
        h.clear()
        h.send(b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(102)))
        self.assertEqual(h.codes(), [250] * 100 + [452, 452])
        self.assertIn("452 4.5.3 too many recipients", h.replies())
        h.send(b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(len(h.committed[0].recipients), 100)

    def test_unqualifiedRecipientGetsEnvnoathost(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<Postmaster>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(h.committed[0].recipients, [Address("Postmaster", "mx.test")])

    def test_nullSender(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\nx\r\n.\r\n")
        self.assertTrue(h.committed[0].sender.isNull)

    def test_rsetForgetsTheTransaction(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.test>\r\nRSET\r\n")
        h.clear()
        h.send(b"DATA\r\n")
        self.assertEqual(h.replies(), ["503 5.5.1 MAIL first"])


class RelayTests(ServerTestCase):
    REFUSED = "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"

    def test_relayRefusedForStrangers(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\nMAIL FROM:<u@mx.test>\r\n")
        for rcpt in [
            b"<x@other.example>",
            b"<@mx.test:x@other.example>",
            b"<x@other.example.>",
            b"<x@[192.0.2.7]>",
            b"<x@OTHER.example>",
            b"<x@mx.test.other.example>",
        ]:
            h.clear()
            h.send(b"RCPT TO:" + rcpt + b"\r\n")
            self.assertEqual(h.replies(), [self.REFUSED], rcpt)

    def test_trickyLocalPartsStayLocal(self) -> None:
        """%-hack, ! paths and quoted @ name a local user of ours, never another host."""
        h = self.harness()
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n")
        h.clear()
        h.send(
            b"RCPT TO:<x%other.example@mx.test>\r\nRCPT TO:<other.example!x@mx.test>\r\n"
            b'RCPT TO:<"x@other.example"@mx.test>\r\nDATA\r\n.\r\n'
        )
        self.assertEqual(h.codes()[:3], [250, 250, 250])
        self.assertEqual({r.domain for r in h.committed[0].recipients}, {"mx.test"})

    def test_relayClientsMayRelay(self) -> None:
        import ipaddress

        h = self.harness(
            peerHost="10.1.2.3",
            settings={"relayClients": (ipaddress.ip_network("10.0.0.0/8"),)},
        )
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n")
        h.clear()
        h.send(b"RCPT TO:<x@other.example>\r\nDATA\r\nhi\r\n.\r\n")
        self.assertEqual(h.replies()[0], "250 2.1.5 ok")
        self.assertEqual(h.committed[0].info["r"], "1")


@implementer(IRecipientCheck)
class SlowCheck:
    """Answers later: each recipient waits for the test to fire its Deferred."""

    def __init__(self) -> None:
        self.pending: list[tuple[Address, Deferred[Verdict]]] = []

    def checkRecipient(self, session: ISMTPSession, recipient: Address) -> Deferred[Verdict]:
        d: Deferred[Verdict] = Deferred()
        self.pending.append((recipient, d))
        return d


class PipeliningOrderTests(ServerTestCase):
    def test_repliesWaitForASlowCheck(self) -> None:
        slow = SlowCheck()
        h = self.harness(recipientChecks=[slow])
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n")
        h.clear()
        h.send(b"RCPT TO:<one@mx.test>\r\nRCPT TO:<two@mx.test>\r\nNOOP\r\n")
        self.assertEqual(h.replies(), [])  # nothing may overtake the first RCPT
        self.assertEqual(len(slow.pending), 1)
        slow.pending[0][1].callback(reject(550, "5.1.1", "no"))
        self.assertEqual(h.replies(), ["550 5.1.1 no"])
        self.assertEqual(len(slow.pending), 2)
        slow.pending[1][1].callback(CONTINUE)
        self.assertEqual(h.replies(), ["550 5.1.1 no", "250 2.1.5 ok", "250 2.0.0 ok"])

    def test_disconnectVerdictClosesAfterTheReply(self) -> None:
        slow = SlowCheck()
        h = self.harness(recipientChecks=[slow])
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n")
        h.clear()
        h.send(b"RCPT TO:<one@mx.test>\r\nNOOP\r\n")
        slow.pending[0][1].callback(disconnect(421, "4.7.0", "go away"))
        self.assertEqual(h.replies(), ["421 4.7.0 go away"])
        self.assertTrue(h.closed)

    def test_heldInputIsBoundedByPausingTheTransport(self) -> None:
        slow = SlowCheck()
        h = self.harness(recipientChecks=[slow])
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<one@mx.test>\r\n")
        self.assertEqual(h.transport.producerState, "producing")
        for _ in range(100):
            h.send(b"NOOP\r\n" * 200)
        self.assertEqual(h.transport.producerState, "paused")
        slow.pending[0][1].callback(CONTINUE)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.codes().count(250), 2 + 1 + 100 * 200)


class LineLimitTests(ServerTestCase):
    def test_512OctetCommandAccepted(self) -> None:
        h = self.harness()
        h.clear()
        line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
        self.assertEqual(len(line), 512)
        h.send(line)
        self.assertEqual(h.replies(), ["250 2.0.0 ok"])

    def test_longerLineRefusedOnceAndNotSplit(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"NOOP " + b"x" * 600 + b"QUIT\r\nNOOP\r\n")
        self.assertEqual(h.replies(), ["500 5.5.2 line too long", "250 2.0.0 ok"])
        self.assertFalse(h.closed)

    def test_longLineInPiecesRefusedOnce(self) -> None:
        h = self.harness()
        h.clear()
        for _ in range(20):
            h.send(b"RCPT TO:<" + b"y" * 100)
        h.send(b">\r\nNOOP\r\n")
        self.assertEqual(h.replies(), ["500 5.5.2 line too long", "250 2.0.0 ok"])

    def test_endlessLineHangsUp(self) -> None:
        h = self.harness()
        h.clear()
        for _ in range(100):
            h.send(b"z" * 4096)
        self.assertTrue(h.closed)
        self.assertEqual(h.replies(), ["421 4.7.0 line too long, closing connection"])
        self.assertLess(len(h.protocol._buffer), 5000)

    def test_controlCharactersRefused(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"HELO a\0b\r\nHELO a\rb\r\nMAIL FROM:<a\x01@b.example>\r\n")
        self.assertEqual(h.codes(), [501, 501, 555])

    def test_tooManyBadCommandsHangsUp(self) -> None:
        h = self.harness(settings={"maxBadCommands": 5})
        h.clear()
        h.send(b"JUNK\r\n" * 10)
        self.assertEqual(h.codes(), [502, 502, 502, 502, 421])
        self.assertTrue(h.closed)


class HeaderInjectionTests(ServerTestCase):
    def test_envelopeCannotCarryLineBreaks(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n")
        h.clear()
        h.send(b"RCPT TO:<u@mx.test\rX-Injected: yes>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(h.codes()[:2], [501, 250])
        [message] = h.committed
        self.assertEqual(message.recipients, [Address("u", "mx.test")])
        self.assertNotIn(b"X-Injected", h.messageBytes(message))

    def test_heloIsSanitisedInReceived(self) -> None:
        h = self.harness()
        h.send(b"HELO evil(x)\tinj;\r\n" + SIMPLE + b"x\r\n.\r\n")
        content = h.messageBytes(h.committed[0])
        self.assertTrue(content.startswith(b"Received: from unknown (HELO evil?x??inj?) ("))


class DataLimitTests(ServerTestCase):
    def test_sizeParameterOverLimit(self) -> None:
        h = self.harness(settings={"databytes": 1000})
        h.clear()
        h.send(b"EHLO c\r\n")
        self.assertIn("250-SIZE 1000", h.replies())
        h.clear()
        h.send(b"MAIL FROM:<a@b.example> SIZE=5000\r\nMAIL FROM:<a@b.example> SIZE=999\r\n")
        self.assertEqual(
            h.replies(),
            ["552 5.3.4 sorry, that message size exceeds my databytes limit", "250 2.1.0 ok"],
        )

    def test_unknownParameterRefused(self) -> None:
        h = self.harness()
        h.clear()
        h.send(b"MAIL FROM:<a@b.example> FOO=bar\r\nMAIL FROM:<a@b.example> BODY=8BITMIME\r\n")
        self.assertEqual(h.codes(), [555, 250])

    def test_oversizeMessageRefusedAndNothingQueued(self) -> None:
        h = self.harness(settings={"databytes": 1000})
        h.send(b"HELO c\r\n" + SIMPLE)
        h.clear()
        h.send(b"x" * 78 + b"\r\n")
        for _ in range(30):
            h.send(b"y" * 78 + b"\r\n")
        h.send(b".\r\nNOOP\r\n")
        self.assertEqual(
            h.replies(),
            ["552 5.3.4 sorry, that message size exceeds my databytes limit", "250 2.0.0 ok"],
        )
        self.assertEqual(h.committed, [])
        self.assertEqual(h.queuedFiles(), [])
        self.assertEqual(h.tmpFiles(), [])

    def test_justUnderTheLimitAccepted(self) -> None:
        h = self.harness(settings={"databytes": 1000})
        h.send(b"HELO c\r\n" + SIMPLE)
        h.clear()
        h.send(b"z" * 997 + b"\r\n.\r\n")  # 998 bytes stored
        self.assertEqual(h.codes(), [250])

    def test_tooManyHops(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\n" + SIMPLE)
        h.clear()
        h.send(b"Received: x\r\n" * 101 + b"\r\nbody\r\n.\r\n")
        self.assertEqual(h.replies(), ["554 5.4.6 too many hops, this message is looping"])
        self.assertEqual(h.queuedFiles(), [])

    def test_hundredHopsAccepted(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\n" + SIMPLE)
        h.clear()
        h.send(b"Delivered-To: x\r\n" * 100 + b"\r\nbody\r\n.\r\n")
        self.assertEqual(h.codes(), [250])

    def test_largeMessageIsStreamedToDisk(self) -> None:
        h = self.harness(settings={"databytes": 0})
        h.send(b"HELO c\r\n" + SIMPLE)
        line = b"a" * 998 + b"\r\n"
        for _ in range(2000):  # ~2 MB
            h.send(line * 10)
            self.assertLess(h.protocol._spool._buffered, 512 * 1024)  # type: ignore[union-attr]
        h.send(b".\r\n")
        [message] = h.committed
        self.assertGreater(message.messageLength, 20000 * 999)


class BareLineEndingTests(ServerTestCase):
    BARE_LF = "451 4.6.0 See http://pobox.com/~djb/docs/smtplf.html."

    def test_bareLFRefusedAndConnectionClosed(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\n" + SIMPLE)
        h.clear()
        h.send(b"Subject: x\r\n\r\nline\nnext\r\n.\r\n")
        self.assertEqual(h.replies(), [self.BARE_LF])
        self.assertTrue(h.closed)
        self.assertEqual(h.committed, [])
        self.assertEqual(h.tmpFiles(), [])

    def test_smugglingNeverGivesASecond354(self) -> None:
        for fake in [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"]:
            h = self.harness()
            h.send(b"HELO c\r\n" + SIMPLE)
            h.send(
                b"Subject: a\r\n\r\nbody"
                + fake
                + b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n"
                + b"Subject: smuggled\r\n\r\nx\r\n.\r\n"
            )
            self.assertEqual(h.output().count(b"354 "), 1, repr(fake))
            self.assertEqual(h.committed, [], repr(fake))
            self.assertTrue(h.closed, repr(fake))


class TimeoutTests(ServerTestCase):
    def test_idleConnectionTimesOut(self) -> None:
        h = self.harness(settings={"timeout": 300})
        h.clock.advance(299)
        self.assertFalse(h.closed)
        h.send(b"NOOP\r\n")
        h.clock.advance(299)
        self.assertFalse(h.closed)
        h.clock.advance(2)
        self.assertTrue(h.closed)
        self.assertEqual(h.replies()[-1], "451 4.4.2 timeout")

    def test_stalledDataIsNeverQueued(self) -> None:
        h = self.harness(settings={"timeout": 300})
        h.send(b"HELO c\r\n" + SIMPLE + b"Subject: half\r\n\r\n" + b"x" * 100000)
        h.clock.advance(301)
        self.assertTrue(h.closed)
        h.protocol.connectionLost()
        self.assertEqual(h.committed, [])
        self.assertEqual(h.queuedFiles(), [])
        self.assertEqual(h.tmpFiles(), [])

    def test_lostConnectionMidDataQueuesNothing(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\n" + SIMPLE + b"Subject: half\r\n\r\n" + b"x\r\n" * 50000)
        h.protocol.connectionLost()
        self.assertEqual(h.queuedFiles(), [])
        self.assertEqual(h.tmpFiles(), [])


class ReceivedLineTests(ServerTestCase):
    """P14: dates in the configured zone with a numeric offset; RFC 3848 names."""

    def test_dateInAZone(self) -> None:
        july = 1719835200  # 2024-07-01T12:00:00Z
        self.assertEqual(qmailDate(july, "Europe/Berlin"), "1 Jul 2024 14:00:00 +0200")
        self.assertEqual(qmailDate(july, "UTC"), "1 Jul 2024 12:00:00 +0000")
        january = 1704110400  # 2024-01-01T12:00:00Z
        self.assertEqual(qmailDate(january, "America/St_Johns"), "1 Jan 2024 08:30:00 -0330")

    def test_serverUsesTheConfiguredZone(self) -> None:
        h = self.harness(settings={"timezone": "Asia/Kolkata"})
        h.send(b"HELO c\r\n" + SIMPLE + b"x\r\n.\r\n")
        [message] = h.committed
        received = h.messageBytes(message).split(b"\n")[1]
        # The harness clock starts at the epoch.
        self.assertEqual(received, b"  by mx.test with SMTP; 1 Jan 1970 05:30:00 +0530")

    def test_protocolNames(self) -> None:
        self.assertEqual(protocolName(False, False, False), "SMTP")
        self.assertEqual(protocolName(True, False, False), "ESMTP")
        self.assertEqual(protocolName(True, True, False), "ESMTPS")
        self.assertEqual(protocolName(True, False, True), "ESMTPA")
        self.assertEqual(protocolName(True, True, True), "ESMTPSA")

    def test_tlsAndUserNoted(self) -> None:
        line = receivedLine(
            "c",
            "192.0.2.1",
            "mx.test",
            "ESMTPSA",
            0,
            remoteInfo="alice@example.com",
            tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
            timezone="UTC",
        )
        self.assertEqual(
            line,
            b"Received: from unknown (HELO c) (alice@example.com@192.0.2.1)\n"
            b"  by mx.test with ESMTPSA (TLSv1.3 TLS_AES_256_GCM_SHA384 encrypted);"
            b" 1 Jan 1970 00:00:00 +0000\n",
        )

    def test_ehloOrderWithAuthAndTLS(self) -> None:
        store = makeTestUsers(self.mktemp(), {"a@example.com": "pw"})
        self.addCleanup(store.close)
        h = SMTPServerHarness(
            self.mktemp(),
            peerHost="127.0.0.1",
            portal=makeTestPortal(store),
            tls=ServerTLS("/nonexistent"),
        )
        h.clear()
        h.send(b"EHLO c\r\n")
        self.assertEqual(
            h.replies(),
            [
                "250-mx.test",
                "250-AUTH LOGIN CRAM-MD5 PLAIN",
                "250-AUTH=LOGIN CRAM-MD5 PLAIN",
                "250-STARTTLS",
                "250-SIZE 10485760",
                "250-PIPELINING",
                "250-8BITMIME",
                "250 ENHANCEDSTATUSCODES",
            ],
        )
