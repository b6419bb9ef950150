"""Line framing and flow control shared by the SMTP and POP3 servers.

Input is taken in bulk. Lines end at LF (a CR before it is dropped); a line
longer than the subclass's limit is answered once, when it ends, and is
never split into commands; one that goes on past ``DISCARD_LIMIT`` bytes
hangs up. Replies leave in command order: while a command's answer is
pending (``_busy``), or while the client is not reading our replies, later
pipelined input stays buffered and unprocessed; reading from the socket is
paused once that buffer is full. (It is not paused at once when the
transport pauses us: a TLS transport does so while its handshake is
unfinished, and the handshake needs reading.)

A subclass supplies its replies and its protocol: ``closed``, ``_write``,
``lineReceived``, ``lineLimit``, ``lineTooLong``, ``lineOverflowed``,
``timedOut``, ``tooManyBadCommands``, ``internalError`` and ``closing``.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

INPUT_LIMIT = 64 * 1024  # pipelined input held while a command is pending
DISCARD_LIMIT = 64 * 1024  # bytes of one over-long line before we hang up

ReplyT = TypeVar("ReplyT")


@implementer(IPushProducer)
class LineServer(Protocol, Generic[ReplyT]):
    def __init__(self, clock: IReactorTime, timeout: float, maxBadCommands: int) -> None:
        self._clock = clock
        self._timeout = timeout
        self._maxBadCommands = maxBadCommands
        self._buffer = b""
        self._busy = False  # a command's reply is pending
        self._outputBlocked = False  # the client is not reading our replies
        self._readingPaused = False
        self._registered = False  # we are the transport's producer
        self._discarding = -1  # bytes discarded from an over-long line; -1: not discarding
        self._badCommands = 0
        self._timer: IDelayedCall | None = None

    # -- hooks ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def closing(self) -> None:
        """Mark the session closed and release what it holds (``_close``)."""
        raise NotImplementedError

    def _write(self, reply: ReplyT) -> None:
        raise NotImplementedError

    def lineReceived(self, line: bytes) -> None:
        raise NotImplementedError

    def lineLimit(self, buf: bytes) -> int:
        """Longest line accepted, CRLF included, for the line ``buf`` starts."""
        raise NotImplementedError

    def lineTooLong(self) -> None:
        """An over-long line has ended: answer it (one reply)."""
        raise NotImplementedError

    def lineOverflowed(self) -> None:
        """An over-long line went past ``DISCARD_LIMIT``: say so (we then hang up)."""
        raise NotImplementedError

    def timedOut(self) -> None:
        """The client was idle too long: say so (we then hang up)."""
        raise NotImplementedError

    def tooManyBadCommands(self) -> None:
        """Say we hang up after too many bad commands."""
        raise NotImplementedError

    def internalError(self, failure: Failure) -> ReplyT:
        """The reply to a command whose answer failed."""
        raise NotImplementedError

    def outputResumed(self) -> None:
        """The transport takes replies again (before pending input is processed)."""

    def nextInput(self) -> bool:
        """Consume some buffered input; False when it cannot be consumed yet."""
        return self._nextLine()

    # -- connection ---------------------------------------------------------

    def startServing(self) -> None:
        """Begin the session (from ``connectionMade``): become the transport's
        producer and start the idle timer."""
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._registered = True
        self._resetTimer()

    def _close(self) -> None:
        if self.closed:
            return
        self.closing()
        self._buffer = b""
        self._stopTimer()
        # A registered producer holds a TLS transport's close (it waits for
        # the producer to go away before it sends close_notify).
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _discardPipelined(self) -> int:
        """Throw away buffered input (CVE-2011-0411: what was pipelined in
        plaintext after STARTTLS/STLS may not count as said inside TLS);
        the number of bytes thrown away."""
        discarded = len(self._buffer)
        self._buffer = b""
        self._discarding = -1
        return discarded

    # -- timeouts ------------------------------------------------------------

    def _stopTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _resetTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        if self.closed:
            return
        self.timedOut()
        self._close()

    # -- flow control ----------------------------------------------------------

    def pauseProducing(self) -> None:
        """The transport cannot take more replies now (its buffer is full, or TLS
        is still handshaking): hold further input until it can."""
        self._outputBlocked = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._outputBlocked = False
        self.outputResumed()
        self._updateReading()
        self._process()

    def stopProducing(self) -> None:
        pass

    def _updateReading(self) -> None:
        held = self._busy or self._outputBlocked
        pause = held and len(self._buffer) >= INPUT_LIMIT
        if self.closed or pause == self._readingPaused:
            return
        self._readingPaused = pause
        if pause:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._resetTimer()
        self._buffer = self._buffer + data if self._buffer else data
        self._process()
        self._updateReading()

    def _process(self) -> None:
        while self._buffer and not self._busy and not self._outputBlocked:
            if self.closed:
                self._buffer = b""
                return
            if not self.nextInput():
                break

    def _nextLine(self) -> bool:
        """Handle one line; False when no whole line is buffered."""
        buf = self._buffer
        nl = buf.find(b"\n")
        if self._discarding >= 0:
            if nl < 0:
                self._discarding += len(buf)
                self._buffer = b""
                if self._discarding > DISCARD_LIMIT:
                    self.lineOverflowed()
                    self._close()
                return False
            self._buffer = buf[nl + 1 :]
            self._discarding = -1
            self.lineTooLong()
            return True
        limit = self.lineLimit(buf)
        if nl < 0:
            if len(buf) > limit:
                self._discarding = len(buf)
                self._buffer = b""
            return False
        self._buffer = buf[nl + 1 :]
        if nl + 1 > limit:
            self.lineTooLong()
            return True
        line = buf[: nl - 1] if nl and buf[nl - 1] == 13 else buf[:nl]
        self.lineReceived(line)
        return True

    # -- answers -------------------------------------------------------------

    def _answer(self, result: ReplyT | Deferred[Any] | None) -> None:
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self.internalError)
            result.addCallback(self._answerLater)
        elif result is not None:
            self._write(result)

    def _answerLater(self, reply: ReplyT | None) -> None:
        self._busy = False
        if self.closed:
            return
        if reply is not None:
            self._write(reply)
        self._process()
        self._updateReading()

    def _badCommand(self, reply: ReplyT) -> None:
        self._badCommands += 1
        if self._badCommands >= self._maxBadCommands:
            self.tooManyBadCommands()
            self._close()
            return
        self._write(reply)
