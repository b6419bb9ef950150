"""Maildir++ quota (maildirsize), checked against courier's own tools too."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.maildir import makeMaildir
from qmailtx.delivery.quota import (
    MAILDIRSIZE,
    MAX_SCANS,
    MaildirQuota,
    MaildirSize,
    MaildirSizeError,
    QuotaUsage,
    crossedPercent,
    isOverQuota,
    parseDefinition,
    parseMaildirSize,
    quotaRoot,
    sizeFromName,
    usagePercent,
)
from qmailtx.fs import FileSystem
from qmailtx.testing import RecordingFileSystem
from qmailtx.vdomain.records import QuotaLimit

T0 = 1_700_000_000.0
LIMIT = QuotaLimit(1000, None)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def putMessage(maildir: str, sub: str, name: str, size: int) -> str:
    """A message file of ``size`` bytes at ``maildir/sub/name``."""
    path = os.path.join(maildir, sub, name)
    with open(path, "wb") as f:
        f.write(b"x" * size)
    return path


def readSizeFile(maildir: str) -> bytes:
    with open(os.path.join(maildir, MAILDIRSIZE), "rb") as f:
        return f.read()


def writeSizeFile(maildir: str, content: bytes, mtime: float = T0) -> None:
    path = os.path.join(maildir, MAILDIRSIZE)
    with open(path, "wb") as f:
        f.write(content)
    os.utime(path, (mtime, mtime))


class ParseTests(SynchronousTestCase):
    def test_definitionForms(self) -> None:
        self.assertEqual(parseDefinition("1000S"), QuotaLimit(1000, None))
        self.assertEqual(parseDefinition("1000S,10C"), QuotaLimit(1000, 10))
        self.assertEqual(parseDefinition("10C,1000S"), QuotaLimit(1000, 10))
        self.assertEqual(parseDefinition("10C"), QuotaLimit(None, 10))

    def test_zeroMeansNoLimitOnThatSide(self) -> None:
        self.assertEqual(parseDefinition("0S,5C"), QuotaLimit(None, 5))

    def test_badDefinitions(self) -> None:
        for text in ("", "1000", "1000X", "1000S,", " 1000S", "1000s", "-5S"):
            self.assertRaises(MaildirSizeError, parseDefinition, text)

    def test_usageIsTheSumOfDeltaLines(self) -> None:
        data = b"1000S,10C\n100 1\n250 2\n-50 -1\n"
        self.assertEqual(
            parseMaildirSize(data), MaildirSize(QuotaLimit(1000, 10), QuotaUsage(300, 2), 3)
        )

    def test_courierPaddedLines(self) -> None:
        data = b"1000S\n           0            0\n          18            1\n"
        self.assertEqual(parseMaildirSize(data), MaildirSize(LIMIT, QuotaUsage(18, 1), 2))

    def test_definitionOnly(self) -> None:
        self.assertEqual(
            parseMaildirSize(b"5C\n"), MaildirSize(QuotaLimit(None, 5), QuotaUsage(0, 0), 0)
        )

    def test_tornOrGarbageIsRefused(self) -> None:
        for data in (
            b"",
            b"1000S",
            b"1000S\n100 1\n12",
            b"1000S\n100 1\n\n",
            b"1000S\n100\n",
            b"1000S\n100 1 1\n",
            b"1000S\nabc def\n",
            b"\xff\n1 1\n",
            b"garbage\n1 1\n",
        ):
            self.assertRaises(MaildirSizeError, parseMaildirSize, data)

    def test_sizeFromName(self) -> None:
        self.assertEqual(sizeFromName("1.M2P3Q4.host,S=42"), 42)
        self.assertEqual(sizeFromName("1.M2P3Q4.host,S=42:2,S"), 42)
        self.assertEqual(sizeFromName("1.M2P3Q4.host,S=42,W=50:2,RS"), 42)
        self.assertEqual(sizeFromName("new/1.M2P3Q4.host,S=7"), 7)
        self.assertIsNone(sizeFromName("1.2.host"))
        self.assertIsNone(sizeFromName("1.2.host:2,S=5"))  # flags, not a size


class OverQuotaTests(SynchronousTestCase):
    def test_bytesStrictlyGreater(self) -> None:
        used = QuotaUsage(900, 1)
        self.assertFalse(isOverQuota(used, LIMIT, 100, 1))
        self.assertTrue(isOverQuota(used, LIMIT, 101, 1))
        self.assertFalse(isOverQuota(QuotaUsage(1000, 1), LIMIT))
        self.assertTrue(isOverQuota(QuotaUsage(1001, 1), LIMIT))

    def test_countStrictlyGreater(self) -> None:
        limit = QuotaLimit(None, 10)
        self.assertFalse(isOverQuota(QuotaUsage(0, 9), limit, 0, 1))
        self.assertTrue(isOverQuota(QuotaUsage(0, 9), limit, 0, 2))
        self.assertTrue(isOverQuota(QuotaUsage(0, 10), QuotaLimit(10**9, 10), 1, 1))

    def test_unlimitedSideNeverBlocks(self) -> None:
        self.assertFalse(isOverQuota(QuotaUsage(10**12, 5), QuotaLimit(None, 10), 10**9, 1))
        self.assertFalse(isOverQuota(QuotaUsage(5, 10**6), QuotaLimit(1000, None), 1, 10**6))
        self.assertFalse(isOverQuota(QuotaUsage(10**12, 10**6), QuotaLimit(0, 0), 1, 1))

    def test_usagePercentIsTheFullerSide(self) -> None:
        self.assertEqual(usagePercent(QuotaUsage(250, 9), QuotaLimit(1000, 10)), 90.0)
        self.assertEqual(usagePercent(QuotaUsage(250, 9), QuotaLimit(1000, None)), 25.0)
        self.assertEqual(usagePercent(QuotaUsage(250, 9), QuotaLimit()), 0.0)

    def test_crossedPercent(self) -> None:
        limit = QuotaLimit(1000, 100)
        self.assertTrue(crossedPercent(QuotaUsage(899, 1), QuotaUsage(900, 2), limit, 90))
        self.assertFalse(crossedPercent(QuotaUsage(900, 1), QuotaUsage(950, 2), limit, 90))
        self.assertFalse(crossedPercent(QuotaUsage(100, 1), QuotaUsage(899, 2), limit, 90))
        self.assertTrue(crossedPercent(QuotaUsage(0, 89), QuotaUsage(10, 90), limit, 90))


class MaildirQuotaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.maildir = self.mktemp()
        makeMaildir(FileSystem(), self.maildir)
        self.clock = FakeClock()

    def quota(self, limit: QuotaLimit = LIMIT, fs: FileSystem | None = None) -> MaildirQuota:
        return MaildirQuota(self.maildir, limit, clock=self.clock, fs=fs, host="mx.test")

    def test_unlimitedIsRefused(self) -> None:
        self.assertRaises(ValueError, MaildirQuota, self.maildir, QuotaLimit())
        self.assertRaises(ValueError, MaildirQuota, self.maildir, QuotaLimit(0, 0))

    def test_missingFileIsCreatedByRecount(self) -> None:
        putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=120", 120)
        self.assertTrue(self.quota(QuotaLimit(1000, 10)).check(500))
        self.assertEqual(readSizeFile(self.maildir), b"1000S,10C\n120 1\n")
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])

    def test_zeroSideIsLeftOutOfTheDefinition(self) -> None:
        self.quota(QuotaLimit(0, 5)).recount()
        self.assertEqual(readSizeFile(self.maildir), b"5C\n0 0\n")

    def test_addAppendsExactLines(self) -> None:
        writeSizeFile(self.maildir, b"1000S\n0 0\n")
        quota = self.quota()
        quota.add(120)
        quota.add(-300, -2)
        quota.add(7, 1)
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n0 0\n120 1\n-300 -2\n7 1\n")

    def test_addWithoutFileRecountsDefinitionFirst(self) -> None:
        # The message is already in new/: the recount sees it, so no second line.
        putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=120", 120)
        self.quota().add(120)
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n120 1\n")

    def test_addToEmptyFileRecounts(self) -> None:
        writeSizeFile(self.maildir, b"")
        self.quota().add(5)
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n0 0\n")

    def test_addAfterTornLineStartsANewLine(self) -> None:
        writeSizeFile(self.maildir, b"1000S\n0 0\n12")
        quota = self.quota()
        quota.add(5)
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n0 0\n12\n5 1\n")
        self.assertEqual(quota.usage(), QuotaUsage(0, 0))  # "12" forces a recount
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n0 0\n")

    def test_addIOErrorPropagates(self) -> None:
        quota = MaildirQuota(os.path.join(self.maildir, "missing"), LIMIT)
        self.assertRaises(FileNotFoundError, quota.add, 5)

    def test_underQuotaFileIsTrusted(self) -> None:
        content = b"1000S\n500 1\n-100 -1\n300 2\n"
        writeSizeFile(self.maildir, content)
        quota = self.quota()
        self.assertEqual(quota.usage(), QuotaUsage(700, 2))
        self.assertTrue(quota.check(300))
        self.assertEqual(readSizeFile(self.maildir), content)

    def sizedFile(self, length: int) -> bytes:
        """1000000S, a phantom "5 1" and "0 0" lines, ``length`` bytes in all."""
        head = b"1000000S\n"
        lines, rest = divmod(length - len(head) - len(b"5 1\n"), 4)
        content = head + b" " * rest + b"5 1\n" + b"0 0\n" * lines
        self.assertEqual(len(content), length)
        return content

    def test_fileBelow5120BytesIsTrusted(self) -> None:
        writeSizeFile(self.maildir, self.sizedFile(5119))
        self.assertEqual(self.quota(QuotaLimit(1000000)).usage(), QuotaUsage(5, 1))

    def test_fileOf5120BytesIsRecounted(self) -> None:
        writeSizeFile(self.maildir, self.sizedFile(5120))
        self.assertEqual(self.quota(QuotaLimit(1000000)).usage(), QuotaUsage(0, 0))
        self.assertEqual(readSizeFile(self.maildir), b"1000000S\n0 0\n")

    def test_fileOver5120BytesIsRecounted(self) -> None:
        writeSizeFile(self.maildir, self.sizedFile(9000))
        self.assertEqual(self.quota(QuotaLimit(1000000)).usage(), QuotaUsage(0, 0))

    def test_overQuotaWithSeveralLinesIsRecounted(self) -> None:
        putMessage(self.maildir, "cur", "1.M1P1Q1.mx.test,S=300:2,S", 300)
        writeSizeFile(self.maildir, b"1000S\n600 1\n500 1\n")
        self.clock.now = T0 + 1
        self.assertEqual(self.quota().usage(), QuotaUsage(300, 1))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n300 1\n")

    def test_overQuotaWithOneFreshLineIsTrusted(self) -> None:
        putMessage(self.maildir, "cur", "1.M1P1Q1.mx.test,S=300:2,S", 300)
        writeSizeFile(self.maildir, b"1000S\n1100 1\n")
        self.clock.now = T0 + 15 * 60 - 1
        quota = self.quota()
        self.assertEqual(quota.usage(), QuotaUsage(1100, 1))
        self.assertFalse(quota.check(1))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n1100 1\n")

    def test_overQuotaOlderThan15MinutesIsRecounted(self) -> None:
        putMessage(self.maildir, "cur", "1.M1P1Q1.mx.test,S=300:2,S", 300)
        writeSizeFile(self.maildir, b"1000S\n1100 1\n")
        self.clock.now = T0 + 15 * 60
        quota = self.quota()
        self.assertTrue(quota.check(700))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n300 1\n")

    def test_newMessageCountsTowardsOverQuota(self) -> None:
        # 900 + 200 > 1000: over quota with the new message, so two lines
        # mean a recount, which finds the Maildir empty.
        writeSizeFile(self.maildir, b"1000S\n450 1\n450 1\n")
        self.assertTrue(self.quota().check(200))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n0 0\n")

    def test_newMessageOverQuotaWithOneFreshLineIsRefused(self) -> None:
        writeSizeFile(self.maildir, b"1000S\n900 1\n")
        quota = self.quota()
        self.assertTrue(quota.check(100))
        self.assertFalse(quota.check(101))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n900 1\n")

    def test_negativeSumIsRecounted(self) -> None:
        putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=10", 10)
        writeSizeFile(self.maildir, b"1000S\n0 0\n-50 -1\n")
        self.assertEqual(self.quota().usage(), QuotaUsage(10, 1))

    def test_tornFileIsRecounted(self) -> None:
        putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=10", 10)
        writeSizeFile(self.maildir, b"1000S\n0 0\n50")
        self.assertEqual(self.quota().usage(), QuotaUsage(10, 1))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n10 1\n")

    def test_garbageFileIsRecounted(self) -> None:
        writeSizeFile(self.maildir, b"\x00\x01binary\n")
        self.assertEqual(self.quota().usage(), QuotaUsage(0, 0))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n0 0\n")

    def test_unreadableFileIsRecounted(self) -> None:
        class Unreadable(FileSystem):
            def openRead(self, path: str) -> int:
                raise PermissionError(errno.EACCES, "denied", path)

        putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=10", 10)
        writeSizeFile(self.maildir, b"1000S\n500 1\n")
        self.assertEqual(self.quota(fs=Unreadable()).usage(), QuotaUsage(10, 1))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n10 1\n")

    def test_readErrorIsRecounted(self) -> None:
        class FailingRead(FileSystem):
            def readAt(self, fd: int, length: int, offset: int) -> bytes:
                raise OSError(errno.EIO, "I/O error")

        writeSizeFile(self.maildir, b"1000S\n500 1\n")
        self.assertEqual(self.quota(fs=FailingRead()).usage(), QuotaUsage(0, 0))

    def test_changedDefinitionIsRecounted(self) -> None:
        putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=10", 10)
        writeSizeFile(self.maildir, b"2000S,5C\n100 1\n")
        self.assertEqual(self.quota().usage(), QuotaUsage(10, 1))
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n10 1\n")

    def test_recountCountsFoldersButNotTrash(self) -> None:
        m = self.maildir
        for folder in (".Work", ".Work.Sub", ".Trash", ".Trash.Old"):
            makeMaildir(FileSystem(), os.path.join(m, folder))
            putMessage(m, os.path.join(folder), "maildirfolder", 0)
        putMessage(m, "new", "1.M1P1Q1.mx.test,S=100", 999)  # ,S= wins over the real size
        putMessage(m, "cur", "2.M1P1Q1.mx.test,S=20:2,S", 20)
        putMessage(m, "cur", "3.plain.mx.test:2,S", 33)  # no ,S=: stat
        putMessage(m, "cur", "4.M1P1Q1.mx.test,S=4000:2,ST", 4000)  # deleted (T)
        putMessage(m, "cur", ".hidden,S=5000", 5000)
        putMessage(m, "tmp", "5.M1P1Q1.mx.test,S=6000", 6000)
        putMessage(m, ".Work/new", "6.M1P1Q1.mx.test,S=1000", 1000)
        putMessage(m, ".Work.Sub/cur", "7.plain:2,", 7)
        putMessage(m, ".Trash/cur", "8.M1P1Q1.mx.test,S=8000:2,S", 8000)
        putMessage(m, ".Trash.Old/cur", "9.M1P1Q1.mx.test,S=9:2,S", 9)
        other = self.mktemp()
        makeMaildir(FileSystem(), other)
        putMessage(other, "new", "10.M1P1Q1.mx.test,S=10000", 10000)
        os.symlink(os.path.abspath(other), os.path.join(m, ".Link"))
        with open(os.path.join(m, ".dotfile"), "wb") as f:
            f.write(b"x" * 100)

        usage = self.quota().recount()
        self.assertEqual(usage, QuotaUsage(100 + 20 + 33 + 1000 + 7 + 9, 6))
        self.assertEqual(readSizeFile(m), b"1000S\n1169 6\n")

    def test_recountWritesThroughTmpAndRenames(self) -> None:
        fs = RecordingFileSystem()
        self.quota(fs=fs).recount()
        ops = [op for op, _ in fs.events]
        self.assertEqual(ops, ["open", "write", "fsync", "rename", "fsyncdir"])
        self.assertEqual(os.path.dirname(fs.events[0][1]), os.path.join(self.maildir, "tmp"))
        self.assertIn("NeWmAiLdIrSiZe", fs.events[0][1])
        self.assertEqual(fs.events[3][1], os.path.join(self.maildir, MAILDIRSIZE))
        self.assertEqual(fs.events[4][1], self.maildir)
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])

    def test_recountIOErrorPropagatesAndLeavesNothing(self) -> None:
        fs = RecordingFileSystem()
        fs.failOn["fsync"] = errno.ENOSPC
        quota = self.quota(fs=fs)
        error = self.assertRaises(OSError, quota.check, 1)
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])
        self.assertFalse(os.path.exists(os.path.join(self.maildir, MAILDIRSIZE)))

    def test_missingMaildirIsAnErrorNotOverQuota(self) -> None:
        quota = MaildirQuota(os.path.join(self.maildir, "missing"), LIMIT)
        self.assertRaises(FileNotFoundError, quota.check, 1)
        self.assertRaises(FileNotFoundError, quota.usage)

    def test_recountRescansWhenTheMaildirChanges(self) -> None:
        maildir = self.maildir
        newDir = os.path.join(maildir, "new")

        class Delivering(RecordingFileSystem):
            """A message arrives between the scan and the rename, once."""

            def write(self, fd: int, data: bytes | memoryview) -> None:
                super().write(fd, data)
                if len(self.events) == 2:
                    putMessage(maildir, "new", "2.M1P1Q1.mx.test,S=50", 50)
                    stamp = os.stat(newDir).st_mtime + 10  # beyond timestamp granularity
                    os.utime(newDir, (stamp, stamp))

        fs = Delivering()
        self.assertEqual(self.quota(fs=fs).recount(), QuotaUsage(50, 1))
        self.assertEqual([op for op, _ in fs.events].count("rename"), 2)
        self.assertEqual(readSizeFile(maildir), b"1000S\n50 1\n")

    def test_recountGivesUpRescanningAfterSomeTries(self) -> None:
        newDir = os.path.join(self.maildir, "new")

        class Busy(RecordingFileSystem):
            def write(self, fd: int, data: bytes | memoryview) -> None:
                super().write(fd, data)
                stamp = os.stat(newDir).st_mtime + 10
                os.utime(newDir, (stamp, stamp))

        fs = Busy()
        self.assertEqual(self.quota(fs=fs).recount(), QuotaUsage(0, 0))
        self.assertEqual([op for op, _ in fs.events].count("rename"), MAX_SCANS)
        self.assertEqual(readSizeFile(self.maildir), b"1000S\n0 0\n")

    def test_quotaRootOfAFolderIsItsParent(self) -> None:
        folder = os.path.join(self.maildir, ".Work")
        makeMaildir(FileSystem(), folder)
        self.assertEqual(quotaRoot(folder), folder)
        putMessage(folder, "", "maildirfolder", 0)
        self.assertEqual(quotaRoot(folder), os.path.normpath(self.maildir))
        self.assertEqual(quotaRoot(self.maildir), self.maildir)


class LockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.maildir = self.mktemp()
        makeMaildir(FileSystem(), self.maildir)

    def tryLock(self, path: str) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def test_locksTmpNotTheMaildir(self) -> None:
        quota = MaildirQuota(self.maildir, LIMIT)
        with quota.locked():
            self.assertFalse(self.tryLock(os.path.join(self.maildir, "tmp")))
            self.assertTrue(self.tryLock(self.maildir))
        self.assertTrue(self.tryLock(os.path.join(self.maildir, "tmp")))

    def test_concurrentDeliveriesNearTheLimitOnlyOneFits(self) -> None:
        putMessage(self.maildir, "cur", "0.M1P1Q1.mx.test,S=400:2,S", 400)
        MaildirQuota(self.maildir, LIMIT).recount()
        barrier = threading.Barrier(2)
        results: list[bool] = []
        errors: list[BaseException] = []

        def deliver(n: int) -> None:
            try:
                quota = MaildirQuota(self.maildir, LIMIT)
                barrier.wait(timeout=10)
                with quota.locked():
                    fits = quota.check(500)
                    if fits:
                        time.sleep(0.1)  # the window an unlocked pair would both pass
                        putMessage(self.maildir, "new", f"{n}.M1P1Q1.mx.test,S=500", 500)
                        quota.add(500)
                    results.append(fits)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=deliver, args=(n,)) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(results), [False, True])
        self.assertEqual(len(os.listdir(os.path.join(self.maildir, "new"))), 1)
        self.assertEqual(MaildirQuota(self.maildir, LIMIT).usage(), QuotaUsage(900, 2))


def courierTool(case: SynchronousTestCase, name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        case.fail(
            f"{name} not found: install Debian package maildrop "
            "(courier's maildirmake and deliverquota)"
        )
    return path


class CourierCompatibilityTests(SynchronousTestCase):
    """Our maildirsize against maildrop's maildirmake and deliverquota."""

    def setUp(self) -> None:
        self.maildirmake = courierTool(self, "maildirmake")
        self.deliverquota = courierTool(self, "deliverquota")
        self.maildir = os.path.abspath(self.mktemp())

    def runTool(self, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        # A timeout: maildirmake -q loops forever when the Maildir does not exist.
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)

    def makeCourierMaildir(self, definition: str) -> None:
        for argv in (
            [self.maildirmake, self.maildir],
            [self.maildirmake, "-q", definition, self.maildir],
        ):
            result = self.runTool(*argv)
            self.assertEqual(result.returncode, 0, result)

    def deliver(self, size: int) -> int:
        """deliverquota a message of exactly ``size`` bytes; its exit code."""
        head = b"Subject: t\n\n"
        message = head + b"x" * (size - len(head) - 1) + b"\n"
        self.assertEqual(len(message), size)
        return self.runTool(self.deliverquota, self.maildir, stdin=message).returncode

    def test_maildirmakeQuotaIsReadAsIs(self) -> None:
        self.makeCourierMaildir("1000S,5C")
        content = readSizeFile(self.maildir)
        parsed = parseMaildirSize(content)
        self.assertEqual((parsed.limit, parsed.usage), (QuotaLimit(1000, 5), QuotaUsage(0, 0)))
        self.assertEqual(MaildirQuota(self.maildir, QuotaLimit(1000, 5)).usage(), QuotaUsage(0, 0))
        self.assertEqual(readSizeFile(self.maildir), content)  # not rewritten

    def test_deliverquotaUsageAgreesWithOurs(self) -> None:
        self.makeCourierMaildir("1000S,5C")
        self.assertEqual(self.deliver(120), 0)
        self.assertEqual(self.deliver(300), 0)
        content = readSizeFile(self.maildir)
        quota = MaildirQuota(self.maildir, QuotaLimit(1000, 5))
        self.assertEqual(quota.usage(), QuotaUsage(420, 2))
        self.assertEqual(readSizeFile(self.maildir), content)
        names = os.listdir(os.path.join(self.maildir, "new"))
        self.assertEqual(sorted(sizeFromName(n) for n in names), [120, 300])
        self.assertEqual(quota.recount(), QuotaUsage(420, 2))

    def test_deliverquotaAppendsToOurLinesWithoutRecounting(self) -> None:
        self.makeCourierMaildir("1000S")
        quota = MaildirQuota(self.maildir, LIMIT)
        quota.add(500)  # a phantom: only the file knows about it
        before = readSizeFile(self.maildir)
        self.assertEqual(self.deliver(100), 0)
        after = readSizeFile(self.maildir)
        self.assertTrue(after.startswith(before), after)
        self.assertEqual(parseMaildirSize(after).usage, QuotaUsage(600, 2))
        self.assertEqual(quota.usage(), QuotaUsage(600, 2))

    def test_deliverquotaRefusesWhatOurLinesFillUp(self) -> None:
        self.makeCourierMaildir("1000S")
        quota = MaildirQuota(self.maildir, LIMIT)
        with quota.locked():
            self.assertTrue(quota.check(900))
            putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=900", 900)
            quota.add(900)
        self.assertEqual(self.deliver(101), 77)
        self.assertEqual(len(os.listdir(os.path.join(self.maildir, "new"))), 1)
        self.assertEqual(self.deliver(100), 0)  # exactly full is not over
        self.assertEqual(quota.usage(), QuotaUsage(1000, 2))
        self.assertFalse(quota.check(1))

    def test_deliverquotaTrustsOurRecount(self) -> None:
        self.makeCourierMaildir("1000S")
        path = putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=900", 900)
        MaildirQuota(self.maildir, LIMIT).recount()
        os.unlink(path)  # removed behind the quota's back: only our file says 900
        self.assertEqual(self.deliver(200), 77)

    def test_countLimit(self) -> None:
        self.makeCourierMaildir("100000S,2C")
        self.assertEqual(self.deliver(50), 0)
        quota = MaildirQuota(self.maildir, QuotaLimit(100000, 2))
        self.assertTrue(quota.check(50))
        putMessage(self.maildir, "new", "1.M1P1Q1.mx.test,S=50", 50)
        quota.add(50)
        self.assertFalse(quota.check(1))
        self.assertEqual(self.deliver(50), 77)

    def test_courierRecountAgreesWithOurs(self) -> None:
        self.makeCourierMaildir("100000S")
        m = self.maildir
        for folder in ("Work", "Trash"):
            self.assertEqual(self.runTool(self.maildirmake, "-f", folder, m).returncode, 0)
        putMessage(m, "new", "1.M1P1Q1.mx.test,S=100", 999)
        putMessage(m, "cur", "2.plain.mx.test:2,S", 33)
        putMessage(m, "cur", "3.M1P1Q1.mx.test,S=4000:2,ST", 4000)
        putMessage(m, ".Work/cur", "4.M1P1Q1.mx.test,S=1000:2,S", 1000)
        putMessage(m, ".Trash/cur", "5.M1P1Q1.mx.test,S=8000:2,S", 8000)
        # maildirmake -q on an existing Maildir recounts it, courier's way.
        self.assertEqual(self.runTool(self.maildirmake, "-q", "100000S", m).returncode, 0)
        theirs = parseMaildirSize(readSizeFile(m))
        self.assertEqual(theirs.usage, QuotaUsage(1133, 3))
        self.assertEqual(MaildirQuota(m, QuotaLimit(100000)).recount(), theirs.usage)
