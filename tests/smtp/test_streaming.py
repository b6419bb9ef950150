"""The client streams DATA from a MessageSource through a producer: large
messages byte-exact over TCP and TLS, writes no larger than two chunks,
back-pressure honoured, every attempt reading from the start."""

from __future__ import annotations

import random
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from qmailtx.smtp.client import ClientOptions, TransactionResult, sendMessage
from qmailtx.smtp.source import CHUNK_SIZE, BytesSource
from qmailtx.smtp.wire import WireInfo, measureWire, wireMessage
from tests.smtp.test_client import ClientTestCase, FakeMX, reactor


class DelayedSource:
    """A source answering each read on a later reactor turn (as a worker
    thread does), recording the offsets read and failing where told."""

    def __init__(self, data: bytes, failAt: int | None = None) -> None:
        self.inner = BytesSource(data)
        self.info = self.inner.info
        self.failAt = failAt
        self.offsets: list[int] = []
        self.pending = 0
        self.mostPending = 0

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        self.offsets.append(offset)
        self.pending += 1
        self.mostPending = max(self.mostPending, self.pending)
        d: Deferred[bytes] = Deferred()
        if self.failAt is not None and offset >= self.failAt:
            reactor.callLater(0, self._answer, d, OSError(5, "Input/output error"))
        else:
            reactor.callLater(0, self._answer, d, self.inner.data[offset : offset + size])
        return d

    def _answer(self, d: Deferred[bytes], value: bytes | Exception) -> None:
        self.pending -= 1
        if isinstance(value, Exception):
            d.errback(value)
        else:
            d.callback(value)

    def readAll(self) -> Deferred[bytes]:
        return self.inner.readAll()


class BigMX(FakeMX):
    extensions = ["PIPELINING", "SIZE 1000000000", "8BITMIME"]


LINE = b"x" * 63 + b"\n"


class EndlessLines:
    """``count`` bytes of 64-byte lines, made up on each read: nothing held."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.info = WireInfo(count + count // 64 + 3, False)
        self.furthest = 0

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        size = max(min(size, self.count - offset), 0)
        start = offset % len(LINE)
        data = (LINE * (size // len(LINE) + 2))[start : start + size]
        self.furthest = max(self.furthest, offset + size)
        d: Deferred[bytes] = Deferred()
        reactor.callLater(0, d.callback, data)
        return d

    def readAll(self) -> Deferred[bytes]:
        raise NotImplementedError


@implementer(IHandshakeListener)
class _Recording(ProtocolWrapper):
    factory: RecordingFactory

    def write(self, data: bytes) -> None:
        self.factory.writes.append(len(data))
        super().write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.factory.producers.append(streaming)
        super().registerProducer(producer, streaming)

    def handshakeCompleted(self) -> None:
        self.wrappedProtocol.handshakeCompleted()  # type: ignore[attr-defined]


class RecordingFactory(WrappingFactory):
    protocol = _Recording

    def __init__(self, wrappedFactory: Factory) -> None:
        super().__init__(wrappedFactory)
        self.writes: list[int] = []
        self.producers: list[bool] = []


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """Sees every ``transport.write`` and ``registerProducer`` of the client."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner
        self.writes: list[int] = []
        self.producers: list[bool] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = RecordingFactory(cast(Factory, protocolFactory))
        factory.writes = self.writes
        factory.producers = self.producers
        return self.inner.connect(factory)


def bigMessage(size: int) -> bytes:
    """Mixed lines: leading dots, CRLF and bare CR, 8-bit bytes, long lines."""
    rng = random.Random(size)
    kinds = [b".dot", b"..two", b"crlf\r\n", b"bare\rcr", b"\xc3\xa9t\xc3\xa9", b"x" * 900, b""]
    lines = [b"Subject: big\n\n"]
    total = 0
    while total < size:
        line = rng.choice(kinds) + b"\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines) + b"last line without newline"


