"""Who ``|program`` deliveries run as: ``[delivery] program_user``.

qmail never runs a delivery as root (qmail-getpw and qmail-lspawn refuse
uid 0; qmail-local runs as the mailbox owner, vpopmail's as the vpopmail
user). qmailtx has no per-mailbox system users, so a server running as
root runs every program as one configured user: a name from the passwd
database or ``uid:gid``. Root (uid 0, or group 0) is refused.

``resolveProgramUser`` looks the user up once, at start-up; the result also
carries the supplementary groups the child will get (Twisted's spawnProcess
calls ``initgroups`` for the uid's passwd name), so a folder's permissions
can be judged for that identity without asking the child.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_PROGRAM_USER = "nobody"


class ProgramUserError(ValueError):
    """``program_user`` cannot be used; the message says why."""


@dataclass(frozen=True)
class ProgramUser:
    """The identity a program runs as: uid, primary gid and every group it will hold."""

    name: str  # as configured
    uid: int
    gid: int
    groups: frozenset[int]  # gid and the supplementary groups initgroups gives

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"

    def canEnter(self, st: os.stat_result) -> bool:
        """Whether this identity may search (chdir into) a folder with this stat.

        The classic owner/group/other bits only; ACLs are not consulted.
        """
        if self.uid == st.st_uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def resolveProgramUser(text: str) -> ProgramUser:
    """``"name"`` or ``"uid:gid"`` as a ProgramUser; ProgramUserError if unusable."""
    if ":" in text:
        uidText, _, gidText = text.partition(":")
        if not (uidText.isdigit() and gidText.isdigit()):
            raise ProgramUserError(f'{text!r} is not a user name or "uid:gid"')
        uid, gid = int(uidText), int(gidText)
        _refuseRoot(text, uid, gid)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            raise ProgramUserError(
                f"{text!r}: uid {uid} has no passwd entry (needed to set the program's groups)"
            ) from None
    else:
        if not text or text.strip() != text:
            raise ProgramUserError(f'{text!r} is not a user name or "uid:gid"')
        try:
            entry = pwd.getpwnam(text)
        except KeyError:
            raise ProgramUserError(f"unknown user {text!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
        _refuseRoot(text, uid, gid)
    try:
        grp.getgrgid(gid)
    except KeyError:
        raise ProgramUserError(f"{text!r}: unknown group id {gid}") from None
    groups = frozenset(os.getgrouplist(entry.pw_name, gid)) | {gid}
    if 0 in groups:
        raise ProgramUserError(
            f"{text!r} is a member of group 0 (root's group); qmail never runs deliveries as root"
        )
    return ProgramUser(text, uid, gid, groups)


def programIdentity(
    configured: ProgramUser | None, euid: Callable[[], int] = os.geteuid
) -> ProgramUser | None:
    """The identity a program gets now: ``configured`` while we are root, else our own (None).

    Asked at each delivery, not at start-up: twistd may drop from root to
    ``--uid`` after the service was built, and only root can switch users.
    ProgramUserError when we are root and no user was configured: a program
    never runs as root.
    """
    if euid() != 0:
        return None
    if configured is None:
        raise ProgramUserError("running as root and no program_user")
    return configured


def _refuseRoot(text: str, uid: int, gid: int) -> None:
    if uid == 0:
        raise ProgramUserError(f"{text!r} is root (uid 0); qmail never runs deliveries as root")
    if gid == 0:
        raise ProgramUserError(
            f"{text!r} has group 0 (root's group); qmail never runs deliveries as root"
        )
