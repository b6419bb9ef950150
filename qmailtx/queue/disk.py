"""Synchronous, fsync'd queue file operations. Call only from the queue's thread pool.

Commit order (qmail-queue with the fsync patch, Postfix's cleanup): write the
file under ``tmp/``, fsync it, link it into ``mess/N/``, fsync ``mess/N/``,
and only then report success; the ``tmp/`` name is removed afterwards (a
leftover there is cleaned up at start-up and was never acknowledged).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading
import time
from collections.abc import Collection, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from qmailtx.address import Address
from qmailtx.fs import FileSystem, unlinkQuietly
from qmailtx.queue.layout import (
    HEADER,
    SPLIT,
    TRAILER,
    QueuedMessage,
    QueueFileError,
    encodeEnvelope,
    fileHeader,
    fileTrailer,
    parseQueueFile,
    splitName,
)

_counter = itertools.count()
_counterLock = threading.Lock()
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_MESSAGE_ID = re.compile(r"[0-9a-f]{4,32}\Z")


def newMessageId(now: float | None = None) -> str:
    """Unique, time-ordered ids: the arrival time in microseconds (hex) and a counter."""
    with _counterLock:
        n = next(_counter)
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:x}{n % 4096:03x}"


def isMessageId(text: str) -> bool:
    """Whether ``text`` looks like an id from newMessageId (safe as a file name)."""
    return _MESSAGE_ID.match(text) is not None


@dataclass
class SpoolFile:
    """Thread-side state of one message being received."""

    msgid: str
    header: bytes
    fd: int | None = None
    tmpPath: str | None = None  # None: an O_TMPFILE file without a name
    length: int = 0  # message bytes written so far
    scratch: bool = False  # for a QMAILQUEUE filter: the message alone, never linked


@dataclass
class ScanResult:
    messages: list[QueuedMessage]
    removedTemporary: int
    quarantined: list[tuple[str, str]]  # (file name, reason): moved to corrupt/
    # (file name, reason): left in mess/ for a later look, because reading it
    # failed (EIO, EMFILE...) or a damaged one could not be moved
    unreadable: list[tuple[str, str]] = field(default_factory=list)


class QueueDisk:
    def __init__(self, root: str, fs: FileSystem | None = None) -> None:
        self.root = root
        self.fs = fs or FileSystem()
        self.tmpDir = os.path.join(root, "tmp")
        self.messDir = os.path.join(root, "mess")
        self.corruptDir = os.path.join(root, "corrupt")

    # -- setup and recovery ------------------------------------------------

    def create(self) -> None:
        for d in (self.tmpDir, self.corruptDir):
            self.fs.makedirs(d)
        for s in SPLIT:
            self.fs.makedirs(os.path.join(self.messDir, s))

    def scan(self) -> ScanResult:
        """Start-up recovery: drop leftovers in tmp/, quarantine torn files, load the rest."""
        self.create()
        removed = 0
        for name in self.fs.listdir(self.tmpDir):
            unlinkQuietly(self.fs, os.path.join(self.tmpDir, name))
            removed += 1
        messages = []
        quarantined = []
        unreadable = []
        for s in SPLIT:
            folder = os.path.join(self.messDir, s)
            for name in sorted(self.fs.listdir(folder)):
                path = os.path.join(folder, name)
                try:
                    messages.append(self.load(name, path))
                except FileNotFoundError:
                    continue
                except OSError as e:
                    # Not the file's fault (EIO, EMFILE, ENOMEM...): a good
                    # message must not end up in corrupt/.
                    unreadable.append((name, e.strerror or str(e)))
                except (QueueFileError, UnicodeError) as e:
                    try:
                        self._quarantine(path, name)
                    except OSError as moving:
                        reason = f"{e}; cannot move it to corrupt/: {moving.strerror or moving}"
                        unreadable.append((name, reason))
                    else:
                        quarantined.append((name, str(e)))
        return ScanResult(messages, removed, quarantined, unreadable)

    def load(self, msgid: str, path: str) -> QueuedMessage:
        fd = self.fs.openRead(path)
        try:
            size = self.fs.size(fd)
            head = self.fs.readAt(fd, HEADER.size, 0)
            if len(head) == HEADER.size:
                _, envLength = HEADER.unpack(head)
                if HEADER.size + envLength <= size:
                    head += self.fs.readAt(fd, envLength, HEADER.size)
            trailer = self.fs.readAt(fd, TRAILER.size, max(size - TRAILER.size, 0))
            message = parseQueueFile(msgid, path, head, trailer, size)
            message.nextAttempt = os.fstat(fd).st_mtime
            return message
        finally:
            self.fs.close(fd)

    def _quarantine(self, path: str, name: str) -> None:
        target = os.path.join(self.corruptDir, name)
        if os.path.exists(target):
            target += f".{int(time.time())}"
        self.fs.rename(path, target)
        self.fs.fsyncDirectory(self.corruptDir)

    # -- receiving ------------------------------------------------------------

    def newSpool(
        self,
        birth: float,
        sender: Address,
        recipients: list[Address],
        info: dict[str, str],
        msgid: str | None = None,
    ) -> SpoolFile:
        header = fileHeader(encodeEnvelope(birth, sender, recipients, info))
        return SpoolFile(msgid or newMessageId(), header)

    def newFilterSpool(self) -> SpoolFile:
        """A spool for a message that goes to a QMAILQUEUE filter rather than
        into ``mess/``: the message alone in a scratch file (see filterInput)."""
        return SpoolFile(newMessageId(), b"", scratch=True)

    def spoolWrite(self, spool: SpoolFile, data: bytes, trailer: bool = False) -> None:
        """Append message bytes (and, at the end, the trailer) in one write."""
        head = b""
        if spool.fd is None:
            if spool.scratch:
                spool.fd = self.scratchFile()
            else:
                spool.fd, spool.tmpPath = self.fs.openAnonymous(self.tmpDir, spool.msgid)
            head = spool.header
        spool.length += len(data)
        tail = fileTrailer(spool.length) if trailer else b""
        self.fs.write(spool.fd, b"".join((head, data, tail)) if head or tail else data)

    def spoolCommit(self, spool: SpoolFile, data: bytes) -> QueuedMessage:
        """Write the rest, make it durable, link it into mess/. Success means durable."""
        final = None
        try:
            self.spoolWrite(spool, data, trailer=True)
            assert spool.fd is not None
            self.fs.fsync(spool.fd)
            while True:
                folder = os.path.join(self.messDir, splitName(spool.msgid))
                try:
                    self.fs.linkInto(spool.fd, spool.tmpPath, os.path.join(folder, spool.msgid))
                    final = os.path.join(folder, spool.msgid)
                    break
                except FileExistsError:
                    # An id reused after the clock went back: pick another.
                    spool.msgid = newMessageId()
            self.fs.syncDirectory(folder)
        except BaseException:
            # Not acknowledged, so not queued: leave no copy that a restart could deliver.
            if final is not None:
                unlinkQuietly(self.fs, final)
            self.spoolAbort(spool)
            raise
        self.spoolAbort(spool)  # closes; removes the tmp/ name if there was one
        size = len(spool.header) + spool.length + TRAILER.size
        return parseQueueFile(spool.msgid, final, spool.header, fileTrailer(spool.length), size)

    def spoolAbort(self, spool: SpoolFile) -> None:
        if spool.fd is not None:
            try:
                self.fs.close(spool.fd)
            except OSError:
                pass
            spool.fd = None
        if spool.tmpPath is not None:
            unlinkQuietly(self.fs, spool.tmpPath)
            spool.tmpPath = None

    def inject(
        self,
        birth: float,
        sender: Address,
        recipients: list[Address],
        content: bytes,
        info: dict[str, str],
    ) -> QueuedMessage:
        """Queue a whole message at once (bounces); durable when it returns."""
        spool = self.newSpool(birth, sender, recipients, info)
        return self.spoolCommit(spool, content)

    def injectFrom(
        self,
        birth: float,
        sender: Address,
        recipients: list[Address],
        info: dict[str, str],
        source: int,
        offset: int,
        length: int,
        msgid: str | None = None,
    ) -> QueuedMessage:
        """Queue ``length`` message bytes read from ``source`` at ``offset``
        (qmailtx-queue); ``msgid`` is the id wanted, if it is still free.
        Durable when it returns."""
        spool = self.newSpool(birth, sender, recipients, info, msgid)
        try:
            self.spoolWrite(spool, b"")
            assert spool.fd is not None
            self.fs.copyRange(source, spool.fd, offset, length)
            spool.length = length
        except BaseException:
            self.spoolAbort(spool)
            raise
        return self.spoolCommit(spool, b"")

    # -- QMAILQUEUE filters ---------------------------------------------------

    def scratchFile(self) -> int:
        """A new read-write file under ``tmp/`` without a name (never durable)."""
        try:
            return os.open(self.tmpDir, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if _O_TMPFILE and e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        path = os.path.join(self.tmpDir, f"{newMessageId()}.scratch")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        unlinkQuietly(self.fs, path)
        return fd

    def filterInput(self, spool: SpoolFile, data: bytes, envelope: bytes) -> tuple[int, int]:
        """Finish a filter spool: (message fd, envelope fd), both files read
        from offset 0, for the filter's fd 0 and fd 1. The caller closes them."""
        assert spool.scratch
        envelopeFd = None
        try:
            self.spoolWrite(spool, data)
            envelopeFd = self.scratchFile()
            self.fs.write(envelopeFd, envelope)
            os.lseek(envelopeFd, 0, os.SEEK_SET)
            assert spool.fd is not None
            os.lseek(spool.fd, 0, os.SEEK_SET)
        except BaseException:
            if envelopeFd is not None:
                os.close(envelopeFd)
            self.spoolAbort(spool)
            raise
        messageFd, spool.fd = spool.fd, None
        return messageFd, envelopeFd

    def messagePath(self, msgid: str) -> str:
        return os.path.join(self.messDir, splitName(msgid), msgid)

    def loadNew(
        self, msgids: Collection[str] | None, known: AbstractSet[str]
    ) -> tuple[list[QueuedMessage], list[tuple[str, str]]]:
        """Messages another process linked into ``mess/`` while we run: those
        named (or, for None, every one) that are not in ``known``.

        Returns the messages and (name, reason) for files that could not be
        read; unlike ``scan`` nothing is moved or removed (the start-up scan
        deals with damaged files).
        """
        names: list[tuple[str, str]]
        if msgids is None:
            names = []
            for s in SPLIT:
                folder = os.path.join(self.messDir, s)
                names.extend((n, os.path.join(folder, n)) for n in self.fs.listdir(folder))
        else:
            names = [(m, self.messagePath(m)) for m in msgids if isMessageId(m)]
        messages = []
        problems = []
        for name, path in sorted(names):
            if name in known:
                continue
            try:
                messages.append(self.load(name, path))
            except FileNotFoundError:
                continue  # finished meanwhile, or never queued under this id
            except (QueueFileError, OSError, UnicodeError) as e:
                problems.append((name, str(e)))
        return messages, problems

    # -- delivery bookkeeping ----------------------------------------------

    def mark(
        self, message: QueuedMessage, changes: dict[int, str], nextAttempt: float | None
    ) -> None:
        """Overwrite recipients' state letters in place and make that durable;
        remember the next attempt (if given) in the file's mtime.

        A file that is gone was finished by a delivery that ended meanwhile:
        there is nothing left to mark.
        """
        if changes:
            try:
                fd = self.fs.openUpdate(message.path)
            except FileNotFoundError:
                return
            try:
                for index, letter in sorted(changes.items()):
                    self.fs.pwrite(fd, letter.encode("ascii"), message.stateOffsets[index])
                self.fs.fdatasync(fd)
            finally:
                self.fs.close(fd)
        if nextAttempt is not None:
            self.setNextAttempt(message, nextAttempt)

    def setNextAttempt(self, message: QueuedMessage, when: float) -> None:
        """Remember the next attempt in the file's mtime (like Postfix); not fsync'd."""
        try:
            self.fs.utime(message.path, when)
        except OSError:
            pass

    def remove(self, message: QueuedMessage) -> None:
        """Delete a finished message. Not fsync'd: a crash may resurrect it,
        which at worst repeats a delivery, never loses one."""
        try:
            self.fs.unlink(message.path)
        except FileNotFoundError:
            pass

    def readHeader(self, message: QueuedMessage, limit: int) -> tuple[bytes, bool]:
        """The message's header block (up to ``limit`` bytes) and whether it is complete."""
        fd = self.fs.openRead(message.path)
        try:
            data = self.fs.readAt(fd, min(limit, message.messageLength), message.messageOffset)
        finally:
            self.fs.close(fd)
        if data.startswith(b"\n"):
            return b"", True
        end = data.find(b"\n\n")
        if end >= 0:
            return data[: end + 1], True
        if len(data) == message.messageLength:
            return data if data.endswith(b"\n") else data + b"\n", True
        return data[: data.rfind(b"\n") + 1], False

    def readMessage(self, message: QueuedMessage, limit: int) -> bytes:
        fd = self.fs.openRead(message.path)
        try:
            return self.fs.readAt(fd, min(limit, message.messageLength), message.messageOffset)
        finally:
            self.fs.close(fd)

    def readMessageChunk(self, message: QueuedMessage, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the message from ``offset`` (b"" past its end)."""
        size = max(min(size, message.messageLength - offset), 0)
        if not size:
            return b""
        fd = self.fs.openRead(message.path)
        try:
            return self.fs.readAt(fd, size, message.messageOffset + offset)
        finally:
            self.fs.close(fd)

    def iterMessage(self, message: QueuedMessage, size: int) -> Iterator[bytes]:
        """The message in chunks of ``size`` bytes, one open file for them all."""
        fd = self.fs.openRead(message.path)
        try:
            offset = 0
            while offset < message.messageLength:
                want = min(size, message.messageLength - offset)
                chunk = self.fs.readAt(fd, want, message.messageOffset + offset)
                if not chunk:
                    raise OSError(errno.EIO, "Queue file shorter than its message")
                offset += len(chunk)
                yield chunk
        finally:
            self.fs.close(fd)


def isDiskFull(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
