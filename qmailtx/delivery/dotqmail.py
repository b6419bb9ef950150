""".qmail files as qmail-local reads them: lookup, parsing, and the program environment.

Followed from netqmail's qmail-local.c (with the P22 tab fix) and dot-qmail(5):

* Each line loses trailing spaces and tabs (never more than the line). An
  empty line is skipped, except that a blank first line is a temporary
  failure. The first character picks the type: ``#`` comment, ``|`` program
  (the rest of the line, verbatim, is the ``sh -c`` command), ``/`` or ``.``
  a file (Maildir if it ends in ``/``, else mbox), ``&`` a forward to the
  rest of the line, and ``+list`` makes the lines after it forward-only.
  Other ``+`` lines are ignored. Every other line (a letter, a digit, or
  anything else qmail-local does not know) is a forward of the whole line.
  Forward addresses are not checked here: qmail hands them to qmail-queue
  as they are, and the caller parses them.
* A .qmail with the execute bit (or the lines after ``+list``) may hold only
  forwards. qmail-local notices a file or program line only when it reaches
  it, after the lines before it were delivered; ``parseDotQmail`` refuses the
  whole file up front instead, so a retry cannot deliver those lines twice.
* Deliveries happen in file order; forwards are collected and sent after all
  other lines. A program exiting 99 stops the processing of later lines, but
  forwards collected before it are still sent. That ordering is the caller's.
* An empty .qmail (0 bytes), or a missing one for the bare user address,
  means the default delivery (qmail's ``aliasempty``).

Files are decoded with ``os.fsdecode`` (UTF-8 with surrogateescape), so paths
and commands turn back into the very bytes the file held when they reach
``os`` or ``spawnProcess``.
"""

from __future__ import annotations

import errno
import os
import stat
import string
import time
from dataclasses import dataclass

from qmailtx.delivery.interfaces import DeliveryResult, permanent, temporary

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

BLANK_FIRST_LINE = "Uh-oh: first line of .qmail file is blank. (#4.2.1)"
FILE_IN_FORWARD_ONLY = "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)"
PROGRAM_IN_FORWARD_ONLY = "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)"
DOTQMAIL_WRITABLE = "Uh-oh: .qmail file is writable. (#4.7.0)"
DOTQMAIL_NUL = "Uh-oh: .qmail file contains a NUL byte. (#4.7.0)"
HOME_WRITABLE = "Uh-oh: home directory is writable. (#4.7.0)"
HOME_STICKY = "Home directory is sticky: user is editing his .qmail file. (#4.2.1)"

# The spec (2.5) reads qmail's conf-patrn as group- or world-writable.
_WRITABLE = stat.S_IWGRP | stat.S_IWOTH
# A missing file; anything else (EACCES, EIO, ...) is a temporary failure.
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


class DotQmailError(Exception):
    """A .qmail problem, with qmail-local's report text (all of its are temporary)."""

    def __init__(self, text: str, temporary: bool = True) -> None:
        super().__init__(text)
        self.text = text
        self.temporary = temporary

    def asResult(self) -> DeliveryResult:
        return temporary(self.text) if self.temporary else permanent(self.text)


@dataclass(frozen=True)
class Program:
    """``|command``: the text after the bar, given to ``/bin/sh -c`` as it is."""

    command: str


@dataclass(frozen=True)
class Forward:
    """``&address`` or a line starting with anything unknown: the address, unchecked."""

    address: str


@dataclass(frozen=True)
class MaildirLine:
    """A ``/`` or ``.`` line ending in ``/``; relative to the home directory."""

    path: str


@dataclass(frozen=True)
class MboxLine:
    """A ``/`` or ``.`` line not ending in ``/``; relative to the home directory."""

    path: str


Instruction = Program | Forward | MaildirLine | MboxLine


def parseDotQmail(text: str, forwardOnly: bool = False) -> list[Instruction]:
    """The instructions of a .qmail file, in file order (see the module docstring).

    ``forwardOnly`` is set for a file with the execute bit. An empty ``text``
    is one blank line, as in qmail-local, so it fails: substitute the default
    delivery for an empty file first (``readDotQmail`` does).
    Raises DotQmailError (temporary).
    """
    if "\0" in text:
        raise DotQmailError(DOTQMAIL_NUL)
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    result: list[Instruction] = []
    for index, raw in enumerate(lines):
        line = raw.rstrip(" \t")
        if not line:
            if index == 0:
                raise DotQmailError(BLANK_FIRST_LINE)
            continue
        first = line[0]
        if first == "#":
            continue
        if first in "./":
            if forwardOnly:
                raise DotQmailError(FILE_IN_FORWARD_ONLY)
            result.append(MaildirLine(line) if line.endswith("/") else MboxLine(line))
        elif first == "|":
            if forwardOnly:
                raise DotQmailError(PROGRAM_IN_FORWARD_ONLY)
            result.append(Program(line[1:]))
        elif first == "+":
            if line == "+list":
                forwardOnly = True
        elif first == "&":
            result.append(Forward(line[1:]))
        else:
            result.append(Forward(line))
    return result


