"""A queued message as the SMTP client's ``MessageSource``, read in a worker.

``openQueuedMessage`` makes one per delivery: a first pass over the queue
file (in a worker, chunk by chunk) finds the wire size and whether any byte
is 8-bit, for ``MAIL FROM``; the client then reads the message again, a
chunk at a time, for each destination it tries. Nothing but the chunk being
read or sent is held in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.smtp.source import CHUNK_SIZE
from qmailtx.smtp.wire import WireInfo, WireMeter

Runner = Callable[..., Deferred[Any]]


class QueueFileSource:
    """The message part of one queue file; every read runs in a worker."""

    def __init__(
        self, runner: Runner, disk: QueueDisk, message: QueuedMessage, info: WireInfo
    ) -> None:
        self._run = runner
        self.disk = disk
        self.message = message
        self.info = info

    def read(self, offset: int, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = self._run(self.disk.readMessageChunk, self.message, offset, size)
        return d

    def readAll(self) -> Deferred[bytes]:
        d: Deferred[bytes] = self._run(
            self.disk.readMessage, self.message, self.message.messageLength
        )
        return d


def measureQueuedMessage(disk: QueueDisk, message: QueuedMessage, chunkSize: int) -> WireInfo:
    """Blocking: one pass over the message for its ``WireInfo``."""
    meter = WireMeter()
    for chunk in disk.iterMessage(message, chunkSize):
        meter.feed(chunk)
    return meter.finish()


async def openQueuedMessage(
    runner: Runner, disk: QueueDisk, message: QueuedMessage, chunkSize: int = CHUNK_SIZE
) -> QueueFileSource:
    """The source for ``message``, measured; raises OSError when it cannot be read."""
    info: WireInfo = await runner(measureQueuedMessage, disk, message, chunkSize)
    return QueueFileSource(runner, disk, message, info)
