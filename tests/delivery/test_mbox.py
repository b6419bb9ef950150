"""mbox delivery: From-quoting across chunks, locking, truncation on failure."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.mbox import CHUNK, FromQuoter, MboxError, appendMbox

FROM = b"From a@b.example Thu Jan 01 00:00:00 1970\n"
PREFIX = b"Return-Path: <a@b.example>\nDelivered-To: joe@x.example\n"


def quotedAtOnce(message: bytes) -> bytes:
    return re.sub(rb"(?m)^(>*From )", rb">\1", message)


class FromQuoterTests(SynchronousTestCase):
    def quote(self, pieces: list[bytes]) -> bytes:
        quoter = FromQuoter()
        return b"".join(quoter.feed(p) for p in pieces) + quoter.finish()

    def test_quotesFromLinesOnly(self) -> None:
        message = b"From x\n>From y\n>>From z\nFrom\nFromage\n x From y\n>x\nFrom "
        self.assertEqual(
            self.quote([message]),
            b">From x\n>>From y\n>>>From z\nFrom\nFromage\n x From y\n>x\n>From ",
        )

    def test_heldBackHeadIsReleasedAtTheEnd(self) -> None:
        self.assertEqual(self.quote([b"a\nFr", b"o"]), b"a\nFro")
        self.assertEqual(self.quote([b">>"]), b">>")

    def test_anySplitGivesTheSameResult(self) -> None:
        rng = random.Random(5)
        alphabet = [b"From ", b">", b"\n", b"F", b"r", b"o", b"m", b" ", b"x"]
        for _ in range(300):
            message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
            cuts = sorted(rng.randrange(len(message) + 1) for _ in range(rng.randrange(6)))
            pieces = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
            self.assertEqual(self.quote(pieces), quotedAtOnce(message), (message, cuts))

    def test_longGreaterThanRunsAreNotBuffered(self) -> None:
        quoter = FromQuoter()
        self.assertEqual(quoter.feed(b">" * 100_000), b">" * 100_000)
        self.assertEqual(quoter.feed(b"From x\n"), b">From x\n")


class AppendMboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.mbox = os.path.join(self.folder, "Mailbox")
        self.sourcePath = os.path.join(self.folder, "source")

    def source(self, message: bytes, junk: bytes = b"") -> int:
        with open(self.sourcePath, "wb") as f:
            f.write(junk + message)
        fd = os.open(self.sourcePath, os.O_RDONLY)
        self.addCleanup(_closeQuietly, fd)
        return fd

    def append(self, message: bytes) -> None:
        appendMbox(self.mbox, FROM, PREFIX, self.source(message, b"JUNK"), 4, len(message))

    def content(self) -> bytes:
        with open(self.mbox, "rb") as f:
            return f.read()

    def test_appendsQuotedMessageAndBlankLine(self) -> None:
        self.append(b"Subject: x\n\nFrom me\n>From you\nbye\n")
        self.append(b"second\n")
        self.assertEqual(
            self.content(),
            FROM + PREFIX + b"Subject: x\n\n>From me\n>>From you\nbye\n\n"
            + FROM + PREFIX + b"second\n\n",
        )  # fmt: skip

    def test_missingLastNewlineIsAdded(self) -> None:
        self.append(b"no newline")
        self.assertEqual(self.content(), FROM + PREFIX + b"no newline\n\n")

    def test_emptyMessage(self) -> None:
        self.append(b"")
        self.assertEqual(self.content(), FROM + PREFIX + b"\n")

    def test_fromLineGetsItsNewline(self) -> None:
        appendMbox(self.mbox, FROM.rstrip(b"\n"), PREFIX, self.source(b"x\n"), 0, 2)
        self.assertEqual(self.content(), FROM + PREFIX + b"x\n\n")

    def test_fromLinesAtChunkBoundaries(self) -> None:
        # one "From " line starts exactly at the second chunk, one is split by
        # the third, and a ">" run straddles the fourth
        first = b"x" * (CHUNK - 1) + b"\n"
        second = b"From one\n" + b"y" * (CHUNK - 9 - 3) + b"\n"
        third = b"Fr" + b"om two\n" + b"z" * (CHUNK - 9) + b"\n"
        message = first + second + third + b">>From three\nend\n"
        self.assertEqual(len(first), CHUNK)
        self.assertEqual(message[2 * CHUNK - 2 : 2 * CHUNK], b"Fr")
        self.assertEqual(message[3 * CHUNK - 1 : 3 * CHUNK + 1], b">>")
        self.append(message)
        self.assertEqual(self.content(), FROM + PREFIX + quotedAtOnce(message) + b"\n")
        self.assertEqual(quotedAtOnce(message).count(b"\n>From one\n"), 1)
        self.assertIn(b"\n>From two\n", quotedAtOnce(message))
        self.assertIn(b"\n>>>From three\n", quotedAtOnce(message))

    def test_createdPrivate(self) -> None:
        old = os.umask(0)
        try:
            self.append(b"x\n")
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.mbox).st_mode), 0o600)

    def test_shortSourceTruncatesBack(self) -> None:
        self.append(b"first\n")
        before = self.content()
        message = b"line\n" * 50_000  # several chunks written before the failure
        fd = self.source(message)
        error = self.assertRaises(
            MboxError, appendMbox, self.mbox, FROM, PREFIX, fd, 0, len(message) + 10
        )
        self.assertEqual(
            error.text, "Unable to read message: message shorter than expected. (#4.3.0)"
        )
        self.assertEqual(error.errno, errno.EIO)
        self.assertEqual(self.content(), before)

    def test_unreadableSourceTruncatesBack(self) -> None:
        self.append(b"first\n")
        before = self.content()
        fd = self.source(b"x\n")
        os.close(fd)
        error = self.assertRaises(MboxError, appendMbox, self.mbox, FROM, PREFIX, fd, 0, 2)
        self.assertIsInstance(error, OSError)
        self.assertEqual(error.errno, errno.EBADF)
        self.assertIn("Unable to read message:", error.text)
        self.assertEqual(self.content(), before)

    def test_writeFailureTruncatesBack(self) -> None:
        # A full disk, played by RLIMIT_FSIZE in a child process (EFBIG).
        self.append(b"first\n")
        before = self.content()
        message = b"line\n" * 50_000
        self.source(message)
        script = (
            "import importlib.util, os, resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "spec = importlib.util.spec_from_file_location('mbox', sys.argv[1])\n"
            "mbox = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(mbox)\n"
            "limit = int(sys.argv[5])\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))\n"
            "fd = os.open(sys.argv[3], os.O_RDONLY)\n"
            "try:\n"
            "    mbox.appendMbox(sys.argv[2], b'From x\\n', b'', fd, 0, int(sys.argv[4]))\n"
            "except mbox.MboxError as e:\n"
            "    print(e.text)\n"
        )
        module = sys.modules[appendMbox.__module__].__file__
        assert module is not None
        args = [module, self.mbox, self.sourcePath, str(len(message)), str(len(before) + 100_000)]
        done = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, check=True, timeout=60
        )
        self.assertEqual(
            done.stdout.decode(), f"Unable to write {self.mbox}: File too large. (#4.3.0)\n"
        )
        self.assertEqual(self.content(), before)

    def test_unopenableMbox(self) -> None:
        path = os.path.join(self.folder, "nope", "Mailbox")
        error = self.assertRaises(MboxError, appendMbox, path, FROM, PREFIX, self.source(b""), 0, 0)
        self.assertEqual(error.text, f"Unable to open {path}: No such file or directory. (#4.2.1)")

    def test_fifoWithoutReaderFailsAtOnce(self) -> None:
        os.mkfifo(self.mbox)
        error = self.assertRaises(
            MboxError, appendMbox, self.mbox, FROM, PREFIX, self.source(b""), 0, 0
        )
        self.assertEqual(error.errno, errno.ENXIO)

    def test_devNullIsABitBucket(self) -> None:
        appendMbox(os.devnull, FROM, PREFIX, self.source(b"x\n"), 0, 2)

    def test_waitsForTheLock(self) -> None:
        self.append(b"first\n")
        before = self.content()
        holder = os.open(self.mbox, os.O_RDONLY)
        self.addCleanup(_closeQuietly, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        errors: list[BaseException] = []
        fd = self.source(b"second\n")

        def deliver() -> None:
            try:
                appendMbox(self.mbox, FROM, PREFIX, fd, 0, 7, lockTimeout=20)
            except BaseException as e:
                errors.append(e)

        worker = threading.Thread(target=deliver)
        worker.start()
        time.sleep(0.3)
        self.assertTrue(worker.is_alive())
        self.assertEqual(self.content(), before)
        fcntl.flock(holder, fcntl.LOCK_UN)
        worker.join(20)
        self.assertFalse(worker.is_alive())
        self.assertEqual(errors, [])
        self.assertEqual(self.content(), before + FROM + PREFIX + b"second\n\n")

    def test_lockTimeoutIsTemporaryAndWritesNothing(self) -> None:
        self.append(b"first\n")
        before = self.content()
        holder = os.open(self.mbox, os.O_RDONLY)
        self.addCleanup(_closeQuietly, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        error = self.assertRaises(
            MboxError, appendMbox, self.mbox, FROM, PREFIX, self.source(b"x\n"), 0, 2,
            lockTimeout=0.3,
        )  # fmt: skip
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertEqual(error.errno, errno.EAGAIN)
        self.assertEqual(error.text, "File has been locked for 0.3 seconds straight. (#4.3.0)")
        self.assertEqual(self.content(), before)


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
