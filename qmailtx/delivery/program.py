"""``|program`` delivery: the .qmail line run by ``/bin/sh -c``, as qmail-local does.

The command is the text the .qmail's owner wrote, and it alone reaches the
shell; the envelope (sender, recipient, extension) travels only in the
environment and the message only on stdin, never pasted into a command.

Standard output and standard error together are the report (qmail-lspawn's
single pipe), kept up to ``MAX_OUTPUT`` bytes; the rest is read and dropped,
so a chatty program neither blocks nor fills memory. Exit codes follow
qmail-local's mailprogram(): 0 delivered, 99 delivered and stop the later
lines, 64, 65, 70, 76, 77, 78, 100 and 112 permanent, anything else
(111, a signal, our timeout) temporary.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime

from qmailtx.delivery.identity import ProgramUser
from qmailtx.delivery.interfaces import DeliveryResult, delivered, permanent, temporary
from qmailtx.process import spawnBounded

SHELL = "/bin/sh"
MAX_OUTPUT = 3000  # qmail-lspawn's truncreport
PERMANENT_EXITS = frozenset({64, 65, 70, 76, 77, 78, 100, 112})
STOP_EXIT = 99
TOO_LONG = "Error report too long, sorry."
CRASHED = "Aack, child crashed. (#4.3.0)"
TIMED_OUT = "Timeout on program delivery. (#4.3.0)"
NO_ENTRY_FOR_USER = "permission denied for program_user"


@dataclass(frozen=True)
class ProgramResult:
    """How a program ended: an exit code or a signal, and its first output bytes."""

    exitCode: int | None
    signal: int | None
    output: bytes
    timedOut: bool = False
    truncated: bool = False
    startError: str | None = None  # no process was started: qmail's report text


def runProgram(
    reactor: IReactorProcess,
    command: str,
    env: dict[str, str],
    cwd: str,
    stdinFd: int,
    timeout: float,
    clock: IReactorTime,
    *,
    user: ProgramUser | None = None,
) -> Deferred[ProgramResult]:
    """Run ``/bin/sh -c command`` in ``cwd`` with exactly ``env``, stdin from ``stdinFd``.

    ``user``, when given, is the identity the program runs as (qmail-local
    runs as the .qmail's owner, never as root); only root can give one.
    The child chdirs into ``cwd`` before it drops to ``user``, so whether
    ``user`` may enter ``cwd`` is judged here, from the folder's mode and
    owner, and a folder it may not enter is a temporary failure.

    ``stdinFd`` must be a seekable file holding the message alone (a program
    may seek or read it twice); it is rewound to 0 first, as qmail-local
    does, and stays open (the caller closes it). After ``timeout`` seconds
    the program (its process group when it could be given one) gets SIGKILL.
    The Deferred fires with a ProgramResult once the program ended and its
    output pipes closed; it never fails: when no process could be started
    (``cwd`` unusable, fork refused) the result carries ``startError``.
    """
    problem = _unusableFolder(cwd, user)
    if problem is not None:
        return succeed(_notStarted(f"Unable to switch to {cwd}: {problem}. (#4.3.0)"))
    if "\0" in command or any("\0" in k or "\0" in v for k, v in env.items()):
        return succeed(_notStarted("Unable to run /bin/sh: a NUL in its arguments. (#4.3.0)"))
    try:
        os.lseek(stdinFd, 0, os.SEEK_SET)
        done = spawnBounded(
            reactor,
            clock,
            SHELL,
            [SHELL, "-c", command],
            env=env,
            path=cwd,
            uid=user.uid if user is not None else None,
            gid=user.gid if user is not None else None,
            childFDs={0: stdinFd, 1: "r", 2: "r"},
            limit=MAX_OUTPUT,
            timeout=timeout,
        )
    except OSError as e:
        return succeed(_notStarted(f"Unable to fork: {e.strerror or e}. (#4.3.0)"))
    except ValueError as e:  # what the OS cannot take (NULs are refused above)
        return succeed(_notStarted(f"Unable to run /bin/sh: {e}. (#4.3.0)"))
    return done.addCallback(
        lambda r: ProgramResult(r.exitCode, r.signal, r.output, r.timedOut, r.truncated)
    )


def spawnFailure(error: Exception) -> DeliveryResult:
    """qmail's temp_fork text for an error raised around ``runProgram``.

    ``runProgram`` itself reports a process it could not start in
    ``ProgramResult.startError``; this is for callers that still catch.
    """
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return temporary(f"Unable to fork: {reason}. (#4.3.0)")


def _notStarted(text: str) -> ProgramResult:
    return ProgramResult(None, None, b"", startError=text)


def _unusableFolder(path: str, user: ProgramUser | None = None) -> str | None:
    """Why the child could not chdir into ``path`` (Twisted would report a traceback).

    With a ``user``, also why that user could not: ``os.access`` would
    answer for the server, so the folder's mode and owner are read instead.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or str(e)
    except ValueError as e:
        return str(e)
    if not stat.S_ISDIR(st.st_mode):
        return os.strerror(errno.ENOTDIR)
    if not os.access(path, os.X_OK):
        return os.strerror(errno.EACCES)
    if user is not None and not user.canEnter(st):
        return NO_ENTRY_FOR_USER
    return None


def reportText(output: bytes, truncated: bool = False) -> str:
    """A program's output as report text: printable ASCII lines.

    Cut at the first NUL (qmail-lspawn's report), CRLF read as LF, tabs as
    spaces, other control and 8-bit bytes as ``_``, trailing newlines
    dropped; a truncated report says so, as qmail's does.
    """
    text = output.split(b"\0", 1)[0].decode("latin-1").replace("\r\n", "\n")
    text = "".join(
        ch if ch == "\n" or " " <= ch <= "~" else " " if ch == "\t" else "_" for ch in text
    ).rstrip("\n")
    if truncated:
        text += "\n" + TOO_LONG
    return text


def _withLine(text: str, line: str) -> str:
    return f"{text}\n{line}" if text else line


def classifyExit(result: ProgramResult) -> tuple[DeliveryResult, bool]:
    """The delivery result for one program line, and whether to stop the later lines.

    The text is the program's report (``reportText``), as qmail's is; a
    failing program that said nothing gets ``Program exited N.``, a crash
    qmail-local's ``Aack, child crashed.`` and a timeout ours.
    """
    if result.startError is not None:
        return temporary(result.startError), False
    text = reportText(result.output, result.truncated)
    if result.timedOut:
        return temporary(_withLine(text, TIMED_OUT)), False
    if result.signal is not None or result.exitCode is None:
        return temporary(_withLine(text, CRASHED)), False
    code = result.exitCode
    if code == 0:
        return delivered(text), False
    if code == STOP_EXIT:
        return delivered(text), True
    if code in PERMANENT_EXITS:
        return permanent(text or f"Program exited {code}. (#5.0.0)"), False
    return temporary(text or f"Program exited {code}. (#4.3.0)"), False
