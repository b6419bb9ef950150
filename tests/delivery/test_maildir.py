"""Maildir writer and the local delivery agent."""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.address import Address
from qmailtx.delivery.interfaces import IDeliveryAgent, Outcome
from qmailtx.delivery.local import LocalDeliveryAgent, mailboxPath
from qmailtx.delivery.maildir import MaildirWriter, makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.store import synchronousRunner
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


class LocalAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = self.mktemp()
        makeMaildir(FileSystem(), os.path.join(self.data, "domains", "mx.test", "joe", "Maildir"))
        self.disk = QueueDisk(os.path.join(self.data, "queue"))
        self.disk.create()

    def queued(self, *recipients: str) -> QueuedMessage:
        return self.disk.inject(
            1000.0,
            Address("a", "b.example"),
            [Address.fromStored(r) for r in recipients],
            b"Subject: hi\n\nbody\n",
            {},
        )

    def deliver(self, agent: LocalDeliveryAgent, recipient: str) -> tuple[Outcome, str]:
        message = self.queued(recipient)
        results: list[object] = []
        agent.deliver(message, [Address.fromStored(recipient)]).addCallback(results.extend)
        [result] = results
        return result.outcome, result.text  # type: ignore[attr-defined]

    def test_deliversIntoTheUsersMaildir(self) -> None:
        agent = LocalDeliveryAgent(synchronousRunner, self.data)
        verifyObject(IDeliveryAgent, agent)
        outcome, _ = self.deliver(agent, "Joe@MX.test")
        self.assertEqual(outcome, Outcome.DELIVERED)
        new = os.path.join(self.data, "domains", "mx.test", "joe", "Maildir", "new")
        [name] = os.listdir(new)
        with open(os.path.join(new, name), "rb") as f:
            self.assertEqual(
                f.read(),
                b"Return-Path: <a@b.example>\nDelivered-To: Joe@mx.test\nSubject: hi\n\nbody\n",
            )

    def test_unknownUserIsPermanent(self) -> None:
        outcome, text = self.deliver(
            LocalDeliveryAgent(synchronousRunner, self.data), "ann@mx.test"
        )
        self.assertEqual(
            (outcome, text), (Outcome.PERMANENT, "Sorry, no mailbox here by that name. (#5.1.1)")
        )

    def test_diskErrorsAreTemporary(self) -> None:
        for code in (errno.EIO, errno.ENOSPC, errno.EAGAIN):
            fs = RecordingFileSystem()
            fs.failOn["fsync"] = code
            agent = LocalDeliveryAgent(synchronousRunner, self.data, MaildirWriter(fs), fs)
            outcome, text = self.deliver(agent, "joe@mx.test")
            self.assertEqual(outcome, Outcome.TEMPORARY, text)
            self.assertIn(os.strerror(code), text)
        outcome, _ = self.deliver(LocalDeliveryAgent(synchronousRunner, self.data), "joe@mx.test")
        self.assertEqual(outcome, Outcome.DELIVERED)

    def test_addressesCannotEscapeTheDataFolder(self) -> None:
        for local in ["..", ".", "../../etc", "a/b", ".qmail", ""]:
            self.assertIsNone(mailboxPath(self.data, Address(local, "mx.test")), local)
        self.assertIsNone(mailboxPath(self.data, Address("joe", "..")))
        path = mailboxPath(self.data, Address("JOE", "MX.test"))
        self.assertEqual(
            path, os.path.join(os.path.abspath(self.data), "domains", "mx.test", "joe", "Maildir")
        )