_SAFE = str.maketrans(string.ascii_uppercase + ".", string.ascii_lowercase + ":")


def safeExtension(ext: str) -> str:
    """The extension as in .qmail file names: ASCII lower case, dots as colons.

    Same length as ``ext``, so a position in one is a position in the other.
    """
    return ext.translate(_SAFE)


def _isRegularFile(path: str) -> bool:
    """qmail-local's qmeexists: a regular file (symlinks followed), else absent."""
    try:
        st = os.stat(path)
    except ValueError:
        return False  # an embedded NUL: no such name
    except OSError as e:
        if e.errno in _ABSENT:
            return False
        raise DotQmailError(f"Unable to open {path}: {e.strerror}. (#4.3.0)") from e
    return stat.S_ISREG(st.st_mode)


def _candidate(folder: str, name: str) -> str | None:
    if "/" in name or "\0" in name:
        return None  # an extension may not reach outside the folder
    return os.path.join(folder, name)


def findDotQmail(folder: str, ext: str, dash: str = "-") -> tuple[str, str | None] | None:
    """qmail-local's qmesearch: the .qmail file for ``ext`` in ``folder``.

    With ``dash == ""`` (the bare user) only ``.qmail`` is tried. Otherwise,
    for ext ``a-b``: ``.qmail-a-b``, ``.qmail-a-default``, ``.qmail-default``
    (ext lower-cased, dots turned into colons; an ext ending in ``-`` also
    tries ``.qmail-<ext>default``). Returns ``(path, default)`` where
    ``default`` is $DEFAULT, the part of the original ext a ``default`` stood
    for (``None`` when no ``default`` name matched), or None when no regular
    file exists (qmail bounces then, except for the bare user). A name with
    ``/`` in it is never tried. Raises DotQmailError for an unreadable folder.
    """
    safe = safeExtension(ext)
    if not dash:
        bare = os.path.join(folder, ".qmail")
        return (bare, None) if _isRegularFile(bare) else None
    exact = _candidate(folder, f".qmail{dash}{safe}")
    if exact is not None and _isRegularFile(exact):
        default: str | None = None
        if safe.endswith("default"):
            default = ext[len(safe) - 7 :]  # qmail's quirk: DEFAULT is "default"
        return exact, default
    for i in range(len(safe), -1, -1):
        if i and safe[i - 1] != "-":
            continue
        path = _candidate(folder, f".qmail{dash}{safe[:i]}default")
        if path is not None and _isRegularFile(path):
            return path, ext[i:]
    return None


def isForwardOnly(mode: int) -> bool:
    """A .qmail with its owner's execute bit may hold only forwards."""
    return bool(mode & stat.S_IXUSR)


