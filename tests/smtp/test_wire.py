"""The chunked wire converter against the whole-message reference."""

from __future__ import annotations

import itertools
import random

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.smtp.wire import WireConverter, WireInfo, WireMeter, measureWire, wireMessage


def streamed(message: bytes, size: int) -> bytes:
    converter = WireConverter()
    out = [converter.feed(message[i : i + size]) for i in range(0, len(message), size)]
    return b"".join(out) + converter.finish()


def metered(message: bytes, size: int) -> WireInfo:
    meter = WireMeter()
    for i in range(0, len(message), size):
        meter.feed(message[i : i + size])
    return meter.finish()


def samples() -> list[bytes]:
    rng = random.Random(5321)
    alphabet = b"\r\n..a\xe9 "
    found = [
        b"",
        b".",
        b"\n",
        b"\r",
        b"\r\n",
        b"..",
        b".\n.",
        b"a\r\rb\n",
        b"\r\n.\r\n",
        b"no newline",
        b"ends in cr\r",
        b".leading\nmid\n..two\n.\nbare\rcr\r\nalready crlf\n\nlast",
    ]
    for _ in range(300):
        found.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
    return found


class WireConverterTests(SynchronousTestCase):
    def test_everyChunkingGivesTheReference(self) -> None:
        """For many messages and every chunk size 1..len+1 the streamed output
        equals ``wireMessage`` byte for byte."""
        for message in samples():
            expected = wireMessage(message)
            for size in range(1, len(message) + 2):
                self.assertEqual(streamed(message, size), expected, (message, size))

    def test_exhaustiveShortMessages(self) -> None:
        """Every message up to 6 bytes over CR, LF, dot and a letter, split
        at every pair of points."""
        for length in range(7):
            for letters in itertools.product(b"\r\n.a", repeat=length):
                message = bytes(letters)
                expected = wireMessage(message)
                for i in range(length + 1):
                    for j in range(i, length + 1):
                        converter = WireConverter()
                        parts = [message[:i], message[i:j], message[j:]]
                        got = b"".join(converter.feed(p) for p in parts) + converter.finish()
                        self.assertEqual(got, expected, (message, i, j))

    def test_meterMatchesTheReference(self) -> None:
        """Wire size and 8-bit flag, chunk by chunk, as from the whole message."""
        for message in samples():
            expected = measureWire(message)
            self.assertEqual(expected, WireInfo(len(wireMessage(message)), not message.isascii()))
            for size in (1, 2, 3, 7, 64):
                self.assertEqual(metered(message, size), expected, (message, size))

    def test_reference(self) -> None:
        self.assertEqual(wireMessage(b""), b".\r\n")
        self.assertEqual(streamed(b"", 1), b".\r\n")
        self.assertEqual(wireMessage(b"a\rb\r\n.c"), b"ab\r\n..c\r\n.\r\n")