class StreamingTests(ClientTestCase):
    async def sendSource(self, source: Any, port: int | None = None, **options: Any) -> Any:
        endpoint = RecordingEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.port))
        result: TransactionResult = await sendMessage(
            reactor,
            endpoint,
            ClientOptions(heloName="client.test", **options),
            "sender@client.test",
            ["rcpt@mx.test"],
            source,
        )
        return result, endpoint

    async def assertStreamed(self, tls: bool) -> None:
        server = await self.serve(BigMX, tls=tls)
        message = bigMessage(4 * 1024 * 1024)
        source = DelayedSource(message)
        result, endpoint = await self.sendSource(source, replyTimeout=30)
        self.assertIsNone(result.failure)
        self.assertEqual(result.data.code if result.data else None, 250)
        if tls:
            self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        wire = wireMessage(message)
        self.assertEqual(server.messages, [wire])
        self.assertEqual(endpoint.producers, [True])
        self.assertLessEqual(max(endpoint.writes), 2 * CHUNK_SIZE)
        self.assertGreater(len(endpoint.writes), len(message) // CHUNK_SIZE)
        self.assertEqual(source.mostPending, 1)  # one chunk read at a time
        self.assertEqual(source.offsets[0], 0)
        mail = server.encrypted[1] if tls else server.commands[1]
        self.assertEqual(mail, f"MAIL FROM:<sender@client.test> SIZE={len(wire) - 3} BODY=8BITMIME")

    async def test_multiMiBMessageByteExact(self) -> None:
        await self.assertStreamed(tls=False)

    async def test_multiMiBMessageByteExactOverStartTLS(self) -> None:
        await self.assertStreamed(tls=True)

    async def test_sizeAndBodyAsFromTheWholeMessage(self) -> None:
        for message in (b"plain\n.dot\r\nend", "é\n".encode(), b""):
            info = measureWire(message)
            self.assertEqual(info, WireInfo(len(wireMessage(message)), not message.isascii()))
            server = await self.serve(BigMX)
            result, _ = await self.sendSource(DelayedSource(message))
            self.assertIsNone(result.failure)
            expected = f"MAIL FROM:<sender@client.test> SIZE={info.size - 3}"
            if info.eightBit:
                expected += " BODY=8BITMIME"
            self.assertEqual(server.commands[1], expected)
            self.assertEqual(server.messages, [wireMessage(message)])

    async def test_nextAttemptReadsFromTheStart(self) -> None:
        class Dropping(BigMX):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if self.inData and len(self.buffer) > 3 * CHUNK_SIZE:
                    self.transport.abortConnection()  # type: ignore[union-attr]

        first = await self.serve(Dropping)
        firstPort = self.port
        second = await self.serve(BigMX)
        message = bigMessage(1024 * 1024)
        source = DelayedSource(message)
        result, _ = await self.sendSource(source, port=firstPort)
        self.assertIn("connection died. Possible duplicate!", result.failure or "")
        self.assertEqual(first.messages, [])
        readBefore = len(source.offsets)
        self.assertGreater(max(source.offsets), 3 * CHUNK_SIZE)
        result, _ = await self.sendSource(source)
        self.assertIsNone(result.failure)
        self.assertEqual(source.offsets[readBefore], 0)
        self.assertEqual(second.messages, [wireMessage(message)])

    async def test_readErrorNeverEndsTheData(self) -> None:
        server = await self.serve(BigMX)
        message = bigMessage(1024 * 1024)
        result, _ = await self.sendSource(DelayedSource(message, failAt=3 * CHUNK_SIZE))
        self.assertEqual(result.failure, "Unable to read message: Input/output error. (#4.3.0)")
        self.assertTrue(result.messageSent)
        self.assertIsNone(result.data)
        self.assertEqual(server.messages, [])
        self.assertNotIn("QUIT", server.commands)

    async def test_slowReaderHoldsTheProducerAndTimesOut(self) -> None:
        """A peer that stops reading the data: the producer is paused (the
        source is not read far ahead of what the socket took) and the reply
        timeout still ends the attempt."""

        class Stalling(BigMX):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if self.inData and not getattr(self, "stalled", False):
                    self.stalled = True
                    self.transport.pauseProducing()  # type: ignore[union-attr]
                    reactor.callLater(2, self.transport.resumeProducing)  # type: ignore[union-attr]

        await self.serve(Stalling)
        source = EndlessLines(256 * 1024 * 1024)
        result, endpoint = await self.sendSource(source, replyTimeout=1)
        self.assertEqual(result.failure, "Connection to 127.0.0.1 timed out. (#4.4.2)")
        self.assertTrue(result.messageSent)
        self.assertLess(source.furthest, 64 * 1024 * 1024)
        self.assertLessEqual(max(endpoint.writes), 2 * CHUNK_SIZE)
