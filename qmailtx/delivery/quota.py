"""Maildir++ quota: courier's ``maildirsize`` file (README.maildirquota).

``maildirsize`` sits at the top of a Maildir. Line 1 is the quota
definition (``10000000S``, ``10000000S,1000C``); every further line is a
delta ``"<bytes> <count>"`` (negative for removals) and the usage is their
sum. Courier (maildrop, deliverquota, courier-imap), Dovecot and vpopmail
read and append to the same file, so the format and the rules for throwing
it away and recounting the Maildir follow courier's ``maildirquota.c``:

- recount when the file is missing, unreadable, torn or otherwise not
  parseable, at least 5120 bytes long, sums to a negative usage, or has a
  definition other than the user's limit;
- recount when it says the Maildir is over quota (the new message included)
  unless it has exactly one delta line and is younger than 15 minutes;
- a recount sums ``new/`` and ``cur/`` of the Maildir and of every ``.Folder``
  except ``.Trash``, skipping dot files and messages flagged ``T`` (deleted),
  taking sizes from ``,S=<n>`` in the name or else from stat.

Over quota means usage + new > limit (strictly), for bytes and count
separately; a limit of 0 on one side means no limit there, as in courier.
I/O errors are never an answer: OSError propagates, for the caller to turn
into a temporary failure.

Plain blocking code: call it only from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qmailtx.delivery.maildir import maildirHostName
from qmailtx.fs import FileSystem, unlinkQuietly
from qmailtx.vdomain.records import QuotaLimit

MAILDIRSIZE = "maildirsize"
RECOUNT_SIZE = 5120  # a maildirsize this long (or longer) is recounted
STALE_AFTER = 15 * 60  # seconds after which an over-quota answer is rechecked
MAX_SCANS = 5  # recounts tried while the Maildir keeps changing under us

_DEFINITION = re.compile(r"(\d+)([SC])\Z")
_counter = itertools.count(1)
_counterLock = threading.Lock()


class MaildirSizeError(ValueError):
    """A maildirsize that cannot be trusted (torn, garbage): recount."""


@dataclass(frozen=True)
class QuotaUsage:
    """What a Maildir holds, as counted for its quota."""

    bytes: int
    count: int


@dataclass(frozen=True)
class MaildirSize:
    """The content of a ``maildirsize`` file."""

    limit: QuotaLimit  # the definition line
    usage: QuotaUsage  # sum of the delta lines
    deltaLines: int


def normaliseLimit(limit: QuotaLimit) -> QuotaLimit:
    """The limit as courier sees it: 0 on one side means no limit there."""
    return QuotaLimit(limit.bytes or None, limit.count or None)


def parseDefinition(text: str) -> QuotaLimit:
    """Parse a definition line such as ``1000S,10C`` (normalised)."""
    size: int | None = None
    count: int | None = None
    for part in text.split(","):
        m = _DEFINITION.match(part)
        if m is None:
            raise MaildirSizeError(f"not a Maildir++ quota definition: {text!r}")
        if m.group(2) == "S":
            size = int(m.group(1))
        else:
            count = int(m.group(1))
    return normaliseLimit(QuotaLimit(size, count))


def parseMaildirSize(data: bytes) -> MaildirSize:
    """Parse a whole maildirsize; MaildirSizeError if any line is not sound.

    The last line must end in a newline: a file cut short by a crash (or
    being written by someone else) is not trusted.
    """
    if not data.endswith(b"\n"):
        raise MaildirSizeError("maildirsize does not end with a newline")
    lines = data[:-1].split(b"\n")
    try:
        limit = parseDefinition(lines[0].decode("ascii"))
    except UnicodeDecodeError as e:
        raise MaildirSizeError("maildirsize definition is not ASCII") from e
    size = count = 0
    try:
        if b"_" in data:
            raise ValueError("underscore")  # int() would take "1_000"
        for line in lines[1:]:
            bytesPart, countPart = line.split()  # courier pads with spaces
            size += int(bytesPart)
            count += int(countPart)
    except ValueError as e:
        raise MaildirSizeError(f"not a maildirsize delta line in {data[:80]!r}") from e
    return MaildirSize(limit, QuotaUsage(size, count), len(lines) - 1)


def isOverQuota(usage: QuotaUsage, limit: QuotaLimit, size: int = 0, count: int = 0) -> bool:
    """Would ``usage`` plus ``size`` bytes in ``count`` messages exceed ``limit``?"""
    limit = normaliseLimit(limit)
    if limit.bytes is not None and usage.bytes + size > limit.bytes:
        return True
    return limit.count is not None and usage.count + count > limit.count


def usagePercent(usage: QuotaUsage, limit: QuotaLimit) -> float:
    """How full, in percent of the fuller limited side (0.0 when unlimited)."""
    limit = normaliseLimit(limit)
    sides = [(usage.bytes, limit.bytes), (usage.count, limit.count)]
    return max((100.0 * used / lim for used, lim in sides if lim is not None), default=0.0)


def crossedPercent(before: QuotaUsage, after: QuotaUsage, limit: QuotaLimit, percent: int) -> bool:
    """Did usage go from below ``percent`` % to at or above it (exact, integers)?

    For quota warnings: ``before`` is the usage read before delivering,
    ``after`` that plus the message just added.
    """
    limit = normaliseLimit(limit)

    def below(usage: QuotaUsage) -> bool:
        sides = [(usage.bytes, limit.bytes), (usage.count, limit.count)]
        return all(used * 100 < percent * lim for used, lim in sides if lim is not None)

    return below(before) and not below(after)


def sizeFromName(name: str) -> int | None:
    """The ``,S=<n>`` size in a Maildir file name (before ``:2,``), or None."""
    head = name.rsplit("/", 1)[-1].split(":", 1)[0]
    i = head.rfind(",S=")
    if i < 0:
        return None
    digits = re.match(r"\d*", head[i + 3 :])
    return int(digits.group()) if digits and digits.group() else 0


def _flaggedDeleted(name: str) -> bool:
    i = name.find(":2,")
    if i < 0:
        return False
    m = re.match(r"[A-Z]*", name[i + 3 :])
    return m is not None and "T" in m.group()


def quotaRoot(maildir: str) -> str:
    """The Maildir whose maildirsize applies: a folder (it holds a
    ``maildirfolder`` file) uses its parent's."""
    if os.path.exists(os.path.join(maildir, "maildirfolder")):
        return os.path.normpath(os.path.join(maildir, ".."))
    return maildir


