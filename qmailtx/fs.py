"""The few file-system calls the queue and Maildir writers make, in one seam.

Everything durable goes through a ``FileSystem`` so tests can record the
order of operations (write, fsync, link, fsync of the directory) or inject
faults (ENOSPC, EIO) without patching ``os``. Blocking: call only from a
worker thread.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

_O_TMPFILE = getattr(os, "O_TMPFILE", 0)


class FileSystem:
    """The real thing. ``anonymous=False`` turns off O_TMPFILE (see openAnonymous)."""

    def __init__(self, anonymous: bool = True) -> None:
        self._anonymous = anonymous and bool(_O_TMPFILE) and os.path.isdir("/proc/self/fd")
        self._procFds: int | None = None
        self._syncLock = threading.Lock()
        self._syncStates: dict[str, _DirectorySync] = {}

    def openExclusive(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def openAnonymous(self, directory: str, fallbackName: str) -> tuple[int, str | None]:
        """A new file that has no name until ``linkInto`` gives it one.

        On Linux this is O_TMPFILE: an unfinished file has no directory entry,
        so a crash leaves nothing behind and nothing can see it half-written.
        Where O_TMPFILE is missing, the file is created as ``fallbackName``
        (under ``directory``) and that name is returned for linking and removal.
        """
        if self._anonymous:
            try:
                fd = os.open(directory, _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                return fd, None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._anonymous = False
        path = os.path.join(directory, fallbackName)
        return self.openExclusive(path), path

    def linkInto(self, fd: int, name: str | None, target: str) -> None:
        """Give the file from openAnonymous its final name (EEXIST if taken)."""
        if name is None:
            # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the unnamed
            # inode. Python calls plain link() unless a dir fd is given, and
            # link() does not follow the magic link: hence the dir fd.
            if self._procFds is None:
                self._procFds = os.open(
                    "/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )
            os.link(str(fd), target, src_dir_fd=self._procFds, follow_symlinks=True)
        else:
            os.link(name, target)

    def openRead(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def openUpdate(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def write(self, fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError("short pwrite")

    def copyRange(self, src: int, dst: int, offset: int, length: int) -> None:
        """Copy ``length`` bytes from ``src`` at ``offset`` to the end of ``dst``."""
        remaining = length
        try:
            while remaining > 0:
                n = os.copy_file_range(src, dst, remaining, offset)
                if n == 0:
                    raise OSError("source file shorter than expected")
                offset += n
                remaining -= n
            return
        except OSError as e:
            # EXDEV, ENOSYS, EINVAL...: fall back to plain reads and writes
            # for what is left. Real I/O errors will show up again below.
            if e.errno is None:
                raise
        while remaining > 0:
            chunk = os.pread(src, min(remaining, 1 << 20), offset)
            if not chunk:
                raise OSError("source file shorter than expected")
            self.write(dst, chunk)
            offset += len(chunk)
            remaining -= len(chunk)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def syncDirectory(self, path: str) -> None:
        """Make the entries linked into ``path`` so far durable (group commit).

        Threads that link into the same directory at the same time share one
        fsync of it: each waits for an fsync that began after its own link,
        starting one itself when none is running. Under load this turns one
        directory fsync per message into one per batch.
        """
        with self._syncLock:
            state = self._syncStates.get(path)
            if state is None:
                state = self._syncStates[path] = _DirectorySync()
        state.sync(lambda: self.fsyncDirectory(path))

    def fsyncDirectory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def utime(self, path: str, when: float) -> None:
        os.utime(path, (when, when))

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)

    def readAt(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size


def unlinkQuietly(fs: FileSystem, path: str) -> None:
    try:
        fs.unlink(path)
    except OSError:
        pass


class _DirectorySync:
    """Group commit for one directory's fsync.

    ``requested`` counts callers (each took its ticket after its link);
    ``done`` is the highest ticket covered by a finished fsync, that is one
    that started after that ticket was taken.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False

    def sync(self, fsync: Callable[[], None]) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covers = self._requested
                self._cond.release()
                try:
                    fsync()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                # Only reached when fsync succeeded; after a failure each
                # waiter runs (and fails) its own.
                self._done = max(self._done, covers)
