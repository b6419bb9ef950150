"""The few file-system calls the queue and Maildir writers make, in one seam.

Everything durable goes through a ``FileSystem`` so tests can record the
order of operations (write, fsync, link, fsync of the directory) or inject
faults (ENOSPC, EIO) without patching ``os``. Blocking: call only from a
worker thread.
"""

from __future__ import annotations

import os


class FileSystem:
    def openExclusive(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

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
