"""A POP3 mailbox over a Maildir: the login snapshot, message bytes, the UPDATE state.

Everything here is plain synchronous code: ``scanMaildir`` and ``commit``
run in the worker threads; ``MessageStream`` reads one message file in
chunks for the protocol's producer.

- The snapshot is taken at login: the files of ``new/`` and ``cur/`` (dot
  files skipped), oldest first (mtime, then name), as qmail-pop3d.
- A message's UID is its Maildir base name (the file name up to ``:``),
  as qmail-pop3d and courier: stable across sessions and flag changes.
  A name that is not a valid RFC 1939 UID (printable ASCII, at most 70
  characters) is replaced by the MD5 of the name.
- Sizes are the octets RETR sends, without dot-stuffing (as RFC 1939
  servers count them): line ends become CRLF (a CRLF stays one), and a
  last line without a line end gets one. They come from one read of the
  file, remembered in a ``SizeCache`` keyed by (UID, file size, mtime).
- ``commit`` is the UPDATE state: deleted messages leave ``new/`` and
  ``cur/`` by a rename into the Maildir's ``tmp/`` (as
  ``qmailtx-deleted.<name>``; one that is already gone counts as deleted),
  retrieved ones move from ``new/`` to ``cur/`` with the ``S`` (seen) flag,
  and one ``-bytes -count`` line for all the deletions goes to
  ``maildirsize`` when the Maildir has a quota. The QUIT is answered then;
  ``purge`` unlinks the renamed files afterwards. On this kind of disk an
  unlink that frees blocks costs several times a rename (ext4 mounted with
  ``discard`` trims at every one), and the client need not wait for it:
  Cyrus's delayed expunge does the same. Files left in ``tmp/`` by a crash
  before the purge are swept by ``sweepTrash`` at the next login; no
  Maildir reader looks into ``tmp/``, and the quota never counts it. The
  same sweep removes other files of ``tmp/`` older than 36 hours (a killed
  writer's), at most once an hour per Maildir (``StaleTmpSweeper``).

Several sessions may serve one Maildir at once (qmail-pop3d and Dovecot
do): nothing is locked; a message that another session deleted or renamed
is looked up again by UID and, when gone, answered with -ERR.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from qmailtx.delivery.local import maildirsizeLimit
from qmailtx.delivery.maildir import StaleTmpSweeper
from qmailtx.delivery.quota import MaildirQuota, quotaRoot, sizeFromName
from qmailtx.vdomain.records import QuotaLimit

TRASH_PREFIX = "qmailtx-deleted."  # deleted messages in tmp/, unlinked after the QUIT

_READ = os.O_RDONLY | os.O_CLOEXEC

READ_CHUNK = 256 * 1024
SMALL_MESSAGE = 256 * 1024  # converted in one piece
LONG_LINE = 64 * 1024  # a line longer than this is sent in pieces


@dataclass(eq=False, slots=True)
class Message:
    """One message of the snapshot."""

    subdir: str  # "new" or "cur"
    name: str  # the file name in subdir
    uid: str
    size: int  # octets as RETR sends them, before dot-stuffing
    fileSize: int  # octets on disk (the quota counts these)
    deleted: bool = False
    retrieved: bool = False

    def path(self, maildir: str) -> str:
        return os.path.join(maildir, self.subdir, self.name)


class SizeCache:
    """CRLF sizes already counted, shared by all sessions (bounded, LRU)."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._sizes: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> int | None:
        with self._lock:
            size = self._sizes.get(key)
            if size is not None:
                self._sizes.move_to_end(key)
            return size

    def put(self, key: tuple[str, int, int], size: int) -> None:
        with self._lock:
            self._sizes[key] = size
            while len(self._sizes) > self.limit:
                self._sizes.popitem(last=False)


def baseName(name: str) -> str:
    return name.split(":", 1)[0]


def uidOf(name: str) -> str:
    base = baseName(name)
    # RFC 1939's 0x21-0x7E: printable ASCII without the space.
    if 0 < len(base) <= 70 and base.isascii() and base.isprintable() and " " not in base:
        return base
    return hashlib.md5(base.encode("utf-8", "surrogateescape")).hexdigest()  # noqa: S324 (a name, not a secret)


