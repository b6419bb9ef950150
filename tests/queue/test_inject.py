"""qmailtx-queue as a real process: fds 0 and 1 in, a queue file out, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading

from twisted.trial.unittest import SynchronousTestCase

import qmailtx
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.trigger import parseTriggers, pull, triggerPath

INJECT = [sys.executable, "-m", "qmailtx.queue.inject"]
WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(qmailtx.__file__)))
ENVELOPE = b"Fa@b.example\0Tu@mx.test\0Tv@mx.test\0\0"
MESSAGE = b"Subject: hi\n\nbody\n"


def childEnvironment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = WORKTREE
    env.pop("QMAILTX_QUEUE", None)
    env.update(extra)
    return env


def regularFile(data: bytes, offset: int = 0) -> int:
    """A read-only fd on a file holding ``data``, positioned at ``offset``."""
    fd, path = tempfile.mkstemp()
    os.write(fd, data)
    os.close(fd)
    reader = os.open(path, os.O_RDONLY)
    os.unlink(path)
    os.lseek(reader, offset, os.SEEK_SET)
    return reader


class InjectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.data, "queue")
        self.disk = QueueDisk(self.root)
        self.disk.create()

    def run_(
        self,
        message: bytes | int = MESSAGE,
        envelope: bytes | int | None = ENVELOPE,
        args: tuple[str, ...] = (),
        **env: str,
    ) -> tuple[int, str]:
        """Run the injector; ``message``/``envelope`` as bytes go through pipes,
        as an int they are the fd to give (None: fd 1 closed)."""
        environment = childEnvironment(**({"QMAILTX_QUEUE": self.root} | env))
        fds: list[int] = []

        def pipeOf(data: bytes) -> int:
            r, w = os.pipe()
            fds.append(r)

            def feed() -> None:
                try:
                    os.write(w, data)
                except OSError:
                    pass
                os.close(w)

            threading.Thread(target=feed, daemon=True).start()
            return r

        stdin = pipeOf(message) if isinstance(message, bytes) else message
        stdout: int | None
        if envelope is None:
            stdout = None
        else:
            stdout = pipeOf(envelope) if isinstance(envelope, bytes) else envelope
        process = subprocess.run(
            [*INJECT, *args],
            stdin=stdin,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=environment,
            timeout=60,
            preexec_fn=(lambda: os.close(1)) if stdout is None else None,
        )
        for fd in fds:
            os.close(fd)
        return process.returncode, process.stderr.decode("utf-8", "replace")

    def queued(self) -> list[QueuedMessage]:
        result = self.disk.scan()
        self.assertEqual(result.quarantined, [])
        return result.messages

    def test_queuesFromPipes(self) -> None:
        code, err = self.run_()
        self.assertEqual((code, err), (0, ""))
        [message] = self.queued()
        self.assertEqual(str(message.sender), "a@b.example")
        self.assertEqual([str(r) for r in message.recipients], ["u@mx.test", "v@mx.test"])
        self.assertEqual(message.states, ["T", "T"])
        self.assertEqual(self.disk.readMessage(message, 1000), MESSAGE)
        self.assertEqual(os.listdir(self.disk.tmpDir), [])

    def test_queuesFromAFileAtItsOffset(self) -> None:
        """A filter that read part of fd 0 passes on the rest, as with a pipe."""
        message = regularFile(b"already read\n" + MESSAGE, len(b"already read\n"))
        envelope = regularFile(ENVELOPE)
        try:
            code, err = self.run_(message, envelope)
        finally:
            os.close(message)
            os.close(envelope)
        self.assertEqual((code, err), (0, ""))
        [queued] = self.queued()
        self.assertEqual(self.disk.readMessage(queued, 1000), MESSAGE)

    def test_largeMessage(self) -> None:
        big = b"Subject: big\n\n" + b"x" * 100 + b"\n" * 30000 + b"end\n"
        code, _ = self.run_(big)
        self.assertEqual(code, 0)
        [queued] = self.queued()
        self.assertEqual(self.disk.readMessage(queued, len(big) + 1), big)

    def test_usesTheOfferedIdAndInformation(self) -> None:
        code, _ = self.run_(
            QMAILTX_QUEUE_MSGID="6611d79f105d0abc",
            QMAILTX_QUEUE_INFO='{"c": "192.0.2.1", "s": "17.3", "BAD": "x", "d": 5}',
        )
        self.assertEqual(code, 0)
        [message] = self.queued()
        self.assertEqual(message.msgid, "6611d79f105d0abc")
        self.assertEqual(message.info, {"c": "192.0.2.1", "s": "17.3"})

    def test_anUnsafeIdIsNotUsed(self) -> None:
        code, _ = self.run_(QMAILTX_QUEUE_MSGID="../../etc/passwd")
        self.assertEqual(code, 0)
        [message] = self.queued()
        self.assertNotIn("/", message.msgid)

    def test_anIdInUseIsReplaced(self) -> None:
        self.assertEqual(self.run_(QMAILTX_QUEUE_MSGID="6611d79f105d0abc")[0], 0)
        self.assertEqual(self.run_(QMAILTX_QUEUE_MSGID="6611d79f105d0abc")[0], 0)
        ids = sorted(m.msgid for m in self.queued())
        self.assertEqual(len(set(ids)), 2)
        self.assertIn("6611d79f105d0abc", ids)

    def test_queueFolderFromTheCommandLine(self) -> None:
        code, _ = self.run_(args=("--queue", self.root), QMAILTX_QUEUE="")
        self.assertEqual(code, 0)
        self.assertEqual(len(self.queued()), 1)

    def test_noQueueFolderIs55(self) -> None:
        code, err = self.run_(QMAILTX_QUEUE="")
        self.assertEqual(code, 55)
        self.assertIn("no queue folder", err)
        self.assertEqual(self.run_(args=("--bogus",))[0], 55)

    def test_missingQueueIs61(self) -> None:
        code, _ = self.run_(QMAILTX_QUEUE=os.path.join(self.data, "nowhere"))
        self.assertEqual(code, 61)

    def test_malformedEnvelopeIs91(self) -> None:
        for envelope in [b"Xa@b.example\0\0", b"Fa@b.example\0Zu@mx.test\0\0"]:
            code, err = self.run_(envelope=envelope)
            self.assertEqual(code, 91, envelope)
            self.assertIn("qmailtx-queue:", err)
        self.assertEqual(self.queued(), [])

    def test_missingEnvelopeIs54(self) -> None:
        self.assertEqual(self.run_(envelope=b"")[0], 54)  # end of file at once
        self.assertEqual(self.run_(envelope=b"Fa@b.example\0Tu@mx.test\0")[0], 54)  # cut short
        self.assertEqual(self.run_(envelope=None)[0], 54)  # fd 1 not open at all
        self.assertEqual(self.queued(), [])
        self.assertEqual(os.listdir(self.disk.tmpDir), [])

    def test_addressTooLongIs11(self) -> None:
        code, _ = self.run_(envelope=b"Fa@b.example\0T" + b"x" * 2000 + b"\0\0")
        self.assertEqual(code, 11)
        self.assertEqual(self.queued(), [])

    def test_noRecipientsQueuesNothing(self) -> None:
        self.assertEqual(self.run_(envelope=b"Fa@b.example\0\0")[0], 0)
        self.assertEqual(self.queued(), [])

    def test_wakesTheServer(self) -> None:
        """The id goes down the trigger FIFO when someone listens; nobody: no error."""
        fifo = triggerPath(self.root)
        self.assertEqual(fifo, os.path.join(self.data, "trigger"))
        os.mkfifo(fifo, 0o600)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(os.close, reader)
        code, _ = self.run_(QMAILTX_QUEUE_MSGID="6611d79f105d0abc")
        self.assertEqual(code, 0)
        self.assertEqual(os.read(reader, 100), b"6611d79f105d0abc\n")
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # keep the reader's EOF at bay

    def test_noServerListening(self) -> None:
        self.assertFalse(pull(self.root, "6611d79f105d0abc"))  # no FIFO
        os.mkfifo(triggerPath(self.root), 0o600)
        self.assertFalse(pull(self.root, "6611d79f105d0abc"))  # FIFO without a reader
        self.assertEqual(self.run_()[0], 0)


class TriggerParsingTests(SynchronousTestCase):
    def test_ids(self) -> None:
        self.assertEqual(
            parseTriggers(b"6611d79f105d0abc\n66aa\n"), ({"6611d79f105d0abc", "66aa"}, False)
        )

    def test_anythingElseLooksEverywhere(self) -> None:
        for data in [b"x", b"\n", b"../x\n", b"6611d79f105d0abc"]:
            self.assertTrue(parseTriggers(data)[1], data)
