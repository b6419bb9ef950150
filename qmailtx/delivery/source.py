"""A queued message as the SMTP client's ``MessageSource``, read in a worker.

``openQueuedMessage`` makes one per delivery: a first pass over the queue
file (in a worker, chunk by chunk) finds the wire size and whether any byte
is 8-bit, for ``MAIL FROM``; the client then reads the message again, a
chunk at a time, for each destination it tries. Nothing but the chunk being
read or sent is held in memory. A message no longer than one chunk is kept
from the first pass and sent from memory, so a small message costs one trip
to a worker, as it did when the whole message was read at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.smtp.source import CHUNK_SIZE
from qmailtx.smtp.wire import WireInfo, WireMeter

Runner = Callable[..., Deferred[Any]]


class QueueFileSource:
    """The message part of one queue file; every read runs in a worker."""

    def __init__(
        self,
        runner: Runner,
        disk: QueueDisk,
        message: QueuedMessage,
        info: WireInfo,
        whole: bytes | None = None,
    ) -> None:
        self._run = runner
        self.disk = disk
        self.message = message
        self.info = info
        self.whole = whole  # the message itself, when it is one chunk at most

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        if self.whole is not None:
            return succeed(self.whole[offset : offset + size])
        if offset >= self.message.messageLength:
            return succeed(b"")
        d: Deferred[bytes] = self._run(self.disk.readMessageChunk, self.message, offset, size)
        return d

    def readAll(self) -> Deferred[bytes]:
        if self.whole is not None:
            return succeed(self.whole)
        d: Deferred[bytes] = self._run(
            self.disk.readMessage, self.message, self.message.messageLength
        )
        return d


def measureQueuedMessage(disk: QueueDisk, message: QueuedMessage, chunkSize: int) -> WireInfo:
    """Blocking: one pass over the message for its ``WireInfo``."""
    return _firstPass(disk, message, chunkSize)[0]


def _firstPass(
    disk: QueueDisk, message: QueuedMessage, chunkSize: int
) -> tuple[WireInfo, bytes | None]:
    """Blocking: the ``WireInfo``, and the message itself if it is one chunk at most."""
    meter = WireMeter()
    chunks = 0
    first = b""
    for chunk in disk.iterMessage(message, chunkSize):
        meter.feed(chunk)
        chunks += 1
        if chunks == 1:
            first = chunk
    return meter.finish(), first if chunks <= 1 else None


async def openQueuedMessage(
    runner: Runner, disk: QueueDisk, message: QueuedMessage, chunkSize: int = CHUNK_SIZE
) -> QueueFileSource:
    """The source for ``message``, measured; raises OSError when it cannot be read."""
    info, whole = await runner(_firstPass, disk, message, chunkSize)
    return QueueFileSource(runner, disk, message, info, whole)
