"""What every qmailctl handler gets and returns, and the exit codes.

A handler takes a ``Context`` (configuration, standard streams, the user
database opened on first use) and the parsed arguments, and returns a
``Result`` (lines for people, a JSON value) or raises ``CommandError``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from qmailtx.config import Config
from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.sqlite import SQLiteUserStore

PROG = "qmailctl"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMPORARY = 111


class CommandError(Exception):
    """A refused request; the message is shown as ``qmailctl: <message>``."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Result:
    """What a command reports: lines for people, a JSON value for --json."""

    lines: list[str]
    data: Any
    code: int = EXIT_OK


def changed(lines: list[str], **fields: Any) -> Result:
    """The result of a change: ``{"ok": true, ...fields}`` for --json."""
    return Result(lines, {"ok": True, **fields})


@dataclass
class Context:
    config: Config
    stdin: TextIO
    stderr: TextIO
    warnings: list[str] = field(default_factory=list)
    _store: SQLiteUserStore | None = None

    @property
    def data(self) -> str:
        return self.config.paths.data

    @property
    def store(self) -> IUserStore:
        if self._store is None:
            self._store = SQLiteUserStore(self.config.users.database)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
            database = self.config.users.database
            files = [database + suffix for suffix in ("", "-wal", "-shm")]
            try:
                giveToServer(self.data, files)
            except OSError as e:
                self.warn(f"cannot hand {database} to the server's account: {e.strerror or e}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.stderr.write(f"{PROG}: {text}\n")


Handler = Callable[[Context, argparse.Namespace], Result]


def _serverAccount(data: str) -> tuple[int, int] | None:
    """Run as root: the owner of the data folder (the server's account) unless
    that is root too; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(data)
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def giveToServer(data: str, paths: list[str], tree: str | None = None) -> None:
    """Hand what root made (``paths``, and ``tree`` with everything in it) to
    the data folder's owner, as vpopmail chowns to vpopmail:vchkpw: the
    server, running as that account, must write there. Only root's files change."""
    account = _serverAccount(data)
    if account is None:
        return
    everything = list(paths)
    if tree is not None:
        everything.append(tree)
        for folder, subfolders, files in os.walk(tree):
            everything.extend(os.path.join(folder, name) for name in subfolders + files)
    for path in everything:
        try:
            if os.lstat(path).st_uid == 0:
                os.chown(path, *account, follow_symlinks=False)
        except FileNotFoundError:
            continue
