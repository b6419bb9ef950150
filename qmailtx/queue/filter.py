"""QMAILQUEUE: every message the queue takes passes through an external program.

When ``[queue] qmailqueue`` (or, as in qmail, ``$QMAILQUEUE`` in the
server's environment) names a program, the queue store does not link a
message into ``mess/`` itself: it runs the program exactly as qmail runs
qmail-queue, with the message on fd 0 and the envelope
(``F<sender>\\0T<rcpt>\\0...\\0``) on fd 1, both regular files read from
offset 0, and reads its exit code with qmail-queue's table
(``qmailtx.queue.qq``). That covers SMTP, bounces, forwards and
auto-replies alike.

The program (a virus or spam scanner such as simscan or qmail-scanner, a
header fixer) does its work and then execs ``qmailtx-queue``, our
qmail-queue, with the same or rewritten fds; that command writes the
message durably into ``<data>/queue`` and only then exits 0, so "250" still
means the message is on disk. The program runs:

- with the argv from the config (``$QMAILQUEUE``: that path alone), never
  through a shell, in the data folder (qmail: QMAILHOME);
- with the server's environment plus ``QMAILTX_QUEUE`` (the queue folder),
  ``QMAILTX_QUEUE_PROGRAM`` and ``QMAILQUEUE`` (the ``qmailtx-queue``
  command, so a filter that execs ``$QMAILQUEUE`` reaches it and never
  itself), ``QMAILTX_QUEUE_MSGID`` (the id the message gets),
  ``QMAILTX_QUEUE_INFO`` (JSON: client address, session) and
  ``TCPREMOTEIP`` for mail that came in by SMTP; as qmail's tcpserver and
  qmail-smtpd-auth set them, ``RELAYCLIENT`` (empty) when the client may
  relay (relay_clients or AUTH: simscan and qmail-scanner skip their checks
  for it) and ``TCPREMOTEINFO`` (the AUTH user) when it logged in. The
  server's own values of these are never passed on;
- for at most ``FILTER_TIMEOUT`` seconds (less than the 10 minutes an SMTP
  client waits for the reply to its final dot); then it is killed and the
  message tempfailed (``451 4.3.0 qq timeout``).

Its standard error is logged.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from qmailtx.config import Config
from qmailtx.process import spawnBounded
from qmailtx.queue.qq import CRASHED, QQ_EXEC_FAILED, TIMED_OUT, qqReply
from qmailtx.reply import SMTPReply

log = Logger()

FILTER_TIMEOUT = 300.0
MAX_STDERR = 4096
INJECTOR = "qmailtx-queue"


class QueueRefused(OSError):
    """The queue (its QMAILQUEUE filter) did not take a message; ``reply`` says
    how, as qmail-smtpd would answer (5xx permanent, 4xx temporary).

    An OSError, so that callers that treat a failing queue as a temporary
    problem (forwards in local delivery) keep doing so.
    """

    def __init__(self, reply: SMTPReply) -> None:
        super().__init__(None, reply.text)
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500

    def __str__(self) -> str:
        return str(self.reply)


@dataclass(frozen=True)
class FilterResult:
    """How a filter run ended."""

    exitCode: int | None
    signal: int | None = None
    timedOut: bool = False
    startError: str | None = None  # no process was started
    stderr: bytes = b""

    def reply(self) -> SMTPReply | None:
        """The SMTP reply for this end (qmail.c's ``qmail_close``); None: queued."""
        if self.timedOut:
            return TIMED_OUT
        if self.startError is not None:
            return qqReply(QQ_EXEC_FAILED)
        if self.signal is not None or self.exitCode is None:
            return CRASHED
        return qqReply(self.exitCode)

    def describe(self) -> str:
        if self.timedOut:
            return "timed out"
        if self.startError is not None:
            return f"not started ({self.startError})"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit {self.exitCode}"


class QueueFilter:
    """Runs the configured qmail-queue stand-in for one message at a time.

    ``reactor`` provides IReactorProcess and IReactorTime.
    """

    def __init__(
        self,
        reactor: Any,
        argv: Sequence[str],
        folder: str,
        queueRoot: str,
        environment: Mapping[str, str],
        injector: str | None,
        timeout: float = FILTER_TIMEOUT,
    ) -> None:
        if not argv:
            raise ValueError("a queue filter needs a program")
        self.reactor = reactor
        self.argv = list(argv)
        self.folder = folder
        self.queueRoot = queueRoot
        self.injector = injector
        self.timeout = timeout
        env = {k: v for k, v in environment.items() if k not in _PER_MESSAGE}
        env["QMAILTX_QUEUE"] = queueRoot
        if injector is not None:
            env["QMAILTX_QUEUE_PROGRAM"] = injector
            env["QMAILQUEUE"] = injector
        self.environment = env

    def describe(self) -> str:
        return " ".join(self.argv)

    def environmentFor(self, msgid: str, info: Mapping[str, str]) -> dict[str, str]:
        env = dict(self.environment)
        env["QMAILTX_QUEUE_MSGID"] = msgid
        env["QMAILTX_QUEUE_INFO"] = json.dumps(dict(info), sort_keys=True)
        if info.get("c"):
            env["TCPREMOTEIP"] = info["c"]
        if info.get("r"):
            env["RELAYCLIENT"] = ""
        if info.get("u"):
            env["TCPREMOTEINFO"] = info["u"]
        return env

    def run(
        self, messageFd: int, envelopeFd: int, msgid: str, info: Mapping[str, str]
    ) -> Deferred[FilterResult]:
        """Run the filter on the two files (the caller keeps and closes them).

        Never fails: a program that cannot be started ends with
        ``startError`` (qmail's exit 120, ``451 unable to exec qq``).
        """
        program = self.argv[0]
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            return succeed(FilterResult(None, startError=f"{program}: not an executable file"))
        env = self.environmentFor(msgid, info)
        if any("\0" in a for a in self.argv) or any("\0" in k + v for k, v in env.items()):
            return succeed(FilterResult(None, startError="a NUL in its arguments"))
        try:
            done = spawnBounded(
                self.reactor,
                self.reactor,
                program,
                self.argv,
                env=env,
                path=self.folder,
                childFDs={0: messageFd, 1: envelopeFd, 2: "r"},
                limit=MAX_STDERR,
                timeout=self.timeout,
            )
        except (OSError, ValueError) as e:
            return succeed(FilterResult(None, startError=str(e)))
        return done.addCallback(
            lambda r: FilterResult(r.exitCode, r.signal, r.timedOut, None, r.output)
        )


_PER_MESSAGE = frozenset(
    {
        "QMAILQUEUE",
        "QMAILTX_QUEUE_MSGID",
        "QMAILTX_QUEUE_INFO",
        "TCPREMOTEIP",
        "TCPREMOTEINFO",
        "RELAYCLIENT",
    }
)


def findInjector(executable: str = sys.executable) -> str | None:
    """The installed ``qmailtx-queue`` command: next to the Python running
    qmailtx (its virtualenv's bin/), else on $PATH."""
    beside = os.path.join(os.path.dirname(os.path.abspath(executable)), INJECTOR)
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which(INJECTOR)


def filterCommand(config: Config, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The filter's argv: ``[queue] qmailqueue``, else ``$QMAILQUEUE`` (a path
    alone, relative to the data folder as qmail's is to QMAILHOME), else ()."""
    if config.queue.qmailqueue:
        return config.queue.qmailqueue
    fromEnvironment = environ.get("QMAILQUEUE", "")
    if fromEnvironment:
        return (os.path.join(config.paths.data, fromEnvironment),)
    return ()


def makeQueueFilter(
    reactor: Any,
    config: Config,
    environ: Mapping[str, str] = os.environ,
    injector: str | None = None,
) -> QueueFilter | None:
    """The QueueFilter the config (or $QMAILQUEUE) asks for, logging the choice."""
    argv = filterCommand(config, environ)
    fromEnvironment = environ.get("QMAILQUEUE", "")
    if config.queue.qmailqueue and fromEnvironment:
        log.warn(
            "QMAILQUEUE={qmailqueue} in the environment is ignored: [queue] qmailqueue is set",
            qmailqueue=fromEnvironment,
        )
    if not argv:
        return None
    if not config.queue.qmailqueue:
        log.warn(
            "QMAILQUEUE={qmailqueue} in the environment: every message passes through {program}",
            qmailqueue=fromEnvironment,
            program=argv[0],
        )
    injector = injector or findInjector()
    if injector is None:
        log.warn(
            "{injector} is not installed: the queue filter must run"
            " {python} -m qmailtx.queue.inject itself",
            injector=INJECTOR,
            python=sys.executable,
        )
    queueFilter = QueueFilter(
        reactor,
        argv,
        config.paths.data,
        os.path.join(config.paths.data, "queue"),
        environ,
        injector,
    )
    log.info(
        "queue filter: {program}; it hands messages to {injector}",
        program=queueFilter.describe(),
        injector=injector or "-",
    )
    return queueFilter
