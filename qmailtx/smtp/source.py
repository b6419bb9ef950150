"""Where the SMTP client's DATA comes from, and the producer that sends it.

A ``MessageSource`` is a stored message (LF line ends) the client can read
in chunks from any offset, as often as it likes: every destination tried
starts again at offset 0. Its ``info`` (wire size, 8-bit or not) is known
before the transaction, for ``MAIL FROM``'s ``SIZE=`` and ``BODY=8BITMIME``.
``BytesSource`` is one in memory; the queue's is
``qmailtx.delivery.source.QueueFileSource``, reading in a worker thread.

``DataProducer`` writes a source's wire form (``qmailtx.smtp.wire``) to a
transport as a streaming producer: one chunk read at a time, no more read
while the transport says pause, so a connection holds a chunk or two of the
message however large it is, over TCP and TLS alike.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from qmailtx.smtp.wire import WireConverter, WireInfo, measureWire

__all__ = ["CHUNK_SIZE", "BytesSource", "DataProducer", "MessageSource", "SourceError"]

CHUNK_SIZE = 64 * 1024


class SourceError(Exception):
    """The message could not be read; ``reason`` is the underlying exception."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason


class MessageSource(Protocol):
    info: WireInfo

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        """Up to ``size`` bytes of the stored message from ``offset``; b"" at its end."""

    def readAll(self) -> Deferred[bytes]:
        """The whole stored message (for the rare callers that must rewrite it)."""


class BytesSource:
    """A message already in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.info = measureWire(data)

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        return succeed(self.data[offset : offset + size])

    def readAll(self) -> Deferred[bytes]:
        return succeed(self.data)


@implementer(IPushProducer)
class DataProducer:
    """Sends one source's wire form (``CRLF.CRLF`` included) to ``transport``.

    ``start()`` answers a Deferred that fires once the last byte is written
    (handed to the transport), or fails with ``SourceError`` when a read
    failed (the data is then incomplete: the caller must not end it) or
    ``ConnectionLost`` when the transport stopped it.
    """

    def __init__(
        self, source: MessageSource, transport: IConsumer, chunkSize: int = CHUNK_SIZE
    ) -> None:
        self.source = source
        self.transport = transport
        self.chunkSize = chunkSize
        self.converter = WireConverter()
        self.offset = 0
        self.done: Deferred[None] = Deferred()
        self.paused = False
        self.reading = False
        self.looping = False
        self.finished = False

    def start(self) -> Deferred[None]:
        self.transport.registerProducer(self, True)
        self._next()
        return self.done

    def stop(self) -> None:
        """Stop sending (the caller gave up); ``done`` is left as it is."""
        if not self.finished:
            self.finished = True
            self.transport.unregisterProducer()

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._next()

    def stopProducing(self) -> None:
        self._fail(ConnectionLost("connection lost while sending the message"), False)

    # reading and writing

    def _next(self) -> None:
        if self.looping:
            return  # a synchronous read answered inside the loop below: it goes on
        self.looping = True
        try:
            while not (self.paused or self.reading or self.finished):
                self.reading = True
                d = self.source.read(self.offset, self.chunkSize)
                d.addCallbacks(self._got, self._readFailed)
                d.addErrback(lambda f: self._fail(f.value, True))
        finally:
            self.looping = False

    def _got(self, chunk: bytes) -> None:
        self.reading = False
        if self.finished:
            return
        if not chunk:
            self.finished = True
            self.transport.write(self.converter.finish())
            self.transport.unregisterProducer()
            self.done.callback(None)
            return
        self.offset += len(chunk)
        self.transport.write(self.converter.feed(chunk))
        self._next()

    def _readFailed(self, failure: Failure) -> None:
        self.reading = False
        self._fail(SourceError(failure.value), True)

    def _fail(self, error: Exception, unregister: bool) -> None:
        if self.finished or self.done.called:
            return
        self.finished = True
        if unregister:
            self.transport.unregisterProducer()
        self.done.errback(error)
