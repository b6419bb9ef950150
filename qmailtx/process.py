"""Run a child process with bounded output capture and a hard timeout.

Shared by ``|program`` delivery (``qmailtx.delivery.program``) and the
QMAILQUEUE filter (``qmailtx.queue.filter``); each maps the result to its
own exit-code table.

The output of every ``"r"`` child fd is kept up to ``limit`` bytes; the
rest is read and dropped, so a chatty child neither blocks nor fills
memory. After ``timeout`` seconds a child still running gets SIGKILL (its
process group when it could be given one) and its pipes are closed, so
leftover grandchildren holding them open do not keep us waiting.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


@dataclass(frozen=True)
class ProcessResult:
    """How a child ended: an exit code or a signal, and its first output bytes."""

    exitCode: int | None
    signal: int | None
    output: bytes
    timedOut: bool = False
    truncated: bool = False


class _BoundedProtocol(ProcessProtocol):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.output = bytearray()
        self.truncated = False
        self.timedOut = False
        self.exited = False
        self.group: int | None = None
        self.timer: IDelayedCall | None = None
        self.done: Deferred[ProcessResult] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        room = self.limit - len(self.output)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.output += data

    def processExited(self, reason: Failure) -> None:
        self.exited = True

    def timeOut(self) -> None:
        """Kill a child still running; stop waiting for pipes its leftovers hold."""
        self.timer = None
        if not self.exited:
            self.timedOut = True
            self._kill()
        transport = self.transport
        if IProcessTransport.providedBy(transport):
            transport.loseConnection()

    def _kill(self) -> None:
        if self.group is not None:
            try:
                os.killpg(self.group, signal.SIGKILL)
                return
            except OSError:
                pass
        transport = self.transport
        if IProcessTransport.providedBy(transport):
            try:
                transport.signalProcess("KILL")
            except (ProcessExitedAlready, OSError):
                pass

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        exitCode: int | None = 0
        sig: int | None = None
        if reason.check(ProcessTerminated):
            value = reason.value
            exitCode, sig = value.exitCode, value.signal
        self.done.callback(
            ProcessResult(exitCode, sig, bytes(self.output), self.timedOut, self.truncated)
        )


def spawnBounded(
    reactor: IReactorProcess,
    clock: IReactorTime,
    executable: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    path: str,
    childFDs: Mapping[int, int | str],
    limit: int,
    timeout: float,
    uid: int | None = None,
    gid: int | None = None,
) -> Deferred[ProcessResult]:
    """Spawn ``argv`` and fire with its ProcessResult once it ended and its pipes closed.

    Errors from ``spawnProcess`` itself (OSError, ValueError) are raised
    here, for the caller to report as it must; the Deferred never fails.
    """
    protocol = _BoundedProtocol(limit)
    transport = reactor.spawnProcess(
        protocol,
        executable,
        list(argv),
        env=dict(env),
        path=path,
        uid=uid,
        gid=gid,
        childFDs=dict(childFDs),
    )
    protocol.group = _ownGroup(transport.pid)
    if not protocol.done.called:
        protocol.timer = clock.callLater(timeout, protocol.timeOut)
    return protocol.done


def _ownGroup(pid: int | None) -> int | None:
    """Best effort: give the child its own process group, so a timeout kills its children.

    This works while the child has not yet exec'd (setpgid is refused
    afterwards); then only the child itself is killed on timeout.
    """
    if pid is None:
        return None
    try:
        os.setpgid(pid, pid)
    except OSError:
        return None
    return pid
