"""Maildir delivery (maildir(5)): tmp/, fsync, link into new/, fsync new/.

File names follow the modern uniqueness rule that Courier and Dovecot use:
``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>``, where S is the size of the file
as written (Maildir++ quota and Dovecot read it).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable

from qmailtx.fs import FileSystem, unlinkQuietly

_counter = itertools.count(1)
_lock = threading.Lock()


def maildirHostName(name: str | None = None) -> str:
    host = name or socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


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
        size = len(prefix) + length
        tmpDir = os.path.join(maildir, "tmp")
        newDir = os.path.join(maildir, "new")
        for _ in range(3):
            name = self.uniqueName(size)
            try:
                fd, tmp = self.fs.openAnonymous(tmpDir, name)
                break
            except FileExistsError:
                continue
        else:
            raise OSError("could not find a unique Maildir name")
        linked = None
        try:
            self.fs.write(fd, prefix)
            self.fs.copyRange(sourceFd, fd, offset, length)
            self.fs.fsync(fd)
            for _ in range(3):
                try:
                    self.fs.linkInto(fd, tmp, os.path.join(newDir, name))
                    linked = os.path.join(newDir, name)
                    break
                except FileExistsError:
                    name = self.uniqueName(size)
            else:
                raise OSError("could not find a unique Maildir name")
            self.fs.syncDirectory(newDir)
        except BaseException:
            if linked is not None:
                unlinkQuietly(self.fs, linked)
            raise
        finally:
            self.fs.close(fd)
            if tmp is not None:
                unlinkQuietly(self.fs, tmp)
        return name


def makeMaildir(fs: FileSystem, path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        fs.makedirs(os.path.join(path, sub))
