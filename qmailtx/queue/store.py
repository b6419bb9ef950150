"""The queue seen from the reactor thread: every disk call runs in the worker pool.

``Spool`` takes a message as it arrives: small messages stay in memory until
the end and cost one worker job (write, fsync, link, fsync directory);
large ones are written in 64 KiB batches while the client is still sending,
and the SMTP server pauses reading while more than 256 KiB wait for the disk,
so memory per connection stays bounded.

With a QMAILQUEUE filter (``qmailtx.queue.filter``) a message is spooled
into a scratch file instead, and at commit the filter gets it; the filter's
``qmailtx-queue`` links it into ``mess/`` and wakes the queue manager
(``arrived``), so the commit answers a ``Filtered`` receipt rather than the
queued message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from qmailtx.address import Address
from qmailtx.logging import logsafe
from qmailtx.queue.disk import QueueDisk, ScanResult, SpoolFile
from qmailtx.queue.filter import QueueFilter, QueueRefused
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.qq import encodeQmailEnvelope

T = TypeVar("T")
Runner = Callable[..., "Deferred[Any]"]
Listener = Callable[[QueuedMessage], None]
ArrivalListener = Callable[[AbstractSet[str] | None], None]

log = Logger()


@dataclass(frozen=True)
class Filtered:
    """A message the QMAILQUEUE filter accepted (exit 0).

    Its ``qmailtx-queue`` queued it as ``msgid`` (unless the filter dropped
    it, or queued it otherwise); the queue manager learns of it from the
    trigger, not from the store's listeners.
    """

    msgid: str


Queued = QueuedMessage | Filtered


@dataclass(frozen=True)
class _Envelope:
    birth: float
    sender: Address
    recipients: list[Address]
    info: dict[str, str]


def synchronousRunner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run disk work inline: for tests that want determinism, never for serving."""
    return maybeDeferred(f, *args)


class Spool:
    FLUSH = 64 * 1024
    HIGH = 256 * 1024

    def __init__(
        self, store: QueueStore, spoolFile: SpoolFile, envelope: _Envelope | None = None
    ) -> None:
        self._store = store
        self._file = spoolFile
        self._envelope = envelope  # set: the message goes to the queue filter
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

    def commit(self) -> Deferred[Queued]:
        """Make the message durable; fires once it is (the 250 may be sent then).

        Fails with QueueRefused when the queue filter refuses the message.
        """
        if self._closed:
            raise RuntimeError("spool already closed")
        self._closed = True

        def go(_: object) -> Deferred[Queued]:
            if self._failure is not None:
                self._store._run(self._store.disk.spoolAbort, self._file)
                failed: Deferred[Queued] = Deferred()
                failed.errback(self._failure)
                return failed
            if self._envelope is not None:
                return self._store._viaFilter(self._file, self._takeBuffer(), self._envelope)
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
    """Async face of QueueDisk; tells its listeners about every committed message.

    With ``queueFilter``, every message goes through it instead (see the
    module's docstring).
    """

    def __init__(
        self, disk: QueueDisk, runner: Runner, queueFilter: QueueFilter | None = None
    ) -> None:
        self.disk = disk
        self._run = runner
        self.filter = queueFilter
        self._listeners: list[Listener] = []
        self._arrivalListeners: list[ArrivalListener] = []

    def addListener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def addArrivalListener(self, listener: ArrivalListener) -> None:
        """``listener(msgids)`` hears of messages another process linked into
        the queue (qmailtx-queue): their ids, or None for "look everywhere"."""
        self._arrivalListeners.append(listener)

    def arrived(self, msgids: AbstractSet[str] | None) -> None:
        for listener in self._arrivalListeners:
            try:
                listener(msgids)
            except Exception:
                log.failure("queue arrival listener failed")

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
        if self.filter is not None:
            envelope = _Envelope(birth, sender, recipients, info)
            return Spool(self, self.disk.newFilterSpool(), envelope)
        return Spool(self, self.disk.newSpool(birth, sender, recipients, info))

    def inject(
        self,
        birth: float,
        sender: Address,
        recipients: list[Address],
        content: bytes,
        info: dict[str, str],
    ) -> Deferred[Queued]:
        """Queue a whole message (bounces, forwards, auto-replies); fails with
        QueueRefused when the queue filter refuses it."""
        if self.filter is not None:
            envelope = _Envelope(birth, sender, recipients, info)
            return self._viaFilter(self.disk.newFilterSpool(), content, envelope)
        d = self._run(self.disk.inject, birth, sender, recipients, content, info)
        return d.addCallback(self._committed)

    def _viaFilter(self, spool: SpoolFile, data: bytes, envelope: _Envelope) -> Deferred[Queued]:
        return Deferred.fromCoroutine(self._filterMessage(spool, data, envelope))

    async def _filterMessage(self, spool: SpoolFile, data: bytes, envelope: _Envelope) -> Queued:
        queueFilter = self.filter
        assert queueFilter is not None
        msgid = spool.msgid
        qq = encodeQmailEnvelope(envelope.sender, envelope.recipients)
        messageFd, envelopeFd = await self._run(self.disk.filterInput, spool, data, qq)
        try:
            result = await queueFilter.run(messageFd, envelopeFd, msgid, envelope.info)
        finally:
            os.close(messageFd)
            os.close(envelopeFd)
        if result.stderr:
            log.info(
                "queue filter for msg {msgid} said: {text}",
                msgid=msgid,
                text=logsafe(result.stderr.decode("latin-1").strip()),
            )
        reply = result.reply()
        if reply is not None:
            log.info(
                "queue filter refused msg {msgid} from <{sender}>: {how}: {code} {text}",
                msgid=msgid,
                sender=str(envelope.sender),
                how=result.describe(),
                code=reply.code,
                text=reply.text,
            )
            raise QueueRefused(reply)
        log.info("queue filter passed msg {msgid}", msgid=msgid)
        self.arrived({msgid})
        return Filtered(msgid)

    def scan(self) -> Deferred[ScanResult]:
        return self._run(self.disk.scan)

    def loadNew(
        self, msgids: AbstractSet[str] | None, known: AbstractSet[str]
    ) -> Deferred[tuple[list[QueuedMessage], list[tuple[str, str]]]]:
        return self._run(self.disk.loadNew, msgids, known)

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
