"""The POP3 protocol on a StringTransport: every command in every state, and bad input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.pop3.factory import POP3Settings
from qmailtx.pop3.mailbox import convertAll
from qmailtx.testing import ManualRunner
from qmailtx.vdomain.passwords import PasswordHasher
from qmailtx.vdomain.records import UserFlags
from tests.pop3.harness import ALICE, PASSWORD, POP3Harness, apopDigest

ONE = b"From: a@example.net\nSubject: one\n\nline 1\n.line 2\n"
TWO = b"From: b@example.net\r\nSubject: two\r\n\r\nbody\r\n"


def lines(transport: object) -> list[bytes]:
    return transport.value().split(b"\r\n")[:-1]  # type: ignore[attr-defined,no-any-return]


class AuthorizationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pop = POP3Harness(self.mktemp())

    def test_greetingCarriesAPOPTimestamp(self) -> None:
        _, transport = self.pop.connect()
        greeting = transport.value()
        self.assertRegex(greeting, rb"^\+OK pop\.test .*<\d+\.\d+\.\d+@pop\.test>\r\n$")

    def test_noTimestampWithoutAPOP(self) -> None:
        pop = POP3Harness(self.mktemp(), apop=False)
        _, transport = pop.connect()
        self.assertNotIn(b"<", transport.value())
        transport.clear()
        server, _ = pop.connect("127.0.0.1")
        server.transport.clear()  # type: ignore[union-attr]
        server.dataReceived(b"CAPA\r\n")
        capa = lines(server.transport)
        self.assertIn(b"SASL LOGIN PLAIN", capa)
        server.dataReceived(b"APOP alice@example.org " + b"0" * 32 + b"\r\n")
        self.assertEqual(lines(server.transport)[-1], b"-ERR unimplemented")

    def test_capaOnPlainRemoteConnection(self) -> None:
        pop = POP3Harness(self.mktemp(), tls=True)
        server, transport = pop.connect()
        transport.clear()
        server.dataReceived(b"CAPA\r\n")
        self.assertEqual(
            lines(transport),
            [
                b"+OK capability list follows",
                b"TOP",
                b"UIDL",
                b"SASL CRAM-MD5",
                b"STLS",
                b"RESP-CODES",
                b"AUTH-RESP-CODE",
                b"PIPELINING",
                b"IMPLEMENTATION qmailtx",
                b".",
            ],
        )

    def test_capaOnLoopback(self) -> None:
        server, transport = self.pop.connect("127.0.0.1")
        transport.clear()
        server.dataReceived(b"CAPA\r\n")
        capa = lines(transport)
        self.assertIn(b"USER", capa)
        self.assertIn(b"SASL LOGIN CRAM-MD5 PLAIN", capa)
        self.assertNotIn(b"STLS", capa)

    def test_plaintextLoginRefusedBeforeTLS(self) -> None:
        server, transport = self.pop.connect()
        transport.clear()
        server.dataReceived(b"USER alice@example.org\r\nPASS x\r\nAUTH PLAIN\r\n")
        self.assertEqual(
            lines(transport),
            [
                b"-ERR [AUTH] plaintext authentication disallowed without TLS; use STLS",
                b"-ERR USER first",
                b"-ERR [AUTH] plaintext authentication disallowed without TLS; use STLS",
            ],
        )

    def test_authBeforeTLSAllowsPlaintext(self) -> None:
        pop = POP3Harness(self.mktemp(), settings=POP3Settings("pop.test", authBeforeTLS=True))
        server, transport = pop.connect()
        server.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        self.assertEqual(lines(transport)[-1], b"+OK maildrop has 0 messages (0 octets)")

    def test_userPass(self) -> None:
        self.pop.deliver(ONE)
        server, transport = self.pop.connect("127.0.0.1")
        transport.clear()
        server.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
        size = len(convertAll(ONE)) - 3 - 1  # the terminating dot and one stuffed dot
        self.assertEqual(
            lines(transport),
            [
                b"+OK",
                f"+OK maildrop has 1 messages ({size} octets)".encode(),
                f"+OK 1 {size}".encode(),
            ],
        )

    def test_passwordWithSpaces(self) -> None:
        secret = " with two  spaces "
        hashed = PasswordHasher.cheap().hashPassword(secret)
        self.pop.users.setPassword("alice", "example.org", hashed, secret)
        server, transport = self.pop.connect("127.0.0.1")
        server.dataReceived(f"USER {ALICE}\r\nPASS {secret}\r\n".encode())
        self.assertIn(b"+OK maildrop", transport.value())

    def test_wrongPasswordAndUnknownUserLookAlike(self) -> None:
        answers = []
        for user, password in ((ALICE, "wrong"), ("nobody@example.org", PASSWORD)):
            server, transport = self.pop.connect("127.0.0.1")
            transport.clear()
            server.dataReceived(f"USER {user}\r\nPASS {password}\r\n".encode())
            self.assertEqual(lines(transport), [b"+OK"])  # not answered yet: the penalty
            self.pop.clock.advance(60)
            answers.append(lines(transport))
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0][-1], b"-ERR [AUTH] authentication failed")

    def test_failuresSlowDownPerAddressOnly(self) -> None:
        server, transport = self.pop.connect("127.0.0.1")
        for _ in range(3):
            server.dataReceived(f"USER {ALICE}\r\nPASS wrong\r\n".encode())
            self.pop.clock.advance(10)
        transport.clear()
        server.dataReceived(f"USER {ALICE}\r\nPASS wrong\r\n".encode())
        self.pop.clock.advance(7.5)
        self.assertEqual(lines(transport), [b"+OK"])  # 8 s now
        self.pop.clock.advance(1)
        self.assertEqual(lines(transport)[-1], b"-ERR [AUTH] authentication failed")
        # Another address logs in at once.
        other, otherTransport = self.pop.connect("::1")
        other.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        self.assertIn(b"+OK maildrop", otherTransport.value())

    def test_apop(self) -> None:
        server, transport = self.pop.connect()
        digest = apopDigest(transport.value(), PASSWORD)
        transport.clear()
        server.dataReceived(f"APOP {ALICE} {digest}\r\n".encode())
        self.assertEqual(lines(transport), [b"+OK maildrop has 0 messages (0 octets)"])

    def test_apopWrongDigest(self) -> None:
        server, transport = self.pop.connect()
        transport.clear()
        server.dataReceived(f"APOP {ALICE} {'0' * 32}\r\nAPOP {ALICE}\r\n".encode())
        self.pop.clock.advance(60)
        self.assertEqual(
            lines(transport), [b"-ERR [AUTH] authentication failed", b"-ERR syntax error"]
        )

    def test_authPlainInitialResponse(self) -> None:
        server, transport = self.pop.connect("127.0.0.1")
        transport.clear()
        token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
        with capturedLogs() as events:
            server.dataReceived(f"AUTH PLAIN {token}\r\n".encode())
        self.assertEqual(lines(transport), [b"+OK maildrop has 0 messages (0 octets)"])
        text = " ".join(formatEvent(e) for e in events)
        self.assertNotIn(PASSWORD, text)
        self.assertNotIn(token, text)
        self.assertIn(ALICE, text)

    def test_authLoginExchange(self) -> None:
        server, transport = self.pop.connect("127.0.0.1")
        transport.clear()
        server.dataReceived(b"AUTH LOGIN\r\n")
        self.assertEqual(lines(transport), [b"+ VXNlcm5hbWU6"])
        server.dataReceived(base64.b64encode(ALICE.encode()) + b"\r\n")
        server.dataReceived(base64.b64encode(PASSWORD.encode()) + b"\r\n")
        self.assertEqual(
            lines(transport)[1:], [b"+ UGFzc3dvcmQ6", b"+OK maildrop has 0 messages (0 octets)"]
        )

    def test_authPlainEmptyChallenge(self) -> None:
        server, transport = self.pop.connect("127.0.0.1")
        transport.clear()
        server.dataReceived(b"AUTH PLAIN\r\n")
        self.assertEqual(lines(transport), [b"+ "])
        server.dataReceived(base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()) + b"\r\n")
        self.assertEqual(lines(transport)[-1], b"+OK maildrop has 0 messages (0 octets)")

    def test_authCramMD5(self) -> None:
        server, transport = self.pop.connect()
        transport.clear()
        server.dataReceived(b"AUTH CRAM-MD5\r\n")
        challenge = base64.b64decode(lines(transport)[0][2:])
        digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
        server.dataReceived(base64.b64encode(f"{ALICE} {digest}".encode()) + b"\r\n")
        self.assertEqual(lines(transport)[-1], b"+OK maildrop has 0 messages (0 octets)")

    def test_authCancelledAndMalformed(self) -> None:
        server, transport = self.pop.connect("127.0.0.1")
        transport.clear()
        server.dataReceived(b"AUTH LOGIN\r\n*\r\nAUTH PLAIN !!!\r\nAUTH NOPE\r\nAUTH\r\n")
        self.assertEqual(
            lines(transport),
            [
                b"+ VXNlcm5hbWU6",
                b"-ERR auth exchange cancelled",
                b"-ERR malformed auth input",
                b"-ERR unrecognized authentication type",
                b"+OK",
                b"LOGIN",
                b"CRAM-MD5",
                b"PLAIN",
                b".",
            ],
        )

    def test_transactionCommandsNeedLogin(self) -> None:
        server, transport = self.pop.connect()
        transport.clear()
        server.dataReceived(b"STAT\r\nRETR 1\r\nXYZZY\r\nNOOP\r\n")
        self.assertEqual(
            lines(transport),
            [
                b"-ERR authorization first",
                b"-ERR authorization first",
                b"-ERR unimplemented",
                b"+OK",
            ],
        )

    def test_quitInAuthorization(self) -> None:
        server, transport = self.pop.connect()
        transport.clear()
        server.dataReceived(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(lines(transport), [b"+OK pop.test bye"])
        self.assertTrue(transport.disconnecting)

    def test_userDisabledForPOP(self) -> None:
        self.pop.users.setFlags("alice", "example.org", int(UserFlags.NO_POP))
        server, transport = self.pop.connect("127.0.0.1")
        transport.clear()
        server.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        self.pop.clock.advance(60)
        self.assertEqual(lines(transport)[-1], b"-ERR [AUTH] authentication failed")


class TransactionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pop = POP3Harness(self.mktemp())
        self.one = self.pop.deliver(ONE)
        self.two = self.pop.deliver(TWO)
        self.server, self.transport = self.pop.login()

    def send(self, data: bytes) -> list[bytes]:
        self.transport.clear()
        self.server.dataReceived(data)
        return lines(self.transport)

    def sizes(self) -> tuple[int, int]:
        return len(convertAll(ONE)) - 4, len(convertAll(TWO)) - 3

    def test_statListUidl(self) -> None:
        one, two = self.sizes()
        self.assertEqual(
            self.send(b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 1\r\n"),
            [
                f"+OK 2 {one + two}".encode(),
                b"+OK scan listing follows",
                f"1 {one}".encode(),
                f"2 {two}".encode(),
                b".",
                f"+OK 2 {two}".encode(),
                b"+OK unique-id listing follows",
                b"1 " + self.one.encode(),
                b"2 " + self.two.encode(),
                b".",
                b"+OK 1 " + self.one.encode(),
            ],
        )

    def test_badMessageNumbers(self) -> None:
        self.assertEqual(
            self.send(b"LIST 0\r\nLIST 3\r\nRETR x\r\nDELE\r\nTOP 1\r\nTOP 1 -1\r\n"),
            [
                b"-ERR no such message",
                b"-ERR no such message",
                b"-ERR syntax error",
                b"-ERR syntax error",
                b"-ERR syntax error",
                b"-ERR syntax error",
            ],
        )

    def test_retrIsExact(self) -> None:
        self.transport.clear()
        self.server.dataReceived(b"RETR 1\r\n")
        one, _ = self.sizes()
        self.assertEqual(
            self.transport.value(),
            f"+OK {one} octets\r\n".encode()
            + b"From: a@example.net\r\nSubject: one\r\n\r\nline 1\r\n..line 2\r\n.\r\n",
        )

    def test_top(self) -> None:
        self.pop.deliver(b"H: 1\n\nb1\nb2\nb3\n")
        self.assertEqual(
            self.send(b"TOP 3 0\r\n"), [b"-ERR no such message"]
        )  # not in the snapshot
        self.server, self.transport = self.pop.login()
        self.assertEqual(
            self.send(b"TOP 3 0\r\nTOP 3 2\r\nTOP 3 10\r\n"),
            [
                b"+OK top of message follows",
                b"H: 1",
                b"",
                b".",
                b"+OK top of message follows",
                b"H: 1",
                b"",
                b"b1",
                b"b2",
                b".",
                b"+OK top of message follows",
                b"H: 1",
                b"",
                b"b1",
                b"b2",
                b"b3",
                b".",
            ],
        )

    def test_deleRset(self) -> None:
        one, two = self.sizes()
        self.assertEqual(
            self.send(b"DELE 1\r\nDELE 1\r\nRETR 1\r\nLIST\r\nSTAT\r\nRSET\r\nSTAT\r\n"),
            [
                b"+OK message deleted",
                b"-ERR message already deleted",
                b"-ERR message already deleted",
                b"+OK scan listing follows",
                f"2 {two}".encode(),
                b".",
                f"+OK 1 {two}".encode(),
                b"+OK maildrop has 2 messages",
                f"+OK 2 {one + two}".encode(),
            ],
        )

    def test_quitDeletesAndMarksSeen(self) -> None:
        self.assertEqual(
            self.send(b"RETR 2\r\nDELE 1\r\nQUIT\r\n")[-1], b"+OK pop.test bye (1 deleted)"
        )
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.pop.files("new"), [])
        self.assertEqual(self.pop.files("cur"), [self.two + ":2,S"])
        self.assertEqual(self.pop.files("tmp"), [])  # unlinked after the reply

    def test_quitAnswersBeforeUnlinking(self) -> None:
        runner = ManualRunner()
        self.pop.factory.runner = runner
        self.server.dataReceived(b"DELE 1\r\nQUIT\r\n")
        runner.runAll()  # the UPDATE
        self.assertEqual(lines(self.transport)[-1], b"+OK pop.test bye (1 deleted)")
        # Out of the mailbox at once; the unlink is one more job.
        self.assertEqual(self.pop.files("new"), [self.two])
        self.assertEqual(self.pop.files("tmp"), ["qmailtx-deleted." + self.one])
        runner.runAll()
        self.assertEqual(self.pop.files("tmp"), [])

    def test_loginSweepsWhatACrashLeftInTmp(self) -> None:
        self.send(b"QUIT\r\n")
        tmp = os.path.join(self.pop.maildir, "tmp")
        for name in ("qmailtx-deleted.1.a", "qmailtx-deleted.2.b:2,S", "3.being.delivered"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(b"x")
        self.pop.login()
        self.assertEqual(self.pop.files("tmp"), ["3.being.delivered"])

    def test_loginSweepsStaleFilesFromTmp(self) -> None:
        """D4: files of tmp/ older than 36 hours go at login; fresh ones,
        subdirectories and the messages (years old) stay."""
        self.send(b"QUIT\r\n")
        now = time.time()
        self.pop.clock.advance(now)
        tmp = os.path.join(self.pop.maildir, "tmp")
        os.mkdir(os.path.join(tmp, "sub"))
        for name, age in (("1.killed", 37 * 3600), ("2.being.delivered", 3600)):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(b"x")
            os.utime(os.path.join(tmp, name), (now - age, now - age))
        os.utime(os.path.join(tmp, "sub"), (now - 37 * 3600,) * 2)
        self.pop.login()
        self.assertEqual(self.pop.files("tmp"), ["2.being.delivered", "sub"])
        self.assertEqual(self.pop.files("new"), [self.one, self.two])

    def test_quitRecordsDeletionsInMaildirsize(self) -> None:
        path = os.path.join(self.pop.maildir, "maildirsize")
        total = len(ONE) + len(TWO)
        with open(path, "wb") as f:
            f.write(f"1000000S\n{total} 2\n".encode())
        self.send(b"DELE 1\r\nDELE 2\r\nQUIT\r\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), f"1000000S\n{total} 2\n-{total} -2\n".encode())

    def test_rsetThenQuitLeavesMaildirsize(self) -> None:
        path = os.path.join(self.pop.maildir, "maildirsize")
        with open(path, "wb") as f:
            f.write(b"1000000S\n0 0\n")
        self.send(b"DELE 1\r\nRSET\r\nQUIT\r\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"1000000S\n0 0\n")
        self.assertEqual(len(self.pop.files("new")), 2)

    def test_droppedConnectionDeletesNothing(self) -> None:
        self.send(b"DELE 1\r\nDELE 2\r\nRETR 1\r\n")
        self.server.connectionLost()
        self.assertEqual(self.pop.files("new"), sorted([self.one, self.two]))
        self.assertEqual(self.pop.files("cur"), [])

    def test_vanishedMessage(self) -> None:
        os.unlink(os.path.join(self.pop.maildir, "new", self.one))
        self.assertEqual(
            self.send(b"RETR 1\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n"),
            [
                b"-ERR [SYS/TEMP] unable to open that message (deleted by another session?)",
                b"-ERR [SYS/TEMP] unable to open that message (deleted by another session?)",
                b"+OK message deleted",
                b"+OK pop.test bye (1 deleted)",
            ],
        )

    def test_messageRenamedByAnotherSession(self) -> None:
        os.rename(
            os.path.join(self.pop.maildir, "new", self.one),
            os.path.join(self.pop.maildir, "cur", self.one + ":2,S"),
        )
        self.assertEqual(self.send(b"RETR 1\r\n")[1], b"From: a@example.net")
        self.send(b"DELE 1\r\nQUIT\r\n")
        self.assertEqual(self.pop.files("cur"), [])

    def test_authorizationCommandsAfterLogin(self) -> None:
        self.assertEqual(
            self.send(b"USER x\r\nSTLS\r\nNOOP\r\n"),
            [
                b"-ERR command not valid in this state",
                b"-ERR command not valid in this state",
                b"+OK",
            ],
        )

    def test_capaAfterLogin(self) -> None:
        capa = self.send(b"CAPA\r\n")
        self.assertNotIn(b"USER", capa)
        self.assertIn(b"PIPELINING", capa)

    def test_pipelinedAnswersInOrder(self) -> None:
        answers = self.send(b"NOOP\r\nRETR 1\r\nSTAT\r\nQUIT\r\n")
        self.assertEqual(answers[0], b"+OK")
        self.assertEqual(answers[-2][:6], b"+OK 2 ")
        self.assertEqual(answers[-1], b"+OK pop.test bye (0 deleted)")

    def test_bigMessageIsStreamed(self) -> None:
        body = b"".join(b".%06d\n" % i for i in range(200_000))  # 1.6 MB
        self.pop.deliver(b"Subject: big\n\n" + body)
        server, transport = self.pop.login()
        server.dataReceived(b"LIST 3\r\n")
        size = int(lines(transport)[0].split()[2])
        transport.clear()
        server.dataReceived(b"RETR 3\r\nNOOP\r\n")
        value = transport.value()
        self.assertTrue(
            value.startswith(f"+OK {size} octets\r\nSubject: big\r\n\r\n..000000\r\n".encode())
        )
        self.assertTrue(value.endswith(b"\r\n..199999\r\n.\r\n+OK\r\n"))
        stuffed = 200_000
        self.assertEqual(len(value), len(f"+OK {size} octets\r\n") + size + stuffed + 3 + 5)

    def test_streamPausesWithTheTransport(self) -> None:
        self.pop.deliver(b"x" * 100 + b"\n" + b"y" * 900_000 + b"\n")
        server, transport = self.pop.login()
        server.pauseProducing()
        server.dataReceived(b"RETR 3\r\nNOOP\r\n")
        self.assertEqual(transport.value(), b"")  # the reply waits too
        server.resumeProducing()
        self.assertTrue(transport.value().endswith(b"\r\n.\r\n+OK\r\n"))


class InputLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pop = POP3Harness(self.mktemp())
        self.server, self.transport = self.pop.connect()
        self.transport.clear()

    def test_overlongLineIsOneError(self) -> None:
        self.server.dataReceived(b"NOOP " + b"STAT " * 200 + b"\r\nNOOP\r\n")
        self.assertEqual(lines(self.transport), [b"-ERR line too long", b"+OK"])

    def test_megabytesWithoutLineEndHangUp(self) -> None:
        for _ in range(20):
            self.server.dataReceived(b"x" * 8192)
        self.assertEqual(lines(self.transport), [b"-ERR line too long, closing connection"])
        self.assertTrue(self.transport.disconnecting)

    def test_badCommandLimit(self) -> None:
        self.server.dataReceived(b"JUNK\r\n" * 25)
        answers = lines(self.transport)
        self.assertEqual(len(answers), 20)
        self.assertEqual(answers[-1], b"-ERR too many bad commands, closing connection")
        self.assertTrue(self.transport.disconnecting)

    def test_idleTimeout(self) -> None:
        pop = POP3Harness(self.mktemp())
        pop.deliver(ONE)
        server, transport = pop.login()
        server.dataReceived(b"DELE 1\r\n")
        pop.clock.advance(599)
        self.assertFalse(transport.disconnecting)
        pop.clock.advance(1)
        self.assertEqual(lines(transport)[-1], b"-ERR autologout: idle for too long")
        self.assertTrue(transport.disconnecting)
        server.connectionLost()
        self.assertEqual(len(pop.files("new")), 1)

    def test_bareLFAndEmptyLines(self) -> None:
        self.server.dataReceived(b"NOOP\n\r\nnoop\r\n")
        self.assertEqual(lines(self.transport), [b"+OK", b"-ERR unimplemented", b"+OK"])


class STLSTests(SynchronousTestCase):
    def test_pipelinedCommandsAfterSTLSAreDiscarded(self) -> None:
        pop = POP3Harness(self.mktemp(), tls=True)
        server, transport = pop.connect()
        transport.clear()
        server.dataReceived(b"USER alice@example.org\r\nSTLS\r\nSTAT\r\nCAPA\r\n")
        self.assertEqual(
            lines(transport),
            [
                b"-ERR [AUTH] plaintext authentication disallowed without TLS; use STLS",
                b"+OK begin TLS negotiation",
            ],
        )
        self.assertEqual(len(transport.tlsStarted), 1)
        transport.clear()
        server.dataReceived(b"PASS x\r\nCAPA\r\n")
        answers = lines(transport)
        self.assertEqual(answers[0], b"-ERR USER first")
        self.assertIn(b"USER", answers)
        self.assertNotIn(b"STLS", answers)
        self.assertIn(b"SASL LOGIN CRAM-MD5 PLAIN", answers)
        transport.clear()
        server.dataReceived(b"STLS\r\n")
        self.assertEqual(lines(transport), [b"-ERR already using TLS"])

    def test_noSTLSWithoutTLS(self) -> None:
        pop = POP3Harness(self.mktemp())
        server, transport = pop.connect()
        transport.clear()
        server.dataReceived(b"STLS\r\n")
        self.assertEqual(lines(transport), [b"-ERR unimplemented"])
