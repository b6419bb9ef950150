"""SASLSession: the SASL state SMTP AUTH and POP3 AUTH keep between lines."""

from __future__ import annotations

import base64

from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.sasl import REFUSED, SASLSession
from qmailtx.smtp.auth import (
    R_AUTH_CANCELLED,
    R_AUTH_MALFORMED,
    AuthInputError,
    Challenge,
    LoginExchange,
    PlainExchange,
)
from qmailtx.smtp.throttle import AuthThrottle


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class SASLSessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = AuthThrottle(self.clock)
        self.sasl = SASLSession(self.clock, self.throttle)

    def test_plainWithInitialResponse(self) -> None:
        step = self.sasl.start(PlainExchange(), b64(b"\0alice\0secret").decode())
        self.assertIsInstance(step, UsernamePassword)
        assert isinstance(step, UsernamePassword)
        self.assertEqual((step.username, step.password), (b"alice", b"secret"))
        self.assertFalse(self.sasl.waiting)
        self.assertEqual(self.sasl.mechanism, "PLAIN")

    def test_loginChallengesThenGivesCredentials(self) -> None:
        self.assertIsInstance(self.sasl.start(LoginExchange(), None), Challenge)
        self.assertTrue(self.sasl.waiting)
        self.assertIsInstance(self.sasl.respond(b64(b"alice")), Challenge)
        step = self.sasl.respond(b64(b"secret"))
        self.assertIsInstance(step, UsernamePassword)
        self.assertFalse(self.sasl.waiting)
        self.assertRaises(RuntimeError, self.sasl.respond, b64(b"more"))

    def test_foreignAuthzidIsRefused(self) -> None:
        self.assertIs(self.sasl.start(PlainExchange(), b64(b"bob\0alice\0pw").decode()), REFUSED)
        self.sasl.start(PlainExchange(), None)
        self.assertIs(self.sasl.respond(b64(b"bob\0alice\0pw")), REFUSED)
        self.assertFalse(self.sasl.waiting)

    def test_badInputAndCancelEndTheExchange(self) -> None:
        for line, reply in ((b"not base64!", R_AUTH_MALFORMED), (b"*", R_AUTH_CANCELLED)):
            self.sasl.start(LoginExchange(), None)
            with self.assertRaises(AuthInputError) as raised:
                self.sasl.respond(line)
            self.assertEqual(raised.exception.reply, reply)
            self.assertFalse(self.sasl.waiting)
        self.assertRaises(AuthInputError, self.sasl.start, PlainExchange(), "%%%")

    def test_abandonForgetsTheExchange(self) -> None:
        self.sasl.start(LoginExchange(), None)
        self.sasl.abandon()
        self.assertFalse(self.sasl.waiting)

    def test_failedCountsAgainstTheClientAndGrows(self) -> None:
        self.assertEqual([self.sasl.failed("192.0.2.1") for _ in range(3)], [1.0, 2.0, 4.0])
        self.assertEqual(self.sasl.failed("192.0.2.2"), 1.0)
        self.sasl.succeeded("192.0.2.1")
        self.assertEqual(self.throttle.failures("192.0.2.1"), 1)

    def test_waitEndsAfterTheDelay(self) -> None:
        done: list[bool] = []
        Deferred.fromCoroutine(self.sasl.wait(2.0)).addCallback(done.append)
        self.clock.advance(1.9)
        self.assertEqual(done, [])
        self.clock.advance(0.1)
        self.assertEqual(done, [True])

    def test_closeEndsTheWaitAndTheExchange(self) -> None:
        done: list[bool] = []
        self.sasl.start(LoginExchange(), None)
        Deferred.fromCoroutine(self.sasl.wait(30.0)).addCallback(done.append)
        self.sasl.close()
        self.assertEqual(done, [False])
        self.assertFalse(self.sasl.waiting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
