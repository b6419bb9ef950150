"""The server's end of ``<data>/trigger`` (see ``qmailtx.queue.trigger``).

The FIFO is held open for reading and, so that a writer closing it does not
leave it at end-of-file (readable forever), for writing too. Each read
becomes one call of ``arrived`` (message ids, or None: look everywhere),
which the queue manager folds into its next look at the queue.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from qmailtx.queue.trigger import MAYBE_OVERFLOWED, READ_SIZE, parseTriggers

log = Logger()


@implementer(IReadDescriptor)
class QueueTriggerService(Service):
    """Listens on the trigger FIFO and calls ``arrived(msgids | None)`` once per read.

    ``reactor`` provides IReactorFDSet.
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        arrived: Callable[[AbstractSet[str] | None], None],
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.arrived = arrived
        self._readFd: int | None = None
        self._writeFd: int | None = None

    def startService(self) -> None:
        super().startService()
        self._makeFifo()
        self._readFd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._writeFd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.reactor.addReader(self)

    def stopService(self) -> None:
        super().stopService()
        if self._readFd is not None:
            self.reactor.removeReader(self)
            os.close(self._readFd)
            self._readFd = None
        if self._writeFd is not None:
            os.close(self._writeFd)
            self._writeFd = None

    def _makeFifo(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISFIFO(st.st_mode):
                return
            log.warn("{path} is not a FIFO; replacing it", path=self.path)
            os.unlink(self.path)
        try:
            os.mkfifo(self.path, 0o600)
        except FileExistsError:
            pass

    # -- IReadDescriptor -----------------------------------------------------

    def fileno(self) -> int:
        return -1 if self._readFd is None else self._readFd

    def logPrefix(self) -> str:
        return "qmailtx-trigger"

    def doRead(self) -> None:
        if self._readFd is None:
            return
        chunks = []
        total = 0
        while True:
            try:
                data = os.read(self._readFd, READ_SIZE)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    break
                raise
            if not data:
                break
            chunks.append(data)
            total += len(data)
        if not chunks:
            return
        ids, everywhere = parseTriggers(b"".join(chunks))
        if everywhere or total >= MAYBE_OVERFLOWED:
            self.arrived(None)
        elif ids:
            self.arrived(ids)

    def connectionLost(self, reason: Failure) -> None:
        pass
