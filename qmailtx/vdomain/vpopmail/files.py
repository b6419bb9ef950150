"""The file work of an import: reading the old tree's text files, placing new
files by link, and walking, counting and copying Maildirs. Blocking."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.vdomain.vpopmail.plan import MailStats


def readText(path: str) -> str:
    """A file's text: UTF-8, or Latin-1 when it is not valid UTF-8 (old gecos)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def problem(path: str, e: OSError) -> str:
    return f"{path}: {e.strerror or e}"


_MESSAGE_FOLDERS = ("cur", "new")


def _isMaildirFolder(relative: str) -> bool:
    """The Maildir itself ("") or one of its Maildir++ folders (``.Sent``)."""
    return relative == "" or ("/" not in relative and relative.startswith("."))


def _walkMaildir(source: str) -> Iterator[tuple[str, str, os.DirEntry[str]]]:
    """(relative path, kind, entry) of what is in a Maildir; parents come first.

    Kinds: ``dir``, ``message`` (a file in cur/ or new/ of the Maildir or a
    Maildir++ folder), ``file`` (anything else regular), ``skip`` (symbolic
    links, devices, sockets). The contents of tmp/ folders are not listed.
    """
    stack = [""]
    while stack:
        relative = stack.pop()
        with os.scandir(os.path.join(source, relative)) as it:
            entries = sorted(it, key=lambda e: e.name)
        inMessages = os.path.basename(relative) in _MESSAGE_FOLDERS and _isMaildirFolder(
            os.path.dirname(relative)
        )
        for entry in entries:
            path = os.path.join(relative, entry.name)
            if entry.is_symlink():
                yield path, "skip", entry
            elif entry.is_dir(follow_symlinks=False):
                yield path, "dir", entry
                if not (entry.name == "tmp" and _isMaildirFolder(relative)):
                    stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                yield path, "message" if inMessages else "file", entry
            else:
                yield path, "skip", entry


def countMail(source: str) -> MailStats:
    """The messages of a Maildir and their bytes, as copyMaildir counts them."""
    messages = size = 0
    for _, kind, entry in _walkMaildir(source):
        if kind == "message":
            messages += 1
            size += entry.stat(follow_symlinks=False).st_size
    return MailStats(messages, size)


@dataclass(frozen=True)
class MailCopy:
    """What happened to one user's mail."""

    address: str
    source: str | None
    destination: str
    messages: int = 0
    bytes: int = 0
    linked: int = 0
    copied: int = 0  # messages and other files
    present: int = 0  # already at the destination (an earlier run)
    skipped: tuple[str, ...] = ()  # symbolic links and special files left behind

    def asDict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "source": self.source,
            "destination": self.destination,
            "messages": self.messages,
            "bytes": self.bytes,
            "linked": self.linked,
            "copied": self.copied,
            "present": self.present,
            "skipped": list(self.skipped),
        }


_sequence = itertools.count(1)


def _temporaryName(folder: str) -> str:
    return os.path.join(folder, f".import-vpopmail.{os.getpid()}.{next(_sequence)}")


def placeFile(target: str, scratch: str, write: Callable[[str], object]) -> None:
    """Have ``write`` make the file under a scratch name in the folder
    ``scratch``, then link it into place (FileExistsError if the target
    appeared meanwhile); the scratch name is removed in any case."""
    temporary = _temporaryName(scratch)
    try:
        write(temporary)
        os.link(temporary, target)
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def _copyFile(source: str, target: str, scratch: str) -> None:
    """Copy with its times and mode (see placeFile)."""
    placeFile(
        target, scratch, lambda temporary: shutil.copy2(source, temporary, follow_symlinks=False)
    )


def copyMaildir(
    source: str, destination: str, address: str = "", linkOwner: int | None = None
) -> MailCopy:
    """Bring a Maildir over (see ``qmailtx.vdomain.vpopmail``); files already there stay.

    A message is hard-linked only when it is on the destination's file system
    and, if ``linkOwner`` is given, owned by that uid (a link keeps the old
    owner and mode: a 0600 file of vpopmail's account would be unreadable for
    the server's). Otherwise it is copied, as the running user.
    """
    makeMaildir(FileSystem(), destination)
    scratch = os.path.join(destination, "tmp")
    sameDevice = os.stat(source).st_dev == os.stat(destination).st_dev
    messages = size = linked = copied = present = 0
    skipped: list[str] = []
    for relative, kind, entry in _walkMaildir(source):
        target = os.path.join(destination, relative)
        if kind == "dir":
            os.makedirs(target, mode=0o700, exist_ok=True)
            continue
        if kind == "skip":
            skipped.append(entry.path)
            continue
        if kind == "message":
            messages += 1
            size += entry.stat(follow_symlinks=False).st_size
        if os.path.lexists(target):
            present += 1
            continue
        if (
            kind == "message"
            and sameDevice
            and (linkOwner is None or entry.stat(follow_symlinks=False).st_uid == linkOwner)
        ):
            try:
                os.link(entry.path, target)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    present += 1
                    continue
                sameDevice = e.errno != errno.EXDEV  # else EPERM and the like: this file
            else:
                linked += 1
                continue
        _copyFile(entry.path, target, scratch)
        copied += 1
    return MailCopy(
        address, source, destination, messages, size, linked, copied, present, tuple(skipped)
    )
