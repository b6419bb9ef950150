"""The qmail-queue interface: envelopes on fd 1 and the exit-code table."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.address import Address
from qmailtx.queue.filter import FilterResult
from qmailtx.queue.qq import (
    MAX_ADDRESS,
    EnvelopeError,
    EnvelopeParser,
    encodeQmailEnvelope,
    parseQmailEnvelope,
    qqReply,
)

# qmail.c qmail_close: exit code -> (SMTP code, enhanced code, text).
QMAIL_TABLE = {
    11: (554, "5.1.3", "envelope address too long for qq"),
    115: (554, "5.1.3", "envelope address too long for qq"),
    31: (554, "5.3.0", "mail server permanently rejected message"),
    51: (451, "4.3.0", "qq out of memory"),
    52: (451, "4.3.0", "qq timeout"),
    53: (451, "4.3.0", "qq write error or disk full"),
    54: (451, "4.3.0", "qq read error"),
    55: (451, "4.3.0", "qq unable to read configuration"),
    56: (451, "4.3.0", "qq trouble making network connection"),
    61: (451, "4.3.0", "qq trouble in home directory"),
    62: (451, "4.3.0", "qq trouble creating files in queue"),
    63: (451, "4.3.0", "qq trouble creating files in queue"),
    64: (451, "4.3.0", "qq trouble creating files in queue"),
    65: (451, "4.3.0", "qq trouble creating files in queue"),
    66: (451, "4.3.0", "qq trouble creating files in queue"),
    71: (451, "4.3.0", "mail server temporarily rejected message"),
    72: (451, "4.4.1", "connection to mail server timed out"),
    73: (451, "4.4.1", "connection to mail server rejected"),
    74: (451, "4.4.2", "communication with mail server failed"),
    81: (451, "4.3.0", "qq internal bug"),
    91: (451, "4.3.0", "qq internal bug"),
    120: (451, "4.3.0", "unable to exec qq"),
}


def parsed(data: bytes) -> tuple[str, list[str]]:
    sender, recipients = parseQmailEnvelope(data)
    return str(sender), [str(r) for r in recipients]


class EnvelopeTests(SynchronousTestCase):
    def test_encode(self) -> None:
        envelope = encodeQmailEnvelope(
            Address.fromStored("a@b.example"),
            [Address.fromStored("u@mx.test"), Address.fromStored("v@mx.test")],
        )
        self.assertEqual(envelope, b"Fa@b.example\0Tu@mx.test\0Tv@mx.test\0\0")

    def test_nullSenderAndDoubleBounceSender(self) -> None:
        self.assertEqual(
            encodeQmailEnvelope(Address.null(), [Address.fromStored("u@mx.test")]),
            b"F\0Tu@mx.test\0\0",
        )
        self.assertEqual(parsed(b"F\0Tu@mx.test\0\0"), ("", ["u@mx.test"]))
        self.assertEqual(parsed(b"F#@[]\0Tu@mx.test\0\0"), ("#@[]", ["u@mx.test"]))

    def test_roundTrip(self) -> None:
        recipients = [Address.fromStored(f"user{i}@example.com") for i in range(50)]
        sender = Address.fromStored("we;ird|$(x)`@b.example")
        data = encodeQmailEnvelope(sender, recipients)
        self.assertEqual(parseQmailEnvelope(data), (sender, recipients))

    def test_fedByteByByte(self) -> None:
        data = b"Fa@b.example\0Tu@mx.test\0Tv@mx.test\0\0"
        parser = EnvelopeParser()
        for i in range(len(data) - 1):
            self.assertFalse(parser.feed(data[i : i + 1]))
        self.assertTrue(parser.feed(data[-1:]))
        self.assertEqual([str(r) for r in parser.recipients], ["u@mx.test", "v@mx.test"])

    def test_bytesAfterTheEndAreIgnored(self) -> None:
        parser = EnvelopeParser()
        self.assertTrue(parser.feed(b"Fa@b.example\0Tu@mx.test\0\0garbage"))
        self.assertEqual([str(r) for r in parser.recipients], ["u@mx.test"])

    def test_noRecipientsIsAnEnvelope(self) -> None:
        self.assertEqual(parsed(b"Fa@b.example\0\0"), ("a@b.example", []))

    def assertExit(self, data: bytes, code: int) -> None:
        with self.assertRaises(EnvelopeError) as caught:
            parseQmailEnvelope(data)
        self.assertEqual(caught.exception.exitCode, code)

    def test_formatErrorsAre91(self) -> None:
        for data in [
            b"Ta@b.example\0\0",  # no F first
            b"Fa@b.example\0Xu@mx.test\0\0",  # unknown record
            b"Fa@b.example\0Fu@mx.test\0\0",  # second F
            b"Fa@b.example\0T\0\0",  # empty recipient
            b"Fa@b.example\0Tu\x01@mx.test\0\0",  # control character
            b"Fa@b.example\0Tu\xe9@mx.test\0\0",  # 8-bit
            b"\0",
        ]:
            self.assertExit(data, 91)

    def test_formatErrorSeenBeforeTheEnd(self) -> None:
        parser = EnvelopeParser()
        parser.feed(b"Fa@b.example\0")
        with self.assertRaises(EnvelopeError) as caught:
            parser.feed(b"X")
        self.assertEqual(caught.exception.exitCode, 91)

    def test_truncatedIs54(self) -> None:
        for data in [b"", b"F", b"Fa@b.example", b"Fa@b.example\0", b"Fa@b.example\0Tu@mx"]:
            self.assertExit(data, 54)

    def test_addressTooLongIs11(self) -> None:
        long = b"x" * (MAX_ADDRESS + 1)
        self.assertExit(b"F" + long + b"\0Tu@mx.test\0\0", 11)
        self.assertExit(b"Fa@b.example\0T" + long + b"\0\0", 11)
        # Seen before the NUL arrives: a sender that never ends is not buffered forever.
        parser = EnvelopeParser()
        with self.assertRaises(EnvelopeError) as caught:
            parser.feed(b"F" + long)
        self.assertEqual(caught.exception.exitCode, 11)
        self.assertEqual(parsed(b"F" + long[:-1] + b"\0Tu@mx.test\0\0")[1], ["u@mx.test"])


class ExitCodeTests(SynchronousTestCase):
    def test_zeroIsQueued(self) -> None:
        self.assertIsNone(qqReply(0))

    def test_qmailTable(self) -> None:
        for code, (smtp, enhanced, text) in QMAIL_TABLE.items():
            reply = qqReply(code)
            assert reply is not None
            self.assertEqual((reply.code, reply.enhanced, reply.text), (smtp, enhanced, text), code)

    def test_otherCodes(self) -> None:
        """11-40 are permanent; anything else is temporary."""
        for code in range(1, 256):
            if code in QMAIL_TABLE:
                continue
            reply = qqReply(code)
            assert reply is not None
            if 11 <= code <= 40:
                self.assertEqual(str(reply), "554 5.3.0 qq permanent problem", code)
            else:
                self.assertEqual(str(reply), "451 4.3.0 qq temporary problem", code)

    def test_filterEndings(self) -> None:
        self.assertIsNone(FilterResult(0).reply())
        self.assertEqual(str(FilterResult(None, signal=9).reply()), "451 4.3.0 qq crashed")
        self.assertEqual(str(FilterResult(0, timedOut=True).reply()), "451 4.3.0 qq timeout")
        self.assertEqual(
            str(FilterResult(None, startError="no such file").reply()),
            "451 4.3.0 unable to exec qq",
        )
        self.assertEqual(
            str(FilterResult(31).reply()), "554 5.3.0 mail server permanently rejected message"
        )
