"""The Maildir writer."""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.maildir import MaildirWriter, makeMaildir
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
