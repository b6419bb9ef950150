"""The Maildir writer."""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.maildir import (
    MaildirWriter,
    StaleTmpSweeper,
    makeMaildir,
    sweepStaleTmp,
)
from qmailtx.fs import FileSystem
from qmailtx.testing import RecordingFileSystem

NAME = re.compile(r"^\d+\.M\d+P\d+Q\d+\.[^/:]+,S=\d+$")


class MaildirWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.maildir = self.mktemp()
        makeMaildir(FileSystem(), self.maildir)
        self.source = self.mktemp()
        with open(self.source, "wb") as f:
            f.write(b"HEADERmessage body\n")

    def deliver(self, writer: MaildirWriter) -> str:
        fd = os.open(self.source, os.O_RDONLY)
        try:
            return writer.deliver(self.maildir, b"Return-Path: <a@b>\n", fd, 6, 13)
        finally:
            os.close(fd)

    def test_fileIsCompleteInNewAndNothingInTmp(self) -> None:
        name = self.deliver(MaildirWriter(host="mx.test"))
        self.assertRegex(name, NAME)
        self.assertTrue(name.endswith(",S=32"))
        with open(os.path.join(self.maildir, "new", name), "rb") as f:
            self.assertEqual(f.read(), b"Return-Path: <a@b>\nmessage body\n")
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])

    def test_orderIsWriteFsyncLinkFsyncNew(self) -> None:
        fs = RecordingFileSystem()
        self.deliver(MaildirWriter(fs))
        ops = [op for op, _ in fs.events]
        self.assertEqual(ops, ["open", "write", "write", "fsync", "link", "fsyncdir"])
        self.assertEqual(fs.events[5][1], os.path.join(self.maildir, "new"))

    def test_withoutTmpfileTheTmpNameIsUsedAndRemoved(self) -> None:
        fs = RecordingFileSystem(anonymous=False)
        name = self.deliver(MaildirWriter(fs))
        ops = [op for op, _ in fs.events]
        self.assertEqual(ops, ["open", "write", "write", "fsync", "link", "fsyncdir", "unlink"])
        self.assertEqual(fs.events[0][1], os.path.join(self.maildir, "tmp", name))
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(self.maildir, "new")), [name])

    def test_ioErrorLeavesNothingBehind(self) -> None:
        for op, anonymous in itertools.product(
            ("write", "fsync", "link", "fsyncdir"), (True, False)
        ):
            fs = RecordingFileSystem(anonymous=anonymous)
            fs.failOn[op] = errno.EIO
            with self.assertRaises(OSError):
                self.deliver(MaildirWriter(fs))
            for sub in ("tmp", "new"):
                self.assertEqual(os.listdir(os.path.join(self.maildir, sub)), [], op)

    def test_concurrentDeliveriesGetDistinctNames(self) -> None:
        writer = MaildirWriter(clock=lambda: 1700000000.5)
        names: list[str] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(50):
                name = self.deliver(writer)
                with lock:
                    names.append(name)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(set(names)), 200)
        self.assertEqual(len(os.listdir(os.path.join(self.maildir, "new"))), 200)

    def test_hostNameIsEscaped(self) -> None:
        self.assertIn(".a\\057b\\072c,", MaildirWriter(host="a/b:c").uniqueName(1))


NOW = 2_000_000_000.0
HOUR = 3600


class StaleTmpTests(SynchronousTestCase):
    """D4: what a killed writer left in tmp/ goes after 36 hours, nothing else."""

    def setUp(self) -> None:
        self.maildir = self.mktemp()
        makeMaildir(FileSystem(), self.maildir)

    def put(self, relative: str, age: float) -> str:
        path = os.path.join(self.maildir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x")
        os.utime(path, (NOW - age, NOW - age))
        return path

    def files(self, subdir: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.maildir, subdir)))

    def test_onlyStaleRegularFilesDirectlyInTmpGo(self) -> None:
        self.put("tmp/1.old", 37 * HOUR)
        self.put("tmp/2.fresh", 1 * HOUR)
        self.put("tmp/3.justUnder", 36 * HOUR - 1)
        self.put("tmp/sub/4.old", 37 * HOUR)
        sub = os.path.join(self.maildir, "tmp", "sub")
        os.utime(sub, (NOW - 37 * HOUR, NOW - 37 * HOUR))
        os.symlink(
            os.path.join(self.maildir, "new", "5.old"), os.path.join(self.maildir, "tmp", "link")
        )
        os.utime(
            os.path.join(self.maildir, "tmp", "link"), (NOW - 37 * HOUR,) * 2, follow_symlinks=False
        )
        self.put("new/5.old", 37 * HOUR)
        self.put("cur/6.old:2,S", 37 * HOUR)
        self.assertEqual(sweepStaleTmp(self.maildir, NOW), 1)
        self.assertEqual(self.files("tmp"), ["2.fresh", "3.justUnder", "link", "sub"])
        self.assertEqual(os.listdir(sub), ["4.old"])
        self.assertEqual(self.files("new"), ["5.old"])
        self.assertEqual(self.files("cur"), ["6.old:2,S"])

    def test_ageIsAParameter(self) -> None:
        self.put("tmp/1.hourOld", 1 * HOUR + 1)
        self.assertEqual(sweepStaleTmp(self.maildir, NOW, age=HOUR), 1)
        self.assertEqual(self.files("tmp"), [])

    def test_missingTmpSweepsNothing(self) -> None:
        self.assertEqual(sweepStaleTmp(os.path.join(self.maildir, "nothing"), NOW), 0)

    def test_sweeperSweepsOnceAnHourPerMaildir(self) -> None:
        sweeper = StaleTmpSweeper()
        self.put("tmp/1.old", 37 * HOUR)
        self.assertEqual(sweeper.sweep(self.maildir, NOW), 1)
        self.put("tmp/2.old", 37 * HOUR)
        self.assertEqual(sweeper.sweep(self.maildir, NOW + HOUR - 1), 0)
        self.assertEqual(self.files("tmp"), ["2.old"])
        self.assertEqual(sweeper.sweep(self.maildir, NOW + HOUR), 1)
        self.assertEqual(self.files("tmp"), [])

    def test_sweeperSweepsAgainWhenTheClockWentBack(self) -> None:
        sweeper = StaleTmpSweeper()
        self.assertTrue(sweeper.due("a", NOW))
        self.assertFalse(sweeper.due("a", NOW + 10))
        self.assertTrue(sweeper.due("a", NOW - 10))

    def test_sweeperForgetsTheLeastRecentlySweptFirst(self) -> None:
        sweeper = StaleTmpSweeper(memory=2)
        for name in ("a", "b", "c"):
            self.assertTrue(sweeper.due(name, NOW))
        self.assertFalse(sweeper.due("c", NOW))
        self.assertFalse(sweeper.due("b", NOW))
        self.assertTrue(sweeper.due("a", NOW))  # forgotten: swept again
        self.assertFalse(sweeper.due("c", NOW))
        self.assertTrue(sweeper.due("b", NOW))  # "a" pushed out "b", swept before "c"
