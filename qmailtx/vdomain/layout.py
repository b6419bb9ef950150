"""Where a hosted domain's files live: vpopmail's layout under the data folder.

``<data>/domains/<domain>/``                   the domain folder (its ``.qmail-*`` files)
``<data>/domains/<domain>/<user>/``            the user folder (its ``.qmail``, ``.qmail-*``)
``<data>/domains/<domain>/<user>/Maildir/``    the mailbox

Every path is built with ``FilePath.child``: no name from an address can point
outside ``<data>/domains``. Names that could not be a folder (empty, leading
dot, a slash, NUL) are refused with ``BadName``.
"""

from __future__ import annotations

from twisted.python.filepath import FilePath, InsecurePath


class BadName(ValueError):
    """A domain or user name that cannot be a folder name."""


def _child(parent: FilePath[str], name: str) -> FilePath[str]:
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise BadName(f"not usable as a folder name: {name!r}")
    try:
        return parent.child(name)
    except InsecurePath:
        raise BadName(f"not usable as a folder name: {name!r}") from None


def domainsRoot(data: str) -> FilePath[str]:
    return FilePath(data).child("domains")


def domainFolder(data: str, domain: str) -> FilePath[str]:
    return _child(domainsRoot(data), domain.lower())


def userFolder(data: str, user: str, domain: str) -> FilePath[str]:
    return _child(domainFolder(data, domain), user.lower())


def maildirOf(data: str, user: str, domain: str) -> FilePath[str]:
    return userFolder(data, user, domain).child("Maildir")
