"""The queue on disk: commit order, faults, start-up recovery, in-place marks."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.address import Address
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import DELIVERED, TODO, QueueFileError, parseQueueFile
from qmailtx.testing import RecordingFileSystem, SMTPServerHarness

MESSAGE = b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\nhello\r\n.\r\n"


class CommitOrderTests(SynchronousTestCase):
    def test_durableBefore250(self) -> None:
        """write -> fsync(file) -> link into mess/ -> fsync(mess/N) -> "250" on the wire."""
        self.checkOrder(RecordingFileSystem)

    def test_durableBefore250WithoutTmpfile(self) -> None:
        self.checkOrder(lambda events: RecordingFileSystem(events, anonymous=False))

    def checkOrder(self, makeFs: Callable[[list[tuple[str, str]]], RecordingFileSystem]) -> None:
        events: list[tuple[str, str]] = []
        fs = makeFs(events)
        h = SMTPServerHarness(self.mktemp(), fs=fs, events=events)
        h.send(MESSAGE)
        kinds = [(op, detail) for op, detail in events if op != "reply" or "250 2.0.0 ok" in detail]
        ops = [op for op, _ in kinds]
        self.assertEqual(ops[-1], "reply")
        written = ops.index("write")
        synced = ops.index("fsync")
        linked = ops.index("link")
        dirSynced = ops.index("fsyncdir")
        self.assertLess(written, synced)
        self.assertLess(synced, linked)
        self.assertLess(linked, dirSynced)
        self.assertLess(dirSynced, len(ops) - 1)
        [(_, linkTarget)] = [e for e in events if e[0] == "link"]
        [(_, syncedDir)] = [e for e in events if e[0] == "fsyncdir"]
        self.assertEqual(os.path.dirname(linkTarget), syncedDir)
        self.assertIn(os.sep + "mess" + os.sep, linkTarget)

    def test_fsyncFailureIsA4xxAndLeavesNothing(self) -> None:
        for op, code, reply in [
            ("fsync", errno.EIO, "451 4.3.0 qq write error or disk full"),
            ("write", errno.ENOSPC, "452 4.3.1 qq write error or disk full"),
            ("open", errno.ENOSPC, "452 4.3.1 qq write error or disk full"),
            ("fsyncdir", errno.EIO, "451 4.3.0 qq write error or disk full"),
            ("link", errno.EIO, "451 4.3.0 qq write error or disk full"),
        ]:
            fs = RecordingFileSystem()
            fs.failOn[op] = code
            h = SMTPServerHarness(self.mktemp(), fs=fs)
            self.flushLoggedErrors(OSError)
            h.clear()
            h.send(MESSAGE)
            self.flushLoggedErrors(OSError)
            self.assertEqual(h.replies()[-1], reply, op)
            self.assertEqual(h.committed, [], op)
            self.assertEqual(h.queuedFiles(), [], op)
            self.assertEqual(h.tmpFiles(), [], op)

    def test_writeFailureWhileStreamingIsReportedAtTheEnd(self) -> None:
        fs = RecordingFileSystem()
        fs.failOn["write"] = errno.ENOSPC
        h = SMTPServerHarness(self.mktemp(), fs=fs, settings={"databytes": 0})
        h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        h.clear()
        for _ in range(100):
            h.send(b"x" * 998 + b"\r\n")
        self.assertEqual(h.replies(), [])
        h.send(b".\r\nNOOP\r\n")
        self.flushLoggedErrors(OSError)
        self.assertEqual(h.replies(), ["452 4.3.1 qq write error or disk full", "250 2.0.0 ok"])
        self.assertEqual(h.queuedFiles(), [])
        self.assertEqual(h.tmpFiles(), [])


class RecoveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.disk = QueueDisk(self.mktemp())
        self.disk.create()

    def queue(self, content: bytes = b"Subject: x\n\nbody\n") -> str:
        message = self.disk.inject(
            1000.0, Address("a", "b.example"), [Address("u", "mx.test")], content, {}
        )
        return message.path

    def test_goodMessagesAreFound(self) -> None:
        paths = {self.queue() for _ in range(5)}
        result = self.disk.scan()
        self.assertEqual({m.path for m in result.messages}, paths)
        self.assertEqual(result.quarantined, [])

    def test_leftoversInTmpAreRemoved(self) -> None:
        with open(os.path.join(self.disk.tmpDir, "half"), "wb") as f:
            f.write(b"QTX1 half a message")
        result = self.disk.scan()
        self.assertEqual(result.removedTemporary, 1)
        self.assertEqual(os.listdir(self.disk.tmpDir), [])

    def test_tornAndGarbageFilesAreQuarantined(self) -> None:
        good = self.queue()
        torn = self.queue(b"x" * 5000)
        with open(torn, "r+b") as f:
            f.truncate(3000)
        garbage = os.path.join(self.disk.messDir, "3", "garbage")
        with open(garbage, "wb") as f:
            f.write(os.urandom(200))
        empty = os.path.join(self.disk.messDir, "4", "empty")
        open(empty, "wb").close()
        result = self.disk.scan()
        self.assertEqual([m.path for m in result.messages], [good])
        self.assertEqual(
            sorted(name for name, _ in result.quarantined),
            sorted([os.path.basename(torn), "garbage", "empty"]),
        )
        self.assertEqual(
            sorted(os.listdir(self.disk.corruptDir)),
            sorted([os.path.basename(torn), "garbage", "empty"]),
        )

    def test_fileThatCannotBeReadNowIsLeftInPlace(self) -> None:
        """EMFILE or EIO at start-up is not the file's fault: a good message
        must not end up in corrupt/ (threats.md D5)."""
        fs = RecordingFileSystem()
        self.disk = QueueDisk(self.disk.root, fs)
        path = self.queue()
        fs.failOn["openRead"] = errno.EMFILE
        result = self.disk.scan()
        name = os.path.basename(path)
        self.assertEqual((result.messages, result.quarantined), ([], []))
        self.assertEqual(result.unreadable, [(name, os.strerror(errno.EMFILE))])
        self.assertEqual(os.listdir(self.disk.corruptDir), [])
        self.assertEqual([m.path for m in self.disk.scan().messages], [path])

    def test_damagedFileThatCannotBeMovedDoesNotStopTheScan(self) -> None:
        fs = RecordingFileSystem()
        self.disk = QueueDisk(self.disk.root, fs)
        good = self.queue()
        garbage = os.path.join(self.disk.messDir, "3", "garbage")
        with open(garbage, "wb") as f:
            f.write(os.urandom(200))
        fs.failOn["rename"] = errno.EIO
        result = self.disk.scan()
        self.assertEqual([m.path for m in result.messages], [good])
        [(name, reason)] = result.unreadable
        self.assertEqual(name, "garbage")
        self.assertIn("cannot move it to corrupt/", reason)
        self.assertTrue(os.path.exists(garbage))

    def test_markIsInPlaceAndSurvivesRereading(self) -> None:
        message = self.disk.inject(
            1000.0,
            Address("a", "b.example"),
            [Address("u", "mx.test"), Address("v", "mx.test")],
            b"body\n",
            {"c": "192.0.2.1"},
        )
        self.disk.mark(message, {1: DELIVERED}, 5000.0)
        [again] = self.disk.scan().messages
        self.assertEqual(again.states, [TODO, DELIVERED])
        self.assertEqual(again.nextAttempt, 5000.0)
        self.assertEqual(again.info, {"c": "192.0.2.1"})
        self.assertEqual(self.disk.readMessage(again, 100), b"body\n")

    def test_parserRefusesUnknownRecords(self) -> None:
        with self.assertRaises(QueueFileError):
            parseQueueFile("x", "x", b"QTX1\0\0\0\x05Zx\0\0\0", b"", 13)
