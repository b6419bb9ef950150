"""DataParser: strict CRLF framing, unstuffing, size and hop counting."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.smtp.data import MAX_CARRY, BareLineEnding, DataParser


def feedAll(chunks: list[bytes], maxBytes: int = 0) -> tuple[bytes, bool, bytes, DataParser]:
    parser = DataParser(maxBytes)
    out = []
    rest = b""
    done = False
    for i, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        out.append(result.output)
        if result.done:
            done = True
            rest = result.rest + b"".join(chunks[i + 1 :])
            break
    return b"".join(out), done, rest, parser


class FramingTests(SynchronousTestCase):
    def test_simpleMessage(self) -> None:
        out, done, rest, _ = feedAll([b"Subject: x\r\n\r\nhello\r\n.\r\n"])
        self.assertTrue(done)
        self.assertEqual(out, b"Subject: x\n\nhello\n")
        self.assertEqual(rest, b"")

    def test_emptyMessage(self) -> None:
        out, done, rest, _ = feedAll([b".\r\nQUIT\r\n"])
        self.assertEqual((out, done, rest), (b"", True, b"QUIT\r\n"))

    def test_pipelinedCommandsAfterEndAreReturned(self) -> None:
        out, done, rest, _ = feedAll([b"a\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\n"])
        self.assertEqual(out, b"a\n")
        self.assertEqual(rest, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\n")

    def test_dotUnstuffing(self) -> None:
        out, done, _, _ = feedAll([b"..leading\r\nmid\r\n...two\r\n.\r\n"])
        self.assertTrue(done)
        self.assertEqual(out, b".leading\nmid\n..two\n")

    def test_everySplitPointGivesTheSameResult(self) -> None:
        message = b"Received: x\r\n..a\r\nb\r\n\r\n.c\r\nbody\r\n.\r\nNOOP\r\n"
        expected = feedAll([message])
        for i in range(1, len(message)):
            got = feedAll([message[:i], message[i:]])
            self.assertEqual(got[:3], expected[:3], f"split at {i}")
        byteByByte = feedAll([message[i : i + 1] for i in range(len(message))])
        self.assertEqual(byteByByte[:2], expected[:2])

    def test_notFinishedWithoutTheDotLine(self) -> None:
        out, done, _, _ = feedAll([b"abc\r\n", b".x\r\n"])
        self.assertFalse(done)
        self.assertEqual(out, b"abc\nx\n")


class BareLineEndingTests(SynchronousTestCase):
    def assertRefused(self, *chunks: bytes) -> None:
        parser = DataParser()
        with self.assertRaises(BareLineEnding):
            for chunk in chunks:
                parser.feed(chunk)

    def test_bareLF(self) -> None:
        self.assertRefused(b"hello\nworld\r\n.\r\n")

    def test_bareCR(self) -> None:
        self.assertRefused(b"hello\rworld\r\n.\r\n")

    def test_bareCRInsideALongLine(self) -> None:
        self.assertRefused(b"x" * (MAX_CARRY + 10) + b"\rmore")

    def test_smugglingSequencesNeverEndTheMessage(self) -> None:
        """Each end-of-data variant another MTA might honour is refused, not taken as the end."""
        for fake in [
            b"\n.\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r",
            b"\r\n.\r",
            b"\r.\r\n",
            b"\n.\rX",
        ]:
            data = b"Subject: a\r\n\r\nbody" + fake + b"MAIL FROM:<x@y>\r\n"
            parser = DataParser()
            with self.assertRaises(BareLineEnding, msg=repr(fake)):
                result = parser.feed(data)
                self.assertFalse(result.done, repr(fake))
                parser.feed(b"more\r\n.\r\n")

    def test_bareLFAfterTheEndIsNotOurs(self) -> None:
        """Bytes after the real end belong to the command parser, which takes LF lines."""
        out, done, rest, _ = feedAll([b"a\r\n.\r\nNOOP\n"])
        self.assertTrue(done)
        self.assertEqual(rest, b"NOOP\n")

    def test_crlfSplitAcrossChunks(self) -> None:
        out, done, _, _ = feedAll([b"abc\r", b"\ndef\r\n.\r", b"\n"])
        self.assertEqual((out, done), (b"abc\ndef\n", True))


class LimitsTests(SynchronousTestCase):
    def test_sizeCountsStoredBytes(self) -> None:
        _, _, _, parser = feedAll([b"ab\r\n..c\r\n.\r\n"])
        self.assertEqual(parser.size, len(b"ab\n.c\n"))

    def test_overflowStopsOutputButReadsToTheEnd(self) -> None:
        out, done, rest, parser = feedAll(
            [b"a" * 50 + b"\r\n", b"b" * 50 + b"\r\n.\r\nQUIT\r\n"], 60
        )
        self.assertTrue(parser.overflow)
        self.assertTrue(done)
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertLessEqual(len(out), 60)

    def test_exactlyAtTheLimitIsAccepted(self) -> None:
        out, done, _, parser = feedAll([b"a" * 9 + b"\r\n.\r\n"], 10)
        self.assertFalse(parser.overflow)
        self.assertEqual(out, b"a" * 9 + b"\n")

    def test_longLinesAreStreamedNotBuffered(self) -> None:
        parser = DataParser()
        total = 0
        for _ in range(40):
            result = parser.feed(b"y" * 65536)
            total += len(result.output)
            self.assertLessEqual(len(parser._carry), MAX_CARRY)
        result = parser.feed(b"\r\n.\r\n")
        total += len(result.output)
        self.assertTrue(result.done)
        self.assertEqual(total, 40 * 65536 + 1)

    def test_longLineStartingWithADotIsUnstuffed(self) -> None:
        parser = DataParser()
        first = parser.feed(b".." + b"z" * (MAX_CARRY + 5))
        second = parser.feed(b"\r\n.\r\n")
        self.assertTrue(second.done)
        self.assertEqual(first.output + second.output, b"." + b"z" * (MAX_CARRY + 5) + b"\n")

    def test_hopsCountedInTheHeaderOnly(self) -> None:
        header = b"Received: a\r\nDELIVERED-TO: b\r\nX-Received: no\r\nreceived: c\r\n"
        body = b"\r\nReceived: in the body\r\n.\r\n"
        _, _, _, parser = feedAll([header + body])
        self.assertEqual(parser.hops, 3)

    def test_hopsAcrossChunks(self) -> None:
        chunks = [b"Received: 1\r\n"] * 120 + [b"\r\nbody\r\n.\r\n"]
        _, done, _, parser = feedAll(chunks)
        self.assertTrue(done)
        self.assertEqual(parser.hops, 120)

    def test_messageWithoutHeaderHasNoHops(self) -> None:
        _, _, _, parser = feedAll([b"\r\nReceived: x\r\n.\r\n"])
        self.assertEqual(parser.hops, 0)