def _sentSizeOf(data: bytes, last: bytes) -> int:
    """``sentSize`` of a whole file's bytes (``last`` is its last byte)."""
    ending = 2 if last not in (b"", b"\n") else 0  # a last line without its line end gets one
    return len(data) - data.count(b"\r\n") + data.count(b"\n") + ending


def sentSize(f: BinaryIO) -> int:
    """The octets ``MessageStream`` sends for the file's bytes, without dot-stuffing."""
    total = crlf = lf = 0
    previous = b""
    last = b""
    while chunk := f.read(READ_CHUNK):
        total += len(chunk)
        lf += chunk.count(b"\n")
        crlf += chunk.count(b"\r\n")
        if previous == b"\r" and chunk[:1] == b"\n":
            crlf += 1
        previous = last = chunk[-1:]
    return total - crlf + lf + (2 if last not in (b"", b"\n") else 0)


def _scanOne(uid: str, path: str, cache: SizeCache | None) -> tuple[int, int, int] | None:
    """(mtime, CRLF size, file size) of one file; None when it is gone.
    Plain file descriptors: a login reads every message once, and a buffered
    file object costs more than the read of a small message."""
    try:
        fd = os.open(path, _READ)
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        key = (uid, st.st_size, st.st_mtime_ns)
        size = cache.get(key) if cache is not None else None
        if size is None:
            data = os.read(fd, st.st_size + 1) if st.st_size < READ_CHUNK else b""
            if data and len(data) <= st.st_size:
                size = _sentSizeOf(data, data[-1:])
            else:  # big, or grown since the fstat: count it in chunks
                os.lseek(fd, 0, os.SEEK_SET)
                with os.fdopen(os.dup(fd), "rb") as f:
                    size = sentSize(f)
            if cache is not None:
                cache.put(key, size)
    except IsADirectoryError:
        return None
    finally:
        os.close(fd)
    return st.st_mtime_ns, size, st.st_size


def scanMaildir(maildir: str, cache: SizeCache | None = None) -> list[Message]:
    """The snapshot of ``new/`` and ``cur/`` (blocking). A file that vanishes
    during the scan is left out. Raises OSError when the Maildir is unusable."""
    found: list[tuple[int, str, Message]] = []
    seen: set[str] = set()
    for subdir in ("new", "cur"):
        folder = os.path.join(maildir, subdir)
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if not e.name.startswith(".")]
        prefix = folder + os.sep
        for name in names:
            uid = uidOf(name)
            if uid in seen:
                continue
            info = _scanOne(uid, prefix + name, cache)
            if info is None:
                continue
            seen.add(uid)
            mtime, size, fileSize = info
            found.append((mtime, name, Message(subdir, name, uid, size, fileSize)))
    found.sort(key=lambda t: (t[0], t[1]))
    return [m for _, _, m in found]


def locate(maildir: str, message: Message) -> str | None:
    """The message's current path, following a rename by another session
    (new/ to cur/, or changed flags); None when it is gone."""
    path = message.path(maildir)
    if os.path.exists(path):
        return path
    base = baseName(message.name)
    for subdir in ("cur", "new"):
        try:
            names = os.listdir(os.path.join(maildir, subdir))
        except OSError:
            continue
        for name in names:
            if name == base or name.startswith(base + ":"):
                message.subdir, message.name = subdir, name
                return os.path.join(maildir, subdir, name)
    return None


def _openFd(maildir: str, message: Message) -> int | None:
    """A read descriptor of the message file, or None when it is gone."""
    try:
        return os.open(message.path(maildir), _READ)  # where the snapshot saw it
    except FileNotFoundError:
        pass
    for _ in range(3):  # renamed between locate and open: look again
        path = locate(maildir, message)
        if path is None:
            return None
        try:
            return os.open(path, _READ)
        except FileNotFoundError:
            continue
    return None


def openMessage(maildir: str, message: Message) -> BinaryIO | None:
    """The message file opened for reading, or None when it is gone."""
    fd = _openFd(maildir, message)
    return None if fd is None else os.fdopen(fd, "rb")


