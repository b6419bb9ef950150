"""SMTP AUTH on a StringTransport: mechanisms, replies, ordering, throttling, secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from qmailtx.smtp.auth import (
    AuthInputError,
    CramMD5Exchange,
    LoginExchange,
    PlainExchange,
    decodeResponse,
)
from qmailtx.smtp.throttle import AuthThrottle, clientKey
from qmailtx.testing import SMTPServerHarness, makeTestPortal, makeTestUsers
from qmailtx.vdomain.interfaces import DatabaseUnavailable
from qmailtx.vdomain.realm import IMailAccount, MailRealm

USER = "alice@example.com"
PASSWORD = "alice-Secr3t"
LOOPBACK = "127.0.0.1"
STRANGER = "192.0.2.1"


def b64(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data)


def plain(user: str = USER, password: str = PASSWORD, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}")


class AuthTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        self.folder = folder
        self.store = makeTestUsers(os.path.join(folder, "users.sqlite3"), {USER: PASSWORD})
        self.addCleanup(self.store.close)

    def harness(
        self,
        peerHost: str = LOOPBACK,
        portal: Portal | None | str = "default",
        **kw: Any,
    ) -> SMTPServerHarness:
        if portal == "default":
            portal = makeTestPortal(self.store)
        h = SMTPServerHarness(
            os.path.join(self.folder, "h"),
            peerHost=peerHost,
            portal=portal,  # type: ignore[arg-type]
            **kw,
        )
        h.clear()
        return h

    def challenge(self, h: SMTPServerHarness) -> bytes:
        """The decoded text of the last 334 reply."""
        last = h.replies()[-1]
        self.assertTrue(last.startswith("334 "), last)
        return base64.b64decode(last[4:])


class AdvertisingTests(AuthTestCase):
    def test_noPortalNoAuth(self) -> None:
        h = self.harness(portal=None)
        h.send(b"EHLO c\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertFalse([r for r in h.replies() if "AUTH" in r])
        self.assertEqual(h.replies()[-1], "503 5.3.3 auth not available")

    def test_loopbackSeesEveryMechanismInQmailOrder(self) -> None:
        h = self.harness(settings={"databytes": 1000})
        h.send(b"EHLO c\r\n")
        self.assertEqual(
            h.replies(),
            [
                "250-mx.test",
                "250-AUTH LOGIN CRAM-MD5 PLAIN",
                "250-AUTH=LOGIN CRAM-MD5 PLAIN",
                "250-SIZE 1000",
                "250-PIPELINING",
                "250-8BITMIME",
                "250 ENHANCEDSTATUSCODES",
            ],
        )

    def test_plaintextMechanismsHiddenBeforeTLS(self) -> None:
        h = self.harness(peerHost=STRANGER)
        h.send(b"EHLO c\r\n")
        self.assertIn("250-AUTH CRAM-MD5", h.replies())
        self.assertIn("250-AUTH=CRAM-MD5", h.replies())

    def test_authBeforeTLSSettingOffersPlaintext(self) -> None:
        h = self.harness(peerHost=STRANGER, settings={"authBeforeTLS": True})
        h.send(b"EHLO c\r\n")
        self.assertIn("250-AUTH LOGIN CRAM-MD5 PLAIN", h.replies())

    def test_cramMD5OnlyWithAChallengeResponseChecker(self) -> None:
        h = self.harness(portal=makeTestPortal(self.store, hashedSecrets=False))
        h.send(b"EHLO c\r\nAUTH CRAM-MD5\r\n")
        self.assertIn("250-AUTH LOGIN PLAIN", h.replies())
        self.assertEqual(h.replies()[-1], "504 5.5.4 auth type unimplemented")

    def test_heloAdvertisesNothing(self) -> None:
        h = self.harness()
        h.send(b"HELO c\r\n")
        self.assertEqual(h.replies(), ["250 mx.test"])

    def test_plainBeforeTLSIsRefused(self) -> None:
        h = self.harness(peerHost=STRANGER)
        h.send(b"EHLO c\r\nAUTH PLAIN " + plain() + b"\r\nAUTH LOGIN\r\n")
        self.assertEqual(
            h.replies()[-2:],
            [
                "538 5.7.11 encryption required for requested authentication mechanism",
                "538 5.7.11 encryption required for requested authentication mechanism",
            ],
        )
        self.assertIsNone(h.protocol.session.authenticatedAs)


class MechanismTests(AuthTestCase):
    def test_plainWithInitialResponse(self) -> None:
        h = self.harness()
        h.send(b"EHLO c\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(h.replies()[-1], "235 2.7.0 ok, go ahead")
        self.assertEqual(h.protocol.session.authenticatedAs, USER)

    def test_plainWithoutInitialResponse(self) -> None:
        h = self.harness()
        h.send(b"EHLO c\r\nauth plain\r\n")
        self.assertEqual(h.output().split(b"\r\n")[-2], b"334 ")
        h.send(plain() + b"\r\n")
        self.assertEqual(h.replies()[-1], "235 2.7.0 ok, go ahead")

    def test_plainAuthzidOfSomeoneElseIsRefused(self) -> None:
        h = self.harness()
        h.send(b"AUTH PLAIN " + plain(authzid="bob@example.com") + b"\r\n")
        self.assertEqual(h.replies(), [])
        h.clock.advance(1)
        self.assertEqual(h.replies(), ["535 5.7.8 authorization failed"])

    def test_plainAuthzidEqualToUserIsFine(self) -> None:
        h = self.harness()
        h.send(b"AUTH PLAIN " + plain(authzid=USER.upper()) + b"\r\n")
        self.assertEqual(h.replies(), ["235 2.7.0 ok, go ahead"])

    def test_login(self) -> None:
        h = self.harness()
        h.send(b"AUTH LOGIN\r\n")
        self.assertEqual(h.replies(), ["334 VXNlcm5hbWU6"])
        h.send(b64(USER) + b"\r\n")
        self.assertEqual(h.replies()[-1], "334 UGFzc3dvcmQ6")
        h.send(b64(PASSWORD) + b"\r\n")
        self.assertEqual(h.replies()[-1], "235 2.7.0 ok, go ahead")
        self.assertEqual(h.protocol.session.authenticatedAs, USER)

    def test_loginWithInitialResponse(self) -> None:
        h = self.harness()
        h.send(b"AUTH LOGIN " + b64(USER) + b"\r\n")
        self.assertEqual(h.replies(), ["334 UGFzc3dvcmQ6"])
        h.send(b64(PASSWORD) + b"\r\n")
        self.assertEqual(h.replies()[-1], "235 2.7.0 ok, go ahead")

    def test_cramMD5(self) -> None:
        h = self.harness(peerHost=STRANGER)  # no TLS needed: no password on the wire
        h.send(b"AUTH CRAM-MD5\r\n")
        challenge = self.challenge(h)
        self.assertRegex(challenge.decode("ascii"), r"^<\d+\.\d+@mx\.test>$")
        digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
        h.send(b64(f"{USER} {digest}") + b"\r\n")
        self.assertEqual(h.replies()[-1], "235 2.7.0 ok, go ahead")
        self.assertEqual(h.protocol.session.authenticatedAs, USER)

    def test_cramMD5ChallengesDiffer(self) -> None:
        first = CramMD5Exchange("mx.test", 1000).credentials.challenge
        second = CramMD5Exchange("mx.test", 1000).credentials.challenge
        self.assertNotEqual(first, second)

    def test_cramMD5WrongDigest(self) -> None:
        h = self.harness()
        h.send(b"AUTH CRAM-MD5\r\n")
        h.send(b64(f"{USER} {'0' * 32}") + b"\r\n")
        h.clock.advance(1)
        self.assertEqual(h.replies()[-1], "535 5.7.8 authorization failed")

    def test_cramMD5InitialResponseRefused(self) -> None:
        h = self.harness()
        h.send(b"AUTH CRAM-MD5 " + b64("x y") + b"\r\n")
        self.assertEqual(h.replies(), ["501 5.5.2 malformed auth input"])

    def test_mechanismIsCaseInsensitive(self) -> None:
        h = self.harness()
        h.send(b"auth Plain " + plain() + b"\r\n")
        self.assertEqual(h.replies(), ["235 2.7.0 ok, go ahead"])


class FailureTests(AuthTestCase):
    def test_wrongPasswordAndUnknownUserGetTheSameReply(self) -> None:
        h = self.harness()
        h.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        h.clock.advance(1)
        h.send(b"AUTH PLAIN " + plain(user="nobody@example.com") + b"\r\n")
        h.clock.advance(2)
        h.send(b"AUTH PLAIN " + plain(user="nobody@nowhere.example") + b"\r\n")
        h.clock.advance(4)
        self.assertEqual(h.replies(), ["535 5.7.8 authorization failed"] * 3)
        self.assertIsNone(h.protocol.session.authenticatedAs)

    def test_cancel(self) -> None:
        h = self.harness()
        h.send(b"AUTH LOGIN\r\n*\r\nNOOP\r\n")
        self.assertEqual(
            h.replies(), ["334 VXNlcm5hbWU6", "501 5.0.0 auth exchange cancelled", "250 2.0.0 ok"]
        )

    def test_cancelAtPassword(self) -> None:
        h = self.harness()
        h.send(b"AUTH LOGIN " + b64(USER) + b"\r\n*\r\n")
        self.assertEqual(h.replies(), ["334 UGFzc3dvcmQ6", "501 5.0.0 auth exchange cancelled"])

    def test_badBase64(self) -> None:
        h = self.harness()
        h.send(b"AUTH PLAIN !!!!\r\nAUTH PLAIN\r\nnot base64\r\nAUTH LOGIN\r\nYW=j\r\n")
        self.assertEqual(
            h.replies(),
            [
                "501 5.5.2 malformed auth input",
                "334 ",
                "501 5.5.2 malformed auth input",
                "334 VXNlcm5hbWU6",
                "501 5.5.2 malformed auth input",
            ],
        )
        self.assertEqual(h.committed, [])

    def test_malformedPlain(self) -> None:
        h = self.harness()
        h.send(b"AUTH PLAIN " + b64(f"{USER}\0{PASSWORD}") + b"\r\n")  # two fields
        h.send(b"AUTH PLAIN " + b64(f"\0{USER}\0") + b"\r\n")  # no password
        h.send(b"AUTH PLAIN =\r\n")  # empty initial response
        h.send(b"AUTH PLAIN\r\n\r\n")  # empty response line
        self.assertEqual(
            [r for r in h.replies() if r != "334 "], ["501 5.5.2 malformed auth input"] * 4
        )

    def test_unknownMechanism(self) -> None:
        h = self.harness()
        h.send(b"AUTH DIGEST-MD5\r\nAUTH\r\nAUTH PLAIN a b\r\n")
        self.assertEqual(
            h.replies(),
            [
                "504 5.5.4 auth type unimplemented",
                "504 5.5.4 auth type unimplemented",
                "501 5.5.4 syntax error",
            ],
        )

    def test_secondAuthRefused(self) -> None:
        h = self.harness()
        h.send(b"AUTH PLAIN " + plain() + b"\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(
            h.replies(), ["235 2.7.0 ok, go ahead", "503 5.5.0 you're already authenticated"]
        )

    def test_authInsideATransactionRefused(self) -> None:
        h = self.harness()
        h.send(b"MAIL FROM:<a@example.org>\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(h.replies(), ["250 2.1.0 ok", "503 5.5.0 no auth during mail transaction"])
        self.assertIsNone(h.protocol.session.authenticatedAs)

    def test_databaseOutageIsTemporary(self) -> None:
        @implementer(ICredentialsChecker)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes | tuple[()]]:
                return fail(DatabaseUnavailable("database is locked"))

        portal = Portal(MailRealm(self.store, self.folder), [Broken()])
        h = self.harness(portal=portal)
        with capturedLogs() as events:
            h.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(h.replies(), ["454 4.7.0 temporary authentication failure"])
        self.assertTrue(any("database is locked" in formatEvent(e) for e in events))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_newConnectionStartsUnauthenticated(self) -> None:
        h = self.harness(recipientChecks=None)
        h.send(b"AUTH PLAIN " + plain() + b"\r\n")
        protocol, transport = h.connect(LOOPBACK)
        self.assertIsNone(protocol.session.authenticatedAs)
        self.assertFalse(protocol.session.relayAllowed)

    def test_failedLoginsCountAsBadCommands(self) -> None:
        h = self.harness(settings={"maxBadCommands": 3}, throttle=None)
        for _ in range(3):
            h.send(b"AUTH PLAIN " + plain(password="x") + b"\r\n")
            h.clock.advance(30)
        self.assertEqual(h.replies()[-1], "421 4.7.0 mx.test too many errors")
        self.assertTrue(h.closed)


class LineTests(AuthTestCase):
    def test_continuationLineIsNeverACommand(self) -> None:
        h = self.harness()
        h.send(b"AUTH LOGIN\r\nQUIT\r\n")  # "QUIT" is valid base64: a user name
        self.assertEqual(h.replies(), ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"])
        self.assertFalse(h.closed)
        h.send(b"*\r\nQUIT\r\n")
        self.assertEqual(
            h.replies()[-2:], ["501 5.0.0 auth exchange cancelled", "221 2.0.0 mx.test"]
        )

    def test_authLinesMayBeLongerThanCommands(self) -> None:
        h = self.harness()
        longUser = "x" * 900 + "@example.com"
        line = b"AUTH PLAIN " + plain(user=longUser) + b"\r\n"
        self.assertGreater(len(line), 512)
        h.send(line)
        h.clock.advance(1)
        self.assertEqual(h.replies(), ["535 5.7.8 authorization failed"])

    def test_overlongContinuationLine(self) -> None:
        h = self.harness()
        h.send(b"AUTH LOGIN\r\n" + b"A" * 13000 + b"\r\nNOOP\r\n")
        self.assertEqual(
            h.replies(),
            [
                "334 VXNlcm5hbWU6",
                "500 5.5.6 authentication exchange line is too long",
                "250 2.0.0 ok",
            ],
        )

    def test_overlongCommandsStillRefused(self) -> None:
        h = self.harness()
        h.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
        self.assertEqual(h.replies(), ["500 5.5.2 line too long", "250 2.0.0 ok"])

    def test_pipelinedPlainWithMailKeepsOrder(self) -> None:
        """RFC 4954 lets AUTH PLAIN with an initial response be pipelined: the
        following commands wait for the (slow) login and see its result."""
        clock = MemoryReactorClock()

        def slowRunner(f: Any, *args: Any) -> Deferred[Any]:
            return deferLater(clock, 0.5, f, *args)

        h = self.harness(
            peerHost=LOOPBACK,
            portal=makeTestPortal(self.store, runner=slowRunner),
            clock=clock,
        )
        h.send(
            b"EHLO c\r\nAUTH PLAIN " + plain() + b"\r\nMAIL FROM:<" + USER.encode() + b">\r\n"
            b"RCPT TO:<x@elsewhere.example>\r\nNOOP\r\n"
        )
        self.assertEqual(h.codes(), [250])
        clock.advance(1)
        self.assertEqual(h.codes(), [250, 235, 250, 250, 250])


class SessionTests(AuthTestCase):
    def test_relayAllowedOnlyAfterAuth(self) -> None:
        h = self.harness(peerHost=STRANGER, settings={"authBeforeTLS": True})
        h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nRSET\r\n")
        h.send(b"AUTH PLAIN " + plain() + b"\r\n")
        h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        self.assertEqual(h.codes(), [250, 553, 250, 235, 250, 250])

    def test_queuedMessageSaysWhoMayRelay(self) -> None:
        """The queue file's info tells a QMAILQUEUE filter what qmail's
        RELAYCLIENT and TCPREMOTEINFO told it."""
        h = self.harness(peerHost=STRANGER, settings={"authBeforeTLS": True})
        body = b"DATA\r\nhi\r\n.\r\n"
        h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\n" + body)
        h.send(b"AUTH PLAIN " + plain() + b"\r\n")
        h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\n" + body)
        stranger, user = (m.info for m in h.committed)
        self.assertNotIn("r", stranger)
        self.assertNotIn("u", stranger)
        self.assertEqual((user["r"], user["u"]), ("1", USER))

    def test_requireAuthRefusesMailBeforeAuth(self) -> None:
        h = self.harness(settings={"requireAuth": True})
        h.send(b"EHLO c\r\nMAIL FROM:<" + USER.encode() + b">\r\n")
        self.assertEqual(h.replies()[-1], "530 5.7.0 authentication required")
        h.send(b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<" + USER.encode() + b">\r\n")
        self.assertEqual(h.replies()[-2:], ["235 2.7.0 ok, go ahead", "250 2.1.0 ok"])

    def test_mailAuthParameter(self) -> None:
        h = self.harness()
        for value, code in [
            (b"<>", 250),
            (b"alice+40example.com", 250),
            (b"x+0Ay", 501),  # an encoded LF
            (b"x+zz", 501),
        ]:
            h.send(b"MAIL FROM:<a@example.org> AUTH=" + value + b"\r\nRSET\r\n")
            self.assertEqual(h.codes()[-2], code, value)
        h.send(b"MAIL FROM:<a@example.org> AUTH\r\n")
        self.assertEqual(h.codes()[-1], 501)

    def test_receivedNamesTheUserAndESMTPA(self) -> None:
        h = self.harness()
        h.send(b"EHLO c\r\nAUTH PLAIN " + plain() + b"\r\n")
        h.send(b"MAIL FROM:<" + USER.encode() + b">\r\nRCPT TO:<u@mx.test>\r\nDATA\r\nx\r\n.\r\n")
        [message] = h.committed
        received = h.messageBytes(message).split(b";")[0]
        self.assertEqual(
            received,
            b"Received: from unknown (HELO c) (alice@example.com@127.0.0.1)\n"
            b"  by mx.test with ESMTPA",
        )

    def test_logoutWhenTheConnectionEnds(self) -> None:
        logouts: list[str] = []
        realm = MailRealm(self.store, self.folder)
        original = realm.requestAvatar

        def requestAvatar(avatarId: Any, mind: object, *interfaces: Any) -> Any:
            interface, avatar, _ = original(avatarId, mind, *interfaces)
            return interface, avatar, lambda: logouts.append(IMailAccount(avatar).address)

        realm.requestAvatar = requestAvatar  # type: ignore[method-assign]
        portal = makeTestPortal(self.store)
        portal.realm = realm
        h = self.harness(portal=portal)
        h.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(logouts, [])
        h.protocol.connectionLost()
        self.assertEqual(logouts, [USER])


class SecretsTests(AuthTestCase):
    def test_secretsAndPayloadsNeverLogged(self) -> None:
        h = self.harness()
        secrets_ = [PASSWORD, "wrong-Passw0rd"]
        payloads = [plain(), plain(password="wrong-Passw0rd"), b64(PASSWORD), b64("wrong-Passw0rd")]
        with capturedLogs() as events:
            h.send(b"AUTH PLAIN " + payloads[1] + b"\r\n")
            h.clock.advance(1)
            h.send(b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n" + payloads[3] + b"\r\n")
            h.clock.advance(2)
            h.send(b"AUTH CRAM-MD5\r\n")
            challenge = self.challenge(h)
            digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
            cram = b64(f"{USER} {digest}")
            h.send(cram + b"\r\n")
            h.protocol.connectionLost()
            h2, _ = h.connect(LOOPBACK)
            h2.dataReceived(b"AUTH PLAIN " + payloads[0] + b"\r\n")
            h2.dataReceived(b"AUTH LOGIN " + b64(USER) + b"\r\n")
        self.assertTrue(events)
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        for secret in [*secrets_, digest]:
            self.assertNotIn(secret, text)
        for payload in [*payloads, cram]:
            self.assertNotIn(payload.decode("ascii"), text)
        self.assertIn("AUTH CRAM-MD5 as alice@example.com", text)


class ThrottleTests(AuthTestCase):
    def test_delaysGrowPerAddressAndOthersAreNotSlowed(self) -> None:
        h = self.harness(peerHost="192.0.2.7", settings={"authBeforeTLS": True})
        bad = b"AUTH PLAIN " + plain(password="guess") + b"\r\n"
        answered: list[float] = []
        for _ in range(4):
            before = h.clock.seconds()
            h.send(bad)
            while not h.replies() or h.replies()[-1] != "535 5.7.8 authorization failed":
                h.clock.advance(0.25)
            answered.append(h.clock.seconds() - before)
            h.clear()
        self.assertEqual(answered, [1.0, 2.0, 4.0, 8.0])
        # The guesser waits 16 s now; meanwhile another client logs in at once,
        # and a third one's failure costs it only its own first second.
        h.send(bad)
        other, otherTransport = h.connect("198.51.100.9")  # same factory and throttle
        third, thirdTransport = h.connect("203.0.113.5")
        otherTransport.clear()
        other.dataReceived(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(otherTransport.value(), b"235 2.7.0 ok, go ahead\r\n")
        thirdTransport.clear()
        third.dataReceived(bad)
        h.clock.advance(1)
        self.assertEqual(thirdTransport.value(), b"535 5.7.8 authorization failed\r\n")
        self.assertEqual(h.replies(), [])
        h.clock.advance(15)
        self.assertEqual(h.replies(), ["535 5.7.8 authorization failed"])

    def test_pendingDelayIsCancelledWhenTheClientLeaves(self) -> None:
        h = self.harness()
        h.send(b"AUTH PLAIN " + plain(password="guess") + b"\r\n")
        self.assertEqual(len(h.clock.getDelayedCalls()), 2)  # the idle timer and the delay
        h.protocol.connectionLost()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])


class ThrottleUnitTests(SynchronousTestCase):
    def test_delaysDoubleUpToTheCap(self) -> None:
        throttle = AuthThrottle(MemoryReactorClock())
        delays = [throttle.failed("192.0.2.1") for _ in range(8)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30, 30])

    def test_failuresDecayWithTime(self) -> None:
        clock = MemoryReactorClock()
        throttle = AuthThrottle(clock)
        for _ in range(4):
            throttle.failed("192.0.2.1")
        clock.advance(150)  # two decay periods
        self.assertEqual(throttle.failures("192.0.2.1"), 2)
        self.assertEqual(throttle.failed("192.0.2.1"), 4)

    def test_successHalvesTheCount(self) -> None:
        throttle = AuthThrottle(MemoryReactorClock())
        for _ in range(5):
            throttle.failed("192.0.2.1")
        throttle.succeeded("192.0.2.1")
        self.assertEqual(throttle.failures("192.0.2.1"), 2)
        throttle.succeeded("192.0.2.1")
        throttle.succeeded("192.0.2.1")
        self.assertEqual(throttle.failures("192.0.2.1"), 0)

    def test_ipv6CountedPerSlash64(self) -> None:
        self.assertEqual(clientKey("2001:db8:1:2::5"), clientKey("2001:db8:1:2:ffff::9"))
        self.assertNotEqual(clientKey("2001:db8:1:2::5"), clientKey("2001:db8:1:3::5"))
        self.assertEqual(clientKey("::ffff:192.0.2.1"), "192.0.2.1")

    def test_tableIsBounded(self) -> None:
        throttle = AuthThrottle(MemoryReactorClock(), maxClients=3)
        for i in range(10):
            throttle.failed(f"192.0.2.{i}")
        self.assertEqual(len(throttle._records), 3)
        self.assertEqual(throttle.failures("192.0.2.9"), 1)
        self.assertEqual(throttle.failures("192.0.2.0"), 0)


class ExchangeUnitTests(SynchronousTestCase):
    def test_decodeResponse(self) -> None:
        self.assertEqual(decodeResponse(b"YWJj"), b"abc")
        for bad in [b"YWJ", b"YW Jj", b"YWJj\x00", b"*x"]:
            self.assertRaises(AuthInputError, decodeResponse, bad)

    def test_plainParts(self) -> None:
        self.assertRaises(AuthInputError, PlainExchange().respond, b"\0u@d\0p\0w")
        credentials = PlainExchange().respond(b"\0u@d\0pw")
        self.assertEqual(
            (credentials.username, credentials.password),  # type: ignore[union-attr]
            (b"u@d", b"pw"),
        )

    def test_loginRefusesNul(self) -> None:
        exchange = LoginExchange()
        exchange.start(None)
        self.assertRaises(AuthInputError, exchange.respond, b"a\0b")

    def test_challengeFormat(self) -> None:
        challenge = CramMD5Exchange("mx.test", 1700000000).start(None)
        self.assertTrue(re.fullmatch(rb"334 [A-Za-z0-9+/=]+\r\n", challenge.toBytes()))  # type: ignore[union-attr]
