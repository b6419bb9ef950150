"""Maildir delivery (maildir(5)): tmp/, fsync, link into new/, fsync new/.

File names follow the modern uniqueness rule that Courier and Dovecot use:
``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>``, where S is the size of the file
as written (Maildir++ quota and Dovecot read it).

Files a killed writer left in ``tmp/`` are removed once they are 36 hours
old (``sweepStaleTmp``), as maildir(5), qmail-local, courier and Dovecot do;
``StaleTmpSweeper`` does that at most once an hour per Maildir.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qmailtx.fs import FileSystem, unlinkQuietly

STALE_TMP_AGE = 36 * 3600  # maildir(5): files in tmp/ this old are leftovers
SWEEP_INTERVAL = 3600.0  # StaleTmpSweeper: at most one sweep per Maildir per hour
SWEEP_MEMORY = 10_000  # StaleTmpSweeper: Maildirs remembered

_counter = itertools.count(1)
_lock = threading.Lock()


def maildirHostName(name: str | None = None) -> str:
    host = name or _systemHostName()
    return host.replace("/", "\\057").replace(":", "\\072")


@functools.cache
def _systemHostName() -> str:
    return socket.gethostname() or "localhost"


class MaildirWriter:
    def __init__(
        self,
        fs: FileSystem | None = None,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
    ) -> None:
        self.fs = fs or FileSystem()
        self.clock = clock
        self.host = maildirHostName(host)
        self.pid = os.getpid()

    def uniqueName(self, size: int) -> str:
        with _lock:
            n = next(_counter)
        now = self.clock()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{self.pid}Q{n}.{self.host},S={size}"

    def deliver(self, maildir: str, prefix: bytes, sourceFd: int, offset: int, length: int) -> str:
        """Write ``prefix`` + ``length`` bytes of ``sourceFd`` at ``offset`` as one message.

        Returns the name in ``new/``. The file is written unnamed (O_TMPFILE
        in ``tmp/``, or under its tmp/ name where that is missing), fsync'd,
        linked into ``new/``, and ``new/`` is fsync'd. Any OSError leaves
        nothing behind in ``tmp/`` or ``new/`` and is the caller's to classify
        (always temporary unless the Maildir itself is missing).
        """
        pending = self.prepare(maildir, prefix, sourceFd, offset, length)
        try:
            self.publish(pending)
            self.fs.syncDirectory(os.path.join(maildir, "new"))
        except BaseException:
            self.unpublish(pending)
            raise
        finally:
            self.discard(pending)
        return pending.name

    def prepare(
        self, maildir: str, prefix: bytes, sourceFd: int, offset: int, length: int
    ) -> PendingMessage:
        """The first half of ``deliver``: the message written and fsync'd, not
        yet in ``new/``. Follow with ``publish``, then always ``discard``."""
        size = len(prefix) + length
        tmpDir = os.path.join(maildir, "tmp")
        for _ in range(3):
            name = self.uniqueName(size)
            try:
                fd, tmp = self.fs.openAnonymous(tmpDir, name)
                break
            except FileExistsError:
                continue
        else:
            raise OSError("could not find a unique Maildir name")
        pending = PendingMessage(maildir, fd, tmp, name, size)
        try:
            self.fs.write(fd, prefix)
            self.fs.copyRange(sourceFd, fd, offset, length)
            self.fs.fsync(fd)
        except BaseException:
            self.discard(pending)
            raise
        return pending

    def publish(self, pending: PendingMessage) -> None:
        """Link a prepared message into ``new/`` (not yet fsync'd: the caller
        syncs ``new/`` before reporting success)."""
        newDir = os.path.join(pending.maildir, "new")
        for _ in range(3):
            try:
                self.fs.linkInto(pending.fd, pending.tmp, os.path.join(newDir, pending.name))
                pending.linked = True
                return
            except FileExistsError:
                pending.name = self.uniqueName(pending.size)
        raise OSError("could not find a unique Maildir name")

    def discard(self, pending: PendingMessage) -> None:
        """Close the prepared file; remove its tmp/ name if it has one."""
        if pending.fd >= 0:
            self.fs.close(pending.fd)
            pending.fd = -1
        if pending.tmp is not None:
            unlinkQuietly(self.fs, pending.tmp)
            pending.tmp = None

    def unpublish(self, pending: PendingMessage) -> bool:
        """Take a published message out of ``new/`` again (its delivery failed).

        True when a published file is gone now; False when there was none,
        or when it could not be removed (then it stays, as a duplicate of
        the retry: the queue's at-least-once).
        """
        if not pending.linked:
            return False
        try:
            self.fs.unlink(os.path.join(pending.maildir, "new", pending.name))
        except FileNotFoundError:
            pass
        except OSError:
            return False
        pending.linked = False
        return True


@dataclass
class PendingMessage:
    """A message written into a Maildir's tmp/ (perhaps unnamed), not yet delivered."""

    maildir: str
    fd: int
    tmp: str | None
    name: str
    size: int
    linked: bool = False


def makeMaildir(fs: FileSystem, path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        fs.makedirs(os.path.join(path, sub))


def sweepStaleTmp(maildir: str, now: float, age: float = STALE_TMP_AGE) -> int:
    """Unlink the regular files directly in the Maildir's ``tmp/`` whose
    mtime is more than ``age`` seconds before ``now``; the number unlinked.

    Blocking: call it from a worker thread. Subdirectories and symbolic
    links are left alone; a file that goes meanwhile (its writer, another
    sweep) and a missing ``tmp/`` are not errors; other OSErrors propagate.
    """
    limit = now - age
    swept = 0
    try:
        entries = os.scandir(os.path.join(maildir, "tmp"))
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime >= limit:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            swept += 1
    return swept


class StaleTmpSweeper:
    """``sweepStaleTmp`` at most once per ``interval`` per Maildir (thread-safe).

    The last sweep time of at most ``memory`` Maildirs is kept, the least
    recently swept forgotten first (which costs at most an early sweep).
    """

    def __init__(
        self,
        interval: float = SWEEP_INTERVAL,
        memory: int = SWEEP_MEMORY,
        age: float = STALE_TMP_AGE,
    ) -> None:
        self.interval = interval
        self.memory = memory
        self.age = age
        self._lock = threading.Lock()
        self._swept: dict[str, float] = {}  # oldest sweep first

    def due(self, maildir: str, now: float) -> bool:
        """Is a sweep of ``maildir`` due at ``now``? If so, it counts as done."""
        with self._lock:
            last = self._swept.get(maildir)
            if last is not None and last <= now < last + self.interval:
                return False
            self._swept.pop(maildir, None)
            self._swept[maildir] = now
            while len(self._swept) > self.memory:
                del self._swept[next(iter(self._swept))]
        return True

    def sweep(self, maildir: str, now: float) -> int:
        """Sweep ``maildir`` if due (blocking); the number of files unlinked."""
        if not self.due(maildir, now):
            return 0
        return sweepStaleTmp(maildir, now, self.age)