def readSmall(maildir: str, message: Message, limit: int) -> bytes | None:
    """The whole message when it has at most ``limit`` bytes; more than
    ``limit`` bytes when it is bigger (stream it instead); None when it is
    gone. Plain descriptor calls and a read of the file's own size: the
    common RETR of a small message costs a few microseconds this way, where
    a buffered file and a read of ``limit`` bytes cost several times that."""
    fd = _openFd(maildir, message)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        return os.read(fd, min(size, limit) + 1)
    finally:
        os.close(fd)


class _Converter:
    """File bytes to POP3 bytes: CRLF line ends and dot-stuffing, chunk by chunk."""

    def __init__(self) -> None:
        self.carry = b""
        self.atLineStart = True

    def feed(self, data: bytes) -> bytes:
        if self.carry:
            data = self.carry + data
        nl = data.rfind(b"\n")
        if nl < 0:
            if len(data) <= LONG_LINE:
                self.carry = data
                return b""
            # A very long line: send it in pieces, keeping a last CR back in
            # case an LF follows.
            keep = 1 if data.endswith(b"\r") else 0
            part, self.carry = data[: len(data) - keep], data[len(data) - keep :]
            if self.atLineStart and part.startswith(b"."):
                part = b"." + part
            self.atLineStart = False
            return part
        whole, self.carry = data[: nl + 1], data[nl + 1 :]
        out = whole.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").replace(b"\n.", b"\n..")
        if self.atLineStart and out.startswith(b"."):
            out = b"." + out
        self.atLineStart = True
        return out

    def finish(self) -> bytes:
        """The rest, with the line end a last line lacks, and the terminating dot."""
        rest, self.carry = self.carry, b""
        if not rest:
            return b".\r\n"
        if self.atLineStart and rest.startswith(b"."):
            rest = b"." + rest
        return rest + b"\r\n.\r\n"


def convertAll(data: bytes) -> bytes:
    """A whole message as RETR sends it, terminating dot included."""
    if data.endswith(b"\n") and b"\r" not in data and b"\n." not in data and data[:1] != b".":
        # The common case (LF line ends, nothing to dot-stuff): what the
        # converter gives, in one pass.
        return data.replace(b"\n", b"\r\n") + b".\r\n"
    converter = _Converter()
    return converter.feed(data) + converter.finish()


class MessageStream:
    """RETR (``lines`` None) or TOP (``lines`` body lines after the header) of
    one open message file; ``read()`` gives the next piece, b"" at the end.
    The terminating ``.\\r\\n`` is part of the last piece."""

    def __init__(self, f: BinaryIO, lines: int | None = None) -> None:
        self._file = f
        self._lines = lines
        self._converter = _Converter()
        self._done = False
        self._inHeader = True
        self._bodyLines = 0
        self._sourceAtLineStart = True

    @property
    def done(self) -> bool:
        return self._done

    def close(self) -> None:
        self._done = True
        self._file.close()

    def read(self) -> bytes:
        if self._done:
            return b""
        if self._lines is None:
            chunk = self._file.read(READ_CHUNK)
            if chunk:
                out = self._converter.feed(chunk)
                if len(chunk) == READ_CHUNK:
                    return out
                # A short read: most likely the end; check without a second piece.
                more = self._file.read(READ_CHUNK)
                if more:
                    return out + self._converter.feed(more)
                return out + self._end()
            return self._end()
        return self._readTop()

    def _end(self) -> bytes:
        tail = self._converter.finish()
        self.close()
        return tail

    def _readTop(self) -> bytes:
        assert self._lines is not None
        out: list[bytes] = []
        size = 0
        while size < READ_CHUNK:
            if not self._inHeader and self._sourceAtLineStart and self._bodyLines >= self._lines:
                out.append(self._end())
                return b"".join(out)
            piece = self._file.readline(LONG_LINE)
            if not piece:
                out.append(self._end())
                return b"".join(out)
            ends = piece.endswith(b"\n")
            if self._inHeader:
                if self._sourceAtLineStart and piece in (b"\n", b"\r\n"):
                    self._inHeader = False
            elif ends:
                self._bodyLines += 1
            self._sourceAtLineStart = ends
            converted = self._converter.feed(piece)
            out.append(converted)
            size += len(converted)
        return b"".join(out)


@dataclass
class UpdateResult:
    deleted: int = 0  # messages removed from the mailbox by this session
    deletedBytes: int = 0
    vanished: int = 0  # already gone (another session)
    failed: list[str] = field(default_factory=list)  # could not be removed
    seen: int = 0  # moved to cur/ or marked seen
    trash: list[str] = field(default_factory=list)  # renamed into tmp/: for ``purge``


