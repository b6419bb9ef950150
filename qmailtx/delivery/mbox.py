"""mbox delivery for .qmail file lines, as qmail-local's mailfile() does it.

Append under ``flock``: the ``From `` line (UFLINE), the Return-Path and
Delivered-To lines, the message with every line matching ``^>*From `` given
one more ``>`` (qmail's gfrom, i.e. mboxrd quoting), a newline if the
message lacked its last one, and an empty line; then fsync. If anything
fails after the lock was taken, the file is truncated back to its length
before the delivery. Blocking: call only from a worker thread.

Where qmail differs, and why:

* a lock that cannot be had for ``lockTimeout`` seconds fails the delivery
  (qmail: a 30 s alarm). If ``flock`` itself is refused (ENOLCK on a broken
  NFS, ...), qmail-local delivers unlocked and then never truncates, since
  the end of the file may be someone else's append: so do we;
* files that are not regular (``/dev/null`` as a bit bucket) are neither
  fsync'd nor truncated; qmail fails on the fsync (EINVAL) instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable

CHUNK = 64 * 1024
LOCK_TIMEOUT = 30.0
_FROM = b"From "
_GT = ord(">")
# qmail's open_append, O_NDELAY included: a FIFO without a reader fails, not hangs.
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class MboxError(OSError):
    """An mbox delivery that failed (always temporary); ``text`` is qmail-local's report.

    Still an OSError, with the errno and strerror of the cause.
    """

    text: str


def _failure(cause: OSError, text: str) -> MboxError:
    error = MboxError(cause.errno, cause.strerror or str(cause))
    error.text = text
    return error


class FromQuoter:
    """mboxrd quoting of a stream fed in pieces: ``>*From `` at a line start gets a ``>``.

    The decision at a line start needs at most the ``>`` run (passed on at
    once, since one more ``>`` anywhere in that run is the same) and 5 more
    bytes, so memory stays bounded whatever the line lengths.
    """

    def __init__(self) -> None:
        self._atLineStart = True
        self._head = b""  # a proper prefix of b"From " after the ">" run

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end:
            if not self._atLineStart:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    out.append(data[pos:])
                    break
                out.append(data[pos : newline + 1])
                pos = newline + 1
                self._atLineStart = True
                continue
            if not self._head:
                run = pos
                while run < end and data[run] == _GT:
                    run += 1
                out.append(data[pos:run])
                pos = run
                if pos == end:
                    break
            piece = data[pos : pos + 5 - len(self._head)]
            candidate = self._head + piece
            if not _FROM.startswith(candidate):
                out.append(self._head)  # pos stays: the line goes on from here
                self._head = b""
                self._atLineStart = False
            elif len(candidate) == len(_FROM):
                out.append(b">" + candidate)
                pos += len(piece)
                self._head = b""
                self._atLineStart = False
            else:
                self._head = candidate
                pos += len(piece)
        return b"".join(out)

    def finish(self) -> bytes:
        """What is held back at the end of the message (a lone ``Fro``, say)."""
        head, self._head = self._head, b""
        return head


def _lock(fd: int, timeout: float, sleep: Callable[[float], None]) -> bool:
    """Take an exclusive flock, polling up to ``timeout`` seconds.

    True when locked, False when flock is not available for this file
    (delivered unlocked, as qmail); raises OSError(EAGAIN) on timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                return False
        now = time.monotonic()
        if now >= deadline:
            raise OSError(errno.EAGAIN, f"File has been locked for {timeout:g} seconds straight")
        sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.5)


def _writeAll(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copyQuoted(fd: int, sourceFd: int, offset: int, length: int) -> None:
    quoter = FromQuoter()
    remaining = length
    last = b"\n"
    while remaining > 0:
        try:
            chunk = os.pread(sourceFd, min(remaining, CHUNK), offset)
        except OSError as e:
            raise _failure(e, f"Unable to read message: {e.strerror}. (#4.3.0)") from e
        if not chunk:
            short = OSError(errno.EIO, "message shorter than expected")
            raise _failure(short, "Unable to read message: message shorter than expected. (#4.3.0)")
        offset += len(chunk)
        remaining -= len(chunk)
        last = chunk[-1:]
        _writeAll(fd, quoter.feed(chunk))
    tail = quoter.finish()
    if last != b"\n":
        tail += b"\n"
    _writeAll(fd, tail + b"\n")


def appendMbox(
    path: str,
    fromLine: bytes,
    prefix: bytes,
    sourceFd: int,
    offset: int,
    length: int,
    lockTimeout: float = LOCK_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Append ``length`` bytes of ``sourceFd`` at ``offset`` to the mbox at ``path``.

    ``fromLine`` is the ``From `` line (UFLINE, see ``dotqmail.ufLine``; a
    missing newline is added), ``prefix`` the Return-Path and Delivered-To
    lines. The message has LF line ends. The file is created 0600 if
    missing; a relative ``path`` is relative to the process, so join it to
    the home directory first. ``sourceFd`` is read with pread (its offset is
    left alone). Raises MboxError (an OSError; temporary) with qmail's text.
    """
    if not fromLine.endswith(b"\n"):
        fromLine += b"\n"
    try:
        fd = os.open(path, _APPEND, 0o600)
    except OSError as e:
        raise _failure(e, f"Unable to open {path}: {e.strerror}. (#4.2.1)") from e
    try:
        try:
            locked = _lock(fd, lockTimeout, sleep)
            st = os.fstat(fd)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                text = f"File has been locked for {lockTimeout:g} seconds straight. (#4.3.0)"
            else:
                text = f"Unable to lock {path}: {e.strerror}. (#4.3.0)"
            raise _failure(e, text) from e
        regular = stat.S_ISREG(st.st_mode)
        size = st.st_size
        try:
            _writeAll(fd, fromLine + prefix)
            _copyQuoted(fd, sourceFd, offset, length)
            if regular:
                os.fsync(fd)
        except BaseException as e:
            if locked and regular:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass  # the original error says more
            if isinstance(e, OSError) and not isinstance(e, MboxError):
                raise _failure(e, f"Unable to write {path}: {e.strerror}. (#4.3.0)") from e
            raise
    finally:
        os.close(fd)  # and with it the lock