class MaildirQuota:
    """The Maildir++ quota of one Maildir (its top, not a folder: see quotaRoot).

    ``limit`` comes from the user database and wins over the file: a
    maildirsize with another definition is rebuilt. An unlimited limit is
    refused (there is nothing to enforce and no definition to write).
    ``fs`` carries the durable writes of a recount; ``clock`` tells the age
    of the file.

    To deliver: ``with quota.locked(): if quota.check(size): <deliver>;
    quota.add(size)``. Add only after the message is linked into ``new/``;
    if the delivery fails after that (the fsync of ``new/``), remove the
    message and ``add(-size, -1)``, so a crash can only over-count.
    """

    def __init__(
        self,
        maildir: str,
        limit: QuotaLimit,
        clock: Callable[[], float] = time.time,
        fs: FileSystem | None = None,
        host: str | None = None,
    ) -> None:
        self.maildir = maildir
        self.limit = normaliseLimit(limit)
        if self.limit.unlimited:
            raise ValueError("MaildirQuota needs a limit (bytes or count)")
        self.path = os.path.join(maildir, MAILDIRSIZE)
        self.clock = clock
        self.fs = fs or FileSystem()
        self.host = maildirHostName(host)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the Maildir's ``tmp/`` for check-deliver-add.

        Courier and Dovecot do not lock maildirsize at all, so this only
        serialises qmailtx's own deliveries (and removals) into this Maildir;
        theirs can still race ours, as Maildir++ accepts.
        """
        fd = os.open(os.path.join(self.maildir, "tmp"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def usage(self) -> QuotaUsage:
        """The current usage, recounted when courier's rules say so."""
        return self._usageWith(0, 0)

    def check(self, size: int, count: int = 1) -> bool:
        """True when ``size`` more bytes in ``count`` more messages fit."""
        return self.checkUsage(size, count)[0]

    def checkUsage(self, size: int, count: int = 1) -> tuple[bool, QuotaUsage]:
        """``check`` and the usage it found, from one read of maildirsize."""
        usage = self._usageWith(size, count)
        return not isOverQuota(usage, self.limit, size, count), usage

    def add(self, size: int, count: int = 1) -> None:
        """Append ``"<size> <count>\\n"`` (negative for removals) in one write.

        A missing or empty maildirsize is rebuilt by a recount instead, which
        already sees the change on disk, so then no line is appended. After a
        torn last line a newline goes first, in the same write, so the torn
        line stays a line of its own and the next reader recounts.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            self.recount()
            return
        try:
            length = os.fstat(fd).st_size
            if length == 0:
                self.recount()
                return
            line = f"{size} {count}\n".encode("ascii")
            if os.pread(fd, 1, length - 1) != b"\n":
                line = b"\n" + line
            if os.write(fd, line) != len(line):
                raise OSError(errno.EIO, "short write to maildirsize", self.path)
        finally:
            os.close(fd)

    def recount(self) -> QuotaUsage:
        """Count the Maildir and its folders and replace maildirsize with the sum.

        If a ``new/`` or ``cur/`` changed meanwhile, count again (MAX_SCANS
        times at most; then the last count stands, as approximate as
        Maildir++ itself).
        """
        usage = QuotaUsage(0, 0)
        for _ in range(MAX_SCANS):
            usage, before = self._scan()
            self._write(f"{self.limit}\n{usage.bytes} {usage.count}\n".encode("ascii"))
            if self._stamps() == before:
                break
        return usage

    def _usageWith(self, size: int, count: int) -> QuotaUsage:
        read = self._read()
        if read is None:
            return self.recount()
        parsed, mtime = read
        usage = parsed.usage
        if parsed.limit != self.limit or usage.bytes < 0 or usage.count < 0:
            return self.recount()
        if isOverQuota(usage, self.limit, size, count) and (
            parsed.deltaLines != 1 or self.clock() >= mtime + STALE_AFTER
        ):
            return self.recount()
        return usage

    def _read(self) -> tuple[MaildirSize, float] | None:
        """The parsed file and its mtime, or None when it must be recounted."""
        try:
            fd = self.fs.openRead(self.path)
        except OSError:
            return None
        try:
            mtime = os.fstat(fd).st_mtime
            data = b""
            while len(data) < RECOUNT_SIZE:
                chunk = self.fs.readAt(fd, RECOUNT_SIZE - len(data), len(data))
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
        finally:
            self.fs.close(fd)
        if len(data) >= RECOUNT_SIZE:
            return None
        try:
            return parseMaildirSize(data), mtime
        except MaildirSizeError:
            return None

    def _folders(self) -> list[str]:
        """The Maildir and its Maildir++ folders counted for the quota."""
        folders = [self.maildir]
        with os.scandir(self.maildir) as entries:
            for entry in entries:
                name = entry.name
                if (
                    name.startswith(".")
                    and name != ".Trash"
                    and entry.is_dir(follow_symlinks=False)
                ):
                    folders.append(entry.path)
        return sorted(folders)

    def _stamps(self) -> dict[str, int]:
        stamps = {}
        for folder in self._folders():
            for sub in ("new", "cur"):
                path = os.path.join(folder, sub)
                try:
                    stamps[path] = os.stat(path).st_mtime_ns
                except FileNotFoundError:
                    continue
        return stamps

    def _scan(self) -> tuple[QuotaUsage, dict[str, int]]:
        size = count = 0
        stamps = {}
        for folder in self._folders():
            for sub in ("new", "cur"):
                path = os.path.join(folder, sub)
                try:
                    stamps[path] = os.stat(path).st_mtime_ns
                    entries = os.scandir(path)
                except FileNotFoundError:
                    continue
                with entries:
                    for entry in entries:
                        name = entry.name
                        if name.startswith(".") or _flaggedDeleted(name):
                            continue
                        n = sizeFromName(name)
                        if n is None:
                            try:
                                n = entry.stat().st_size
                            except FileNotFoundError:
                                continue  # removed meanwhile
                        size += n
                        count += 1
        return QuotaUsage(size, count), stamps

    def _write(self, content: bytes) -> None:
        """Replace maildirsize atomically: tmp/ name, fsync, rename, fsync dir."""
        with _counterLock:
            n = next(_counter)
        now = self.clock()
        tmp = os.path.join(
            self.maildir, "tmp", f"{int(now)}.{os.getpid()}_{n}_NeWmAiLdIrSiZe.{self.host}"
        )
        fd = self.fs.openExclusive(tmp)
        renamed = False
        try:
            self.fs.write(fd, content)
            self.fs.fsync(fd)
            self.fs.rename(tmp, self.path)
            renamed = True
        finally:
            self.fs.close(fd)
            if not renamed:
                unlinkQuietly(self.fs, tmp)
        self.fs.fsyncDirectory(self.maildir)
