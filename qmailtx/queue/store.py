"""The queue seen from the reactor thread: every disk call runs in the worker pool.

``Spool`` takes a message as it arrives: small messages stay in memory until
the end and cost one worker job (write, fsync, link, fsync directory);
large ones are written in 64 KiB batches while the client is still sending,
and the SMTP server pauses reading while more than 256 KiB wait for the disk,
so memory per connection stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from qmailtx.address import Address
from qmailtx.queue.disk import QueueDisk, ScanResult, SpoolFile
from qmailtx.queue.layout import QueuedMessage

T = TypeVar("T")
Runner = Callable[..., "Deferred[Any]"]
Listener = Callable[[QueuedMessage], None]

log = Logger()


def synchronousRunner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run disk work inline: for tests that want determinism, never for serving."""
    return maybeDeferred(f, *args)


class Spool:
    FLUSH = 64 * 1024
    HIGH = 256 * 1024

    def __init__(self, store: QueueStore, spoolFile: SpoolFile) -> None:
        self._store = store
        self._file = spoolFile
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._inflight: Deferred[None] | None = None
        self._failure: Failure | None = None
        self._closed = False
        self._drainWaiters: list[Deferred[None]] = []

    def write(self, data: bytes) -> None:
        if self._closed or self._failure is not None or not data:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= self.FLUSH and self._inflight is None:
            self._flush()

    def needsDrain(self) -> bool:
        return self._buffered >= self.HIGH and self._failure is None

    def whenDrained(self) -> Deferred[None]:
        if not self.needsDrain():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drainWaiters.append(d)
        return d

    def _takeBuffer(self) -> bytes:
        data = b"".join(self._buffer)
        self._buffer = []
        self._buffered = 0
        return data

    def _flush(self) -> None:
        d = self._store._run(self._store.disk.spoolWrite, self._file, self._takeBuffer())
        self._inflight = d
        d.addCallbacks(self._flushed, self._flushFailed)
        self._fireDrained()

    def _flushed(self, _: object) -> None:
        self._inflight = None
        if self._closed:
            return
        if self._buffered >= self.FLUSH:
            self._flush()

    def _flushFailed(self, failure: Failure) -> None:
        self._inflight = None
        self._failure = failure
        self._takeBuffer()
        self._fireDrained()

    def _fireDrained(self) -> None:
        if not self.needsDrain():
            waiters, self._drainWaiters = self._drainWaiters, []
            for d in waiters:
                d.callback(None)

    def _afterInflight(self) -> Deferred[None]:
        if self._inflight is None:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def chain(result: object) -> object:
            d.callback(None)
            return result

        self._inflight.addBoth(chain)
        return d

    def commit(self) -> Deferred[QueuedMessage]:
        """Make the message durable; fires once it is (the 250 may be sent then)."""
        if self._closed:
            raise RuntimeError("spool already closed")
        self._closed = True

        def go(_: object) -> Deferred[QueuedMessage]:
            if self._failure is not None:
                self._store._run(self._store.disk.spoolAbort, self._file)
                failed: Deferred[QueuedMessage] = Deferred()
                failed.errback(self._failure)
                return failed
            d = self._store._run(self._store.disk.spoolCommit, self._file, self._takeBuffer())
            return d.addCallback(self._store._committed)

        return self._afterInflight().addCallback(go)

    def abort(self) -> None:
        """Forget the message (connection lost, too big, refused)."""
        if self._closed:
            return
        self._closed = True
        self._takeBuffer()

        def go(_: object) -> None:
            self._store._run(self._store.disk.spoolAbort, self._file).addErrback(
                lambda f: log.failure("removing an aborted spool file failed", f)
            )

        self._afterInflight().addCallback(go)
        self._fireDrained()


class QueueStore:
    """Async face of QueueDisk; tells its listeners about every committed message."""

    def __init__(self, disk: QueueDisk, runner: Runner) -> None:
        self.disk = disk
        self._run = runner
        self._listeners: list[Listener] = []

    def addListener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _committed(self, message: QueuedMessage) -> QueuedMessage:
        for listener in self._listeners:
            try:
                listener(message)
            except Exception:
                log.failure("queue listener failed for {msgid}", msgid=message.msgid)
        return message

    def openSpool(
        self, birth: float, sender: Address, recipients: list[Address], info: dict[str, str]
    ) -> Spool:
        return Spool(self, self.disk.newSpool(birth, sender, recipients, info))

    def inject(
        self,
        birth: float,
        sender: Address,
        recipients: list[Address],
        content: bytes,
        info: dict[str, str],
    ) -> Deferred[QueuedMessage]:
        d = self._run(self.disk.inject, birth, sender, recipients, content, info)
        return d.addCallback(self._committed)

    def scan(self) -> Deferred[ScanResult]:
        return self._run(self.disk.scan)

    def mark(
        self, message: QueuedMessage, changes: dict[int, str], nextAttempt: float | None
    ) -> Deferred[None]:
        return self._run(self.disk.mark, message, changes, nextAttempt)

    def remove(self, message: QueuedMessage) -> Deferred[None]:
        return self._run(self.disk.remove, message)

    def readHeader(self, message: QueuedMessage, limit: int) -> Deferred[tuple[bytes, bool]]:
        return self._run(self.disk.readHeader, message, limit)

    def readMessage(self, message: QueuedMessage, limit: int) -> Deferred[bytes]:
        return self._run(self.disk.readMessage, message, limit)
