"""Deleting a mailbox without deleting mail that is being delivered into it.

Every delivery into a user's Maildir holds a shared ``flock`` on the user's
folder while it writes, and checks, once it holds the lock, that the path
still names the folder it opened. ``retireFolder`` takes the lock
exclusively (so it waits for deliveries in progress), renames the folder
out of the way, and lets go: a delivery that opened the folder earlier
finds it gone and fails temporarily, and its retry finds no user and
bounces. No message ever vanishes into a deleted folder.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def holdFolder(path: str) -> Iterator[None]:
    """Hold ``path`` (a folder) against retirement; FileNotFoundError if it is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        opened = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise FileNotFoundError(2, "mailbox folder was deleted", path)
        yield
    finally:
        os.close(fd)  # releases the lock


_serial = itertools.count(1)


def retireFolder(path: str, trash: str, keep: bool = False) -> str:
    """Move ``path`` into the ``trash`` folder once no delivery writes into it,
    then delete it (unless ``keep``). Returns where it went."""
    os.makedirs(trash, exist_ok=True)
    stamp = f"{int(time.time())}.{os.getpid()}.{next(_serial)}"
    target = os.path.join(trash, f"{os.path.basename(path)}.{stamp}")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path, target)
    finally:
        os.close(fd)
    if not keep:
        shutil.rmtree(target, ignore_errors=True)
    return target
