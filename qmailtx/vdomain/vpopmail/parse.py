"""Pure parsing of a vpopmail tree's files; no file access.

vpasswd lines, the vdelivermail line of a ``.qmail-default``, the names and
lines of alias files (``.qmail-<name>``), and the rewriting of old folder
paths in delivery lines.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from qmailtx.vdomain.records import (
    CatchAll,
    CatchAllAction,
    QuotaError,
    User,
    UserFlags,
    parseQuota,
)


class VpopmailFormatError(ValueError):
    """A line or file of the vpopmail tree that cannot be imported."""


@dataclass(frozen=True)
class VpasswdEntry:
    """One vpasswd line: the user, and its ``dir`` field as written ("" if empty)."""

    user: User
    directory: str


_BAD_NAME_CHARACTERS = frozenset("/@:\\\0")


def checkName(name: str, what: str) -> None:
    if (
        not name
        or name.startswith(".")
        or any(c in _BAD_NAME_CHARACTERS or c.isspace() or not c.isprintable() for c in name)
    ):
        raise VpopmailFormatError(f"unusable {what}: {name!r}")


def parseVpasswdLine(line: str, domain: str) -> VpasswdEntry:
    """Parse ``name:crypted_pw:uid:gid:gecos:dir:quota[:clear_pw]`` (no newline).

    The name is lower-cased, as vpopmail does; gid must be a decimal number
    (empty counts as 0). Everything after the seventh colon is the clear
    password, colons included. Raises VpopmailFormatError.
    """
    fields = line.split(":")
    if len(fields) < 7:
        raise VpopmailFormatError(f"{len(fields)} fields, expected 7 or 8")
    name, crypted, _uid, gid, gecos, directory, quotaText = fields[:7]
    clear = ":".join(fields[7:]) or None
    name = name.strip().lower()
    checkName(name, "user name")
    gid = gid.strip() or "0"
    if not gid.isdigit() or not gid.isascii():
        raise VpopmailFormatError(f"gid (flags) is not a number: {gid!r}")
    try:
        quota = parseQuota(quotaText)
    except QuotaError as e:
        raise VpopmailFormatError(str(e)) from None
    user = User(
        name=name,
        domain=domain.lower(),
        passwordHash=crypted,
        clearSecret=clear,
        quota=quota,
        flags=UserFlags(int(gid)),
        gecos=gecos,
    )
    return VpasswdEntry(user, directory.strip())


def dotQmailLines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the delivery lines: trailing blanks cut, comments
    and blank lines dropped (as qmail-local reads them)."""
    found = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip(" \t")
        if line and not line.startswith("#"):
            found.append((number, line))
    return found


def _isVdelivermail(line: str) -> bool:
    if not line.startswith("|"):
        return False
    words = line[1:].split()
    return bool(words) and os.path.basename(words[0]) == "vdelivermail"


def parseVdelivermailInstruction(text: str) -> CatchAll | None:
    """The catch-all a ``.qmail-default`` gives; None if it runs no vdelivermail.

    ``bounce-no-mailbox`` and ``delete`` map to BOUNCE and DELETE, an address
    (``user@host`` or ``&user@host``) to FORWARD. A path (absolute, or
    holding ``/Maildir/`` as vdelivermail tells them apart) gives MAILBOX
    with that path as the target: the caller maps it to a user (see
    ``ImportPlan``). Lines other than the vdelivermail one are not looked at.
    Raises VpopmailFormatError for a vdelivermail line vdelivermail itself
    would refuse (not exactly two arguments), several such lines, or an
    instruction it cannot follow here (a program, a name without ``@``).
    """
    lines = [line for _, line in dotQmailLines(text) if _isVdelivermail(line)]
    if not lines:
        return None
    if len(lines) > 1:
        raise VpopmailFormatError("more than one vdelivermail line")
    try:
        argv = shlex.split(lines[0][1:])
    except ValueError as e:
        raise VpopmailFormatError(f"vdelivermail line: {e}") from None
    if len(argv) != 3:
        raise VpopmailFormatError(
            "vdelivermail needs exactly two arguments"
            " (it answers: invalid syntax in .qmail-default file)"
        )
    instruction = argv[2]
    if instruction == CatchAllAction.BOUNCE.value:
        return CatchAll(CatchAllAction.BOUNCE)
    if instruction == CatchAllAction.DELETE.value:
        return CatchAll(CatchAllAction.DELETE)
    if instruction.startswith("/") or "/Maildir/" in instruction:
        return CatchAll(CatchAllAction.MAILBOX, instruction)
    address = instruction.removeprefix("&")
    if "@" in address and not address.startswith(("|", "#")) and " " not in address:
        return CatchAll(CatchAllAction.FORWARD, address)
    raise VpopmailFormatError(f"vdelivermail instruction not understood: {instruction!r}")


def aliasNameOf(fileName: str) -> str | None:
    """The alias a domain folder's ``.qmail-*`` file defines, or None.

    ``.qmail-foo:bar`` is ``foo.bar`` (qmail-local looks dots up as colons),
    ``.qmail-list-default`` is ``list-default``; names are lower-cased. None
    for ``.qmail-default`` (the catch-all) and for names that are not
    ``.qmail-<something>``. A name holding a dot is never looked up by
    qmail-local: VpopmailFormatError.
    """
    if not fileName.startswith(".qmail-"):
        return None
    rest = fileName[len(".qmail-") :]
    if rest in ("", "default"):
        return None
    if "." in rest:
        raise VpopmailFormatError(f"{fileName}: never used by qmail (dots are ':' in file names)")
    name = rest.replace(":", ".").lower()
    checkName(name, "alias name")
    return name


def parseAliasLines(text: str) -> tuple[str, ...]:
    """An alias file's targets: its delivery lines verbatim, trailing spaces
    and tabs cut, comments and blank lines dropped."""
    return tuple(line for _, line in dotQmailLines(text))


def rewriteTarget(line: str, moves: Mapping[str, str]) -> str:
    """``line`` with the longest matching old folder prefix replaced.

    ``moves`` maps old folders (normalised, no trailing slash) to new ones.
    Only file and Maildir lines (starting with ``/``) are rewritten; a prefix
    matches the whole line or up to a ``/``.
    """
    if not line.startswith("/"):
        return line
    best = ""
    for old in moves:
        if (line == old or line.startswith(old + "/")) and len(old) > len(best):
            best = old
    if not best:
        return line
    return moves[best] + line[len(best) :]
