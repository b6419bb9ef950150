"""|program delivery: real /bin/sh children, exit codes, output, environment, timeouts."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from qmailtx.delivery.dotqmail import qmailEnvironment
from qmailtx.delivery.identity import ProgramUser, resolveProgramUser
from qmailtx.delivery.interfaces import Outcome
from qmailtx.delivery.program import (
    CRASHED,
    MAX_OUTPUT,
    TIMED_OUT,
    TOO_LONG,
    ProgramResult,
    classifyExit,
    reportText,
    runProgram,
    spawnFailure,
)

MESSAGE = b"Subject: hi\n\nline one\nline two\n"
NOBODY = resolveProgramUser("nobody")


class RunProgramTests(TestCase):
    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        stdin = tempfile.TemporaryFile(dir=self.home)
        self.addCleanup(stdin.close)
        stdin.write(MESSAGE)
        stdin.flush()
        self.stdin = stdin.fileno()

    def env(self, sender: str = "a@b.example") -> dict[str, str]:
        return qmailEnvironment(
            user="joe", home=self.home, local="joe-list", host="x.example", ext="list",
            sender=sender, when=0, default="list",
        )  # fmt: skip

    def spawn(self, command: str, timeout: float = 20.0, **kw: Any) -> Deferred[ProgramResult]:
        return runProgram(
            reactor, command, kw.get("env") or self.env(), kw.get("cwd", self.home),
            self.stdin, timeout, reactor,
        )  # fmt: skip

    def killLater(self, output: bytes) -> None:
        pid = int(output.split()[0])
        self.addCleanup(_killQuietly, pid)

    async def test_exitCodesFollowQmailLocal(self) -> None:
        expected = {
            0: (Outcome.DELIVERED, False),
            99: (Outcome.DELIVERED, True),
            100: (Outcome.PERMANENT, False),
            64: (Outcome.PERMANENT, False),
            77: (Outcome.PERMANENT, False),
            112: (Outcome.PERMANENT, False),
            111: (Outcome.TEMPORARY, False),
            1: (Outcome.TEMPORARY, False),
            101: (Outcome.TEMPORARY, False),
        }
        for code, (outcome, stop) in expected.items():
            result = await self.spawn(f"exit {code}")
            self.assertEqual(result.exitCode, code)
            delivery, stopped = classifyExit(result)
            self.assertEqual((delivery.outcome, stopped), (outcome, stop), code)

    async def test_silentFailuresSayTheExitCode(self) -> None:
        delivery, _ = classifyExit(await self.spawn("exit 100"))
        self.assertEqual(delivery.text, "Program exited 100. (#5.0.0)")
        delivery, _ = classifyExit(await self.spawn("exit 111"))
        self.assertEqual(delivery.text, "Program exited 111. (#4.3.0)")

    async def test_signalIsTemporary(self) -> None:
        result = await self.spawn("echo dying; kill -9 $$")
        self.assertEqual((result.exitCode, result.signal), (None, signal.SIGKILL))
        delivery, stop = classifyExit(result)
        self.assertEqual((delivery.outcome, stop), (Outcome.TEMPORARY, False))
        self.assertEqual(delivery.text, "dying\n" + CRASHED)

    async def test_stdoutAndStderrAreTheReport(self) -> None:
        result = await self.spawn("echo 'user over quota (#5.2.2)'; echo oops >&2; exit 100")
        self.assertEqual(result.output, b"user over quota (#5.2.2)\noops\n")
        delivery, _ = classifyExit(result)
        self.assertEqual(delivery.outcome, Outcome.PERMANENT)
        self.assertEqual(delivery.text, "user over quota (#5.2.2)\noops")

    async def test_outputIsBounded(self) -> None:
        # 1 MB of output: the program is not blocked, memory keeps the start only
        result = await self.spawn("head -c 1000000 /dev/zero | tr '\\0' x; echo done >&2; exit 111")
        self.assertEqual(result.exitCode, 111)
        self.assertEqual(result.output, b"x" * MAX_OUTPUT)
        self.assertTrue(result.truncated)
        delivery, _ = classifyExit(result)
        self.assertTrue(delivery.text.endswith("x\n" + TOO_LONG))

    async def test_environmentIsExactlyQmails(self) -> None:
        result = await self.spawn("env -0")
        seen = dict(item.split("=", 1) for item in result.output.decode().split("\0") if item)
        seen.pop("PWD", None)  # the shell's own
        self.assertEqual(seen, self.env())
        result = await self.spawn(
            'printf "%s|%s|%s|%s|%s" "$SENDER" "$RECIPIENT" "$EXT" "$DEFAULT" "$HOME"'
        )
        self.assertEqual(
            result.output.decode(), f"a@b.example|joe-list@x.example|list|list|{self.home}"
        )

    async def test_senderWithShellSyntaxStaysLiteral(self) -> None:
        marker = os.path.abspath(self.mktemp())
        sender = f"$(touch {marker})`touch {marker}`;touch {marker};'\"@b.example"
        for command in ('printf "%s" "$SENDER"', "echo $SENDER", 'eval "echo \\"\\$SENDER\\""'):
            result = await self.spawn(command, env=self.env(sender))
            self.assertEqual(result.exitCode, 0, command)
            self.assertFalse(os.path.exists(marker), command)
        result = await self.spawn('printf "%s" "$SENDER"', env=self.env(sender))
        self.assertEqual(result.output.decode(), sender)

    async def test_stdinIsTheMessageRewoundAndSeekable(self) -> None:
        os.lseek(self.stdin, 0, os.SEEK_END)  # left at the end by an earlier line
        script = "import os; a = os.read(0, 1000); os.lseek(0, 0, 0); print(a == os.read(0, 1000))"
        command = f"cat; {shlex.quote(sys.executable)} -c {shlex.quote(script)}"
        result = await self.spawn(command)
        # cat read to the end, so python's first read is empty, and seeking works
        self.assertEqual(result.output, MESSAGE + b"False\n")
        result = await self.spawn(f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}")
        self.assertEqual(result.output, b"True\n")

    async def test_runsAsTheGivenUser(self) -> None:
        if os.geteuid() != 0:
            raise self.skipTest("only root can change its uid")
        os.chmod(self.home, 0o755)  # noqa: S103
        result = await runProgram(
            reactor, "id -u; id -g", self.env(), self.home, self.stdin, 20, reactor,
            user=NOBODY,
        )  # fmt: skip
        self.assertEqual(result.output, f"{NOBODY.uid}\n{NOBODY.gid}\n".encode())

    async def test_folderTheUserCannotEnterIsTemporary(self) -> None:
        # Judged before any child starts (the child chdirs while still root),
        # so this holds whoever runs the test.
        os.chmod(self.home, 0o700)
        stranger = ProgramUser("stranger", os.geteuid() + 1, 54321, frozenset({54321}))
        result = await runProgram(
            reactor, "exit 0", self.env(), self.home, self.stdin, 20, reactor, user=stranger
        )
        self.assertEqual(
            classifyExit(result)[0].text,
            f"Unable to switch to {self.home}: permission denied for program_user. (#4.3.0)",
        )
        self.assertEqual(result.exitCode, None)

    async def test_workingDirectory(self) -> None:
        result = await self.spawn("pwd")
        self.assertEqual(result.output.decode().strip(), os.path.realpath(self.home))

    async def test_missingWorkingDirectoryIsTemporary(self) -> None:
        nope = os.path.join(self.home, "nope")
        result = await self.spawn("exit 0", cwd=nope)
        self.assertEqual(result.exitCode, None)
        delivery, stop = classifyExit(result)
        self.assertEqual(
            (delivery.outcome, delivery.text, stop),
            (
                Outcome.TEMPORARY,
                f"Unable to switch to {nope}: No such file or directory. (#4.3.0)",
                False,
            ),
        )

    async def test_timeoutKills(self) -> None:
        started = time.monotonic()
        result = await self.spawn("exec sleep 60", timeout=0.5)
        self.assertLess(time.monotonic() - started, 10)
        self.assertTrue(result.timedOut)
        self.assertEqual(result.signal, signal.SIGKILL)
        delivery, stop = classifyExit(result)
        self.assertEqual(
            (delivery.outcome, delivery.text, stop), (Outcome.TEMPORARY, TIMED_OUT, False)
        )

    async def test_timeoutDoesNotWaitForChildrenHoldingTheOutput(self) -> None:
        started = time.monotonic()
        result = await self.spawn("sleep 60 & echo $!; sleep 60", timeout=0.5)
        self.killLater(result.output)
        self.assertLess(time.monotonic() - started, 10)
        self.assertTrue(result.timedOut)
        self.assertEqual(classifyExit(result)[0].outcome, Outcome.TEMPORARY)

    async def test_finishedProgramWithLeftoverChildIsDelivered(self) -> None:
        # The shell exits 0 while a background child keeps the output pipe:
        # the deadline stops the wait, and the program's own exit counts.
        result = await self.spawn("sleep 60 & echo $!; exit 0", timeout=0.5)
        self.killLater(result.output)
        self.assertFalse(result.timedOut)
        self.assertEqual(result.exitCode, 0)
        self.assertEqual(classifyExit(result)[0].outcome, Outcome.DELIVERED)


def _killQuietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


class _RefusingReactor:
    def spawnProcess(self, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")


class ReportTests(SynchronousTestCase):
    def test_spawnFailureIsAResult(self) -> None:
        stdin = tempfile.TemporaryFile()
        self.addCleanup(stdin.close)
        refusing: Any = _RefusingReactor()
        d = runProgram(refusing, "true", {}, "/", stdin.fileno(), 1, Clock())
        result, stop = classifyExit(self.successResultOf(d))
        self.assertEqual(result.outcome, Outcome.TEMPORARY)
        self.assertEqual(result.text, "Unable to fork: Resource temporarily unavailable. (#4.3.0)")

    def test_nulInTheEnvironmentIsAResult(self) -> None:
        stdin = tempfile.TemporaryFile()
        self.addCleanup(stdin.close)
        d = runProgram(reactor, "true", {"SENDER": "a\0b"}, "/", stdin.fileno(), 1, Clock())
        result, _ = classifyExit(self.successResultOf(d))
        self.assertEqual(result.outcome, Outcome.TEMPORARY)
        self.assertIn("Unable to run /bin/sh", result.text)

    def test_spawnFailureText(self) -> None:
        result = spawnFailure(OSError(errno.EMFILE, "Too many open files"))
        self.assertEqual(
            (result.outcome, result.text),
            (Outcome.TEMPORARY, "Unable to fork: Too many open files. (#4.3.0)"),
        )

    def test_reportText(self) -> None:
        self.assertEqual(reportText(b"a\r\nb\tc\x1b[0m\xe9\n\n"), "a\nb c_[0m_")
        self.assertEqual(reportText(b"before\0after"), "before")
        self.assertEqual(reportText(b"x", truncated=True), "x\n" + TOO_LONG)

    def test_classifyTimedOutWithOutput(self) -> None:
        result, stop = classifyExit(ProgramResult(None, 9, b"working...\n", timedOut=True))
        self.assertEqual(
            (result.outcome, result.text, stop),
            (Outcome.TEMPORARY, "working...\n" + TIMED_OUT, False),
        )

    def test_deliveredTextIsTheOutput(self) -> None:
        result, stop = classifyExit(ProgramResult(0, None, b"did it\n"))
        self.assertEqual((result.outcome, result.text, stop), (Outcome.DELIVERED, "did it", False))