def _withSeenFlag(name: str) -> str:
    base, sep, info = name.partition(":")
    if not sep or not info.startswith("2,"):
        return base + ":2,S"
    flags = info[2:]
    if "S" in flags:
        return name
    return f"{base}:2,{''.join(sorted(flags + 'S'))}"


def _trashPath(maildir: str, message: Message) -> str:
    return os.path.join(maildir, "tmp", TRASH_PREFIX + message.name)


def _discard(maildir: str, message: Message) -> tuple[str, str | None]:
    """Take a deleted message out of the mailbox: ("deleted", its path in
    tmp/), ("deleted", None) when it had to be unlinked at once, ("vanished",
    None) or ("failed", None). The path of the snapshot is tried first; a
    rename by another session is looked up only when it is not there."""
    path: str | None = message.path(maildir)
    for _ in range(2):
        assert path is not None
        trash = _trashPath(maildir, message)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            if os.path.lexists(path):  # no tmp/: the message itself is there
                return _unlink(path), None
            path = locate(maildir, message)
            if path is None:
                return "vanished", None
            continue
        except OSError:
            return _unlink(path), None
        return "deleted", trash
    return "vanished", None


def _unlink(path: str) -> str:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return "vanished"
    except OSError:
        return "failed"
    return "deleted"


def purge(paths: list[str]) -> int:
    """Unlink deleted messages that ``commit`` renamed into tmp/ (blocking);
    the number unlinked (one already gone, e.g. swept by another session,
    is not an error)."""
    done = 0
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        done += 1
    return done


def sweepTrash(
    maildir: str, now: float | None = None, sweeper: StaleTmpSweeper | None = None
) -> int:
    """Unlink what a session that ended before its ``purge`` (a crash, a
    stop) left in tmp/ (blocking); the number unlinked.

    Given ``now``, stale files of tmp/ go too (``sweeper.sweep``: 36 hours
    old, at most once an hour per Maildir; a fresh sweeper without one).
    """
    folder = os.path.join(maildir, "tmp")
    try:
        with os.scandir(folder) as entries:
            names = [e.path for e in entries if e.name.startswith(TRASH_PREFIX)]
    except FileNotFoundError:
        return 0
    swept = purge(names)
    if now is not None:
        swept += (sweeper or StaleTmpSweeper()).sweep(maildir, now)
    return swept


def commit(
    maildir: str,
    messages: list[Message],
    quotaLimit: Callable[[], QuotaLimit | None] | None = None,
) -> UpdateResult:
    """The UPDATE state (blocking): take the deleted messages out of the
    mailbox (into tmp/, see ``purge``), mark the retrieved ones seen, and
    record the freed space in maildirsize."""
    result = UpdateResult()
    for message in messages:
        if not message.deleted:
            continue
        outcome, trash = _discard(maildir, message)
        if outcome == "vanished":
            result.vanished += 1
        elif outcome == "failed":
            result.failed.append(message.uid)
        else:
            result.deleted += 1
            size = sizeFromName(message.name)
            result.deletedBytes += size if size is not None else message.fileSize
            if trash is not None:
                result.trash.append(trash)
    for message in messages:
        if message.retrieved and not message.deleted:
            path = locate(maildir, message)
            if path is None:
                continue
            target = os.path.join(maildir, "cur", _withSeenFlag(message.name))
            if target != path:
                try:
                    os.rename(path, target)
                except OSError:
                    continue
            result.seen += 1
    if result.deleted:
        _recordDeletions(maildir, result, quotaLimit)
    return result


def _recordDeletions(
    maildir: str, result: UpdateResult, quotaLimit: Callable[[], QuotaLimit | None] | None
) -> None:
    root = quotaRoot(maildir)
    limit = quotaLimit() if quotaLimit is not None else None
    if limit is None or limit.unlimited:
        limit = maildirsizeLimit(root)
    if limit is None or not os.path.exists(os.path.join(root, "maildirsize")):
        return  # no quota: nothing to record (a later delivery recounts anyway)
    quota = MaildirQuota(root, limit)
    with quota.locked():
        quota.add(-result.deletedBytes, -result.deleted)