def readDotQmail(path: str, defaultDelivery: str = "") -> list[Instruction]:
    """Read and parse a .qmail file found by ``findDotQmail``.

    A group- or world-writable file is refused; the execute bit makes it
    forward-only. A 0-byte file means ``defaultDelivery`` (qmail's
    aliasempty, e.g. ``"./Maildir/"``), parsed without the forward-only rule;
    left empty, that is qmail's blank-first-line failure. Raises DotQmailError
    (temporary) for every problem, an unreadable file included.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DotQmailError(f"Unable to open {path}: {e.strerror}. (#4.3.0)") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DotQmailError(f"Unable to open {path}: not a regular file. (#4.3.0)")
        if st.st_mode & _WRITABLE:
            raise DotQmailError(DOTQMAIL_WRITABLE)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as e:
        raise DotQmailError(f"Unable to read {path}: {e.strerror}. (#4.3.0)") from e
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        return parseDotQmail(defaultDelivery)
    return parseDotQmail(os.fsdecode(data), forwardOnly=isForwardOnly(st.st_mode))


def checkHomeDirectory(path: str, editingIsFatal: bool = True) -> None:
    """qmail-local's checkhome: refuse a writable or sticky home (or domain) folder.

    Raises DotQmailError (temporary); sticky is qmail's "user is editing his
    .qmail file" signal.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise DotQmailError(f"Unable to stat home directory: {e.strerror}. (#4.3.0)") from e
    if st.st_mode & _WRITABLE:
        raise DotQmailError(HOME_WRITABLE)
    if st.st_mode & stat.S_ISVTX and editingIsFatal:
        raise DotQmailError(HOME_STICKY)


def _exists(path: str) -> bool:
    """qmail-local's qmeox: any kind of file counts."""
    try:
        os.stat(path)
    except ValueError:
        return False
    except OSError as e:
        if e.errno in _ABSENT:
            return False
        raise DotQmailError(f"Unable to open {path}: {e.strerror}. (#4.3.0)") from e
    return True


def ownerSender(folder: str, dash: str, ext: str, sender: str, local: str, host: str) -> str:
    """NEWSENDER: the envelope sender for forwards from this .qmail.

    ``.qmail<dash><ext>-owner`` present: ``<local>-owner@<host>``; with
    ``-owner-default`` too, the VERP sender ``<local>-owner-@<host>-@[]``.
    The null sender and ``#@[]`` are never changed.
    """
    if sender in ("", "#@[]"):
        return sender
    base = _candidate(folder, f".qmail{dash}{safeExtension(ext)}-owner")
    if base is None or not _exists(base):
        return sender
    if _exists(base + "-default"):
        return f"{local}-owner-@{host}-@[]"
    return f"{local}-owner@{host}"


# qmail's quote.c table: what a local part may hold unquoted.
_NEEDS_NO_QUOTE = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~.")


def _quoteLocal(local: str) -> str:
    """qmail's quote(): the local part quoted as RFC 821 wants, as little as possible."""
    if (
        local
        and all(ch in _NEEDS_NO_QUOTE for ch in local)
        and not local.startswith(".")
        and not local.endswith(".")
        and ".." not in local
    ):
        return local
    escaped = "".join("\\" + ch if ch in '\r\n"\\' else ch for ch in local)
    return f'"{escaped}"'


def quoteAddress(address: str) -> str:
    """qmail's quote2(): quote the part before the last ``@``; ``""`` stays empty."""
    if not address:
        return ""
    local, at, domain = address.rpartition("@")
    if not at:
        return _quoteLocal(address)
    return _quoteLocal(local) + "@" + domain


def rpLine(sender: str) -> str:
    """RPLINE: ``Return-Path: <quoted sender>`` and a newline."""
    return "Return-Path: <" + quoteAddress(sender).replace("\n", "_") + ">\n"


def dtLine(recipient: str) -> str:
    """DTLINE: ``Delivered-To: <recipient>`` and a newline (the loop detector)."""
    return "Delivered-To: " + recipient.replace("\n", "_") + "\n"


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def ufLine(sender: str, when: float) -> str:
    """UFLINE: the mbox ``From `` line with its newline, dated in UTC (qmail's myctime).

    Blanks in the sender become ``-``; the null sender is ``MAILER-DAEMON``.
    """
    who = sender.replace(" ", "-").replace("\t", "-").replace("\n", "-") or "MAILER-DAEMON"
    t = time.gmtime(when)
    date = (
        f"{_DAYS[t.tm_wday]} {_MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {t.tm_year}"
    )
    return f"From {who} {date}\n"


def _afterDashes(ext: str, count: int) -> str:
    for _ in range(count):
        dash = ext.find("-")
        ext = "" if dash < 0 else ext[dash + 1 :]
    return ext


def _beforeDots(host: str, count: int) -> str:
    for _ in range(count):
        dot = host.rfind(".")
        if dot >= 0:
            host = host[:dot]
    return host


def qmailEnvironment(
    *,
    user: str,
    home: str,
    local: str,
    host: str,
    ext: str,
    sender: str,
    recipient: str | None = None,
    newSender: str | None = None,
    default: str | None = None,
    when: float | None = None,
    path: str = DEFAULT_PATH,
) -> dict[str, str]:
    """qmail-local's environment for ``|`` programs (qmail-command(8)), nothing inherited.

    RECIPIENT and DTLINE use ``recipient``, by default ``local@host`` as in
    qmail-local (for a vpopmail domain that is ``<domain>-<user>@<domain>``).
    ``when`` (default: now) dates UFLINE; ``newSender`` defaults to
    ``sender`` (see ``ownerSender``); DEFAULT is set only when ``default`` is
    not None. EXT2..4 are EXT after its first, second, third dash (empty if
    missing); HOST2..4 are HOST before its last, second-last, third-last dot.
    """
    if recipient is None:
        recipient = f"{local}@{host}"
    env = {
        "PATH": path,
        "USER": user,
        "HOME": home,
        "LOCAL": local,
        "HOST": host,
        "HOST2": _beforeDots(host, 1),
        "HOST3": _beforeDots(host, 2),
        "HOST4": _beforeDots(host, 3),
        "RECIPIENT": recipient,
        "SENDER": sender,
        "NEWSENDER": sender if newSender is None else newSender,
        "EXT": ext,
        "EXT2": _afterDashes(ext, 1),
        "EXT3": _afterDashes(ext, 2),
        "EXT4": _afterDashes(ext, 3),
        "DTLINE": dtLine(recipient),
        "RPLINE": rpLine(sender),
        "UFLINE": ufLine(sender, time.time() if when is None else when),
    }
    if default is not None:
        env["DEFAULT"] = default
    return env
