"""The Maildir side of POP3: sizes, conversion, UIDs, the UPDATE state."""

from __future__ import annotations

import io
import os

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.pop3.mailbox import (
    LONG_LINE,
    READ_CHUNK,
    MessageStream,
    SizeCache,
    commit,
    convertAll,
    purge,
    scanMaildir,
    sentSize,
    sweepTrash,
    uidOf,
)

SAMPLES = [
    b"",
    b"a",
    b"a\n",
    b"a\r\n",
    b"a\r",
    b".\n",
    b"..\r\n.\n",
    b"x\r\r\n.\n",
    b"no final line end\n.last",
    b"." + b"y" * (3 * LONG_LINE) + b"\r",
    b"z" * LONG_LINE + b"\r" + b"\n.next\n",
]


def unstuffed(sent: bytes) -> bytes:
    body = sent[:-3]
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n"))


class ConversionTests(SynchronousTestCase):
    def test_sizeIsWhatIsSentWithoutStuffing(self) -> None:
        for data in SAMPLES:
            sent = convertAll(data)
            self.assertTrue(sent.endswith(b".\r\n"))
            self.assertNotIn(b"\n", sent.replace(b"\r\n", b""))
            self.assertEqual(sentSize(io.BytesIO(data)), len(unstuffed(sent)), data[:20])

    def test_streamInAnyChunkingMatches(self) -> None:
        for data in SAMPLES:
            stream = MessageStream(io.BytesIO(data))
            pieces = []
            while not stream.done:
                pieces.append(stream.read())
            self.assertEqual(b"".join(pieces), convertAll(data))

    def test_uids(self) -> None:
        self.assertEqual(uidOf("123.M1P2.host,S=10:2,S"), "123.M1P2.host,S=10")
        self.assertEqual(len(uidOf("name with spaces")), 32)
        self.assertEqual(len(uidOf("x" * 71)), 32)


class MaildirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.maildir = os.path.abspath(self.mktemp())
        makeMaildir(FileSystem(), self.maildir)

    def put(self, subdir: str, name: str, data: bytes, mtime: int) -> None:
        path = os.path.join(self.maildir, subdir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (mtime, mtime))

    def test_snapshotOrderAndCache(self) -> None:
        self.put("cur", "2.b:2,S", b"b\n", 20)
        self.put("new", "1.a", b"a\n", 10)
        self.put("new", ".hidden", b"x", 5)
        cache = SizeCache()
        messages = scanMaildir(self.maildir, cache)
        self.assertEqual([(m.uid, m.size) for m in messages], [("1.a", 3), ("2.b", 3)])
        self.assertEqual(cache.get(("1.a", 2, 10 * 10**9)), 3)

    def test_snapshotSizesAreWhatRetrSends(self) -> None:
        samples = [*SAMPLES, b"x" * (READ_CHUNK + 10) + b"\r", b"y\r\n" * (READ_CHUNK // 2)]
        for i, data in enumerate(samples):
            self.put("new", f"{i}.sample", data, 10 + i)
        messages = scanMaildir(self.maildir, SizeCache())
        self.assertEqual(len(messages), len(samples))
        for message, data in zip(messages, samples, strict=True):
            self.assertEqual(message.size, len(unstuffed(convertAll(data))), data[:20])
            self.assertEqual(message.fileSize, len(data))

    def test_uidsOutsidePrintableAsciiAreHashed(self) -> None:
        for name in ("a b", "caf\u00e9", "tab\there", "del\x7f"):
            self.assertEqual(len(uidOf(name)), 32, repr(name))
        self.assertEqual(uidOf("!~"), "!~")

    def test_commitWithoutQuotaFile(self) -> None:
        self.put("new", "1.a,S=2", b"a\n", 10)
        self.put("new", "2.b", b"b\n", 20)
        messages = scanMaildir(self.maildir)
        messages[0].deleted = True
        messages[1].retrieved = True
        result = commit(self.maildir, messages)
        self.assertEqual((result.deleted, result.deletedBytes, result.seen), (1, 2, 1))
        self.assertEqual(os.listdir(os.path.join(self.maildir, "cur")), ["2.b:2,S"])
        self.assertFalse(os.path.exists(os.path.join(self.maildir, "maildirsize")))

    def test_commitMovesDeletedIntoTmpAndPurgeUnlinks(self) -> None:
        self.put("new", "1.a", b"a\n", 10)
        self.put("cur", "2.b:2,S", b"bb\n", 20)
        self.put("new", "3.c", b"c\n", 30)
        messages = scanMaildir(self.maildir)
        messages[0].deleted = messages[1].deleted = True
        result = commit(self.maildir, messages)
        self.assertEqual((result.deleted, result.deletedBytes), (2, 5))
        self.assertEqual(self.files("new") + self.files("cur"), ["3.c"])
        self.assertEqual(self.files("tmp"), ["qmailtx-deleted.1.a", "qmailtx-deleted.2.b:2,S"])
        self.assertEqual(purge(result.trash), 2)
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(purge(result.trash), 0)  # already gone: not an error

    def test_commitWithoutTmpUnlinksAtOnce(self) -> None:
        self.put("new", "1.a", b"a\n", 10)
        os.rmdir(os.path.join(self.maildir, "tmp"))
        messages = scanMaildir(self.maildir)
        messages[0].deleted = True
        result = commit(self.maildir, messages)
        self.assertEqual((result.deleted, result.vanished, result.trash), (1, 0, []))
        self.assertEqual(self.files("new"), [])

    def test_commitFollowsARenameAndCountsTheVanished(self) -> None:
        self.put("new", "1.a", b"a\n", 10)
        self.put("new", "2.b", b"b\n", 20)
        messages = scanMaildir(self.maildir)
        os.rename(
            os.path.join(self.maildir, "new", "1.a"), os.path.join(self.maildir, "cur", "1.a:2,S")
        )
        os.unlink(os.path.join(self.maildir, "new", "2.b"))
        for message in messages:
            message.deleted = True
        result = commit(self.maildir, messages)
        self.assertEqual((result.deleted, result.vanished), (1, 1))
        self.assertEqual(self.files("tmp"), ["qmailtx-deleted.1.a:2,S"])

    def test_sweepTrashTakesOnlyDeletedMessages(self) -> None:
        for name in ("qmailtx-deleted.1.a", "2.delivery.in.progress"):
            self.put("tmp", name, b"x", 10)
        self.assertEqual(sweepTrash(self.maildir), 1)
        self.assertEqual(self.files("tmp"), ["2.delivery.in.progress"])

    def files(self, subdir: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.maildir, subdir)))

    def test_seenFlagKeepsOtherFlags(self) -> None:
        self.put("cur", "1.a:2,RF", b"a\n", 10)
        messages = scanMaildir(self.maildir)
        messages[0].retrieved = True
        commit(self.maildir, messages)
        self.assertEqual(os.listdir(os.path.join(self.maildir, "cur")), ["1.a:2,FRS"])
