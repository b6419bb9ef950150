"""Import a vpopmail tree: vpasswd users, ``.qmail-*`` aliases, catch-alls, Maildirs.

``qmailctl import-vpopmail DIR [--dry-run] [--no-mail]`` calls ``runImport``.
Three layers:

1. Pure parsing: ``parseVpasswdLine``, ``parseVdelivermailInstruction``,
   ``aliasNameOf``, ``parseAliasLines``, ``rewriteTarget``.
2. ``scanTree(root, data)`` reads the tree (writes nothing) and returns an
   ``ImportPlan``: domains with their catch-all, users, aliases, alias
   domains, Maildirs to copy, path rewrites, warnings and errors.
3. ``applyPlan(store, plan, dryRun, copyMail)`` carries it out (or, dry,
   only says what it would do) and returns an ``ImportReport``.

The tree: ``DIR`` is a vpopmail home (holding ``domains/``) or the
``domains/`` folder itself. A domain folder is one holding ``vpasswd``,
directly below ``domains/`` or one level further down (vpopmail's hashing
when there are many domains). A symbolic link there pointing at a domain
folder is an alias domain (``vaddaliasdomain``). vpopmail's SQL backends are
not read.

What is imported, and how:

- ``vpasswd`` lines (``name:crypted_pw:uid:gid:gecos:dir:quota[:clear_pw]``)
  become users: the crypted password as it is (``$1$``, ``$6$``, DES: our
  verifier knows them and asks for a rehash at the next login), gid as the
  flag bits 1:1, the quota through ``parseQuota``. A clear password becomes
  the user's ``clearSecret`` and turns the new domain's ``clearPasswords`` on.
  The uid field (vpopmail's APOP marker) is ignored.
- ``.qmail-default`` (``| .../vdelivermail '' <instruction>``) becomes the
  domain's catch-all: bounce, delete, forward to an address, or the mailbox of
  a user of the same domain when the instruction is that user's folder. Any
  other content is reported and leaves the catch-all at bounce.
- ``.qmail-<name>`` files in a domain folder become valias rows, one target
  per delivery line (comments and blank lines dropped, trailing blanks cut).
  A file whose name is also a user's is kept as that file in the new domain
  folder, where the delivery code reads it before users, as qmail-local did.
- A user's ``.qmail`` and ``.qmail-<ext>`` files are copied into the new user
  folder (vdelivermail and qmail-local read them there).
- File and Maildir lines pointing into a user folder of the imported tree
  (at the tree's old path, from the vpasswd ``dir`` fields, or where it is
  now) are rewritten to ``<data>/domains/<domain>/<user>/...``; each rewrite
  is reported. Program lines naming the old tree are reported, not changed.
- Each user's Maildir (``<dir>/Maildir`` if present, else the folder found in
  the domain folder) is brought to ``<data>/domains/<domain>/<user>/Maildir/``:
  messages in ``cur/`` and ``new/`` (of the Maildir and of its Maildir++
  folders) are hard-linked when source and target share a file system and
  the message already belongs to the data folder's owner (a message file is
  never changed in place), everything else (``maildirsize``, uid lists,
  keywords) is copied; ``tmp/`` contents and symbolic links are left behind.
  Copies and new folders belong to the running user: run as the server's
  account, or have the caller hand root's files over (as ``qmailctl`` does).
  With ``copyMail=False`` an empty Maildir is made instead.

Existing things are never changed: a domain, user, alias domain or alias
already in the database is reported as skipped (its users and aliases are
still imported into an existing domain). A re-run therefore only adds what
is missing. ``ImportReport.ok`` is False when something could not be
imported: an unparseable vpasswd line or quota, an unusable name, a name
taken by something of another kind (an alias where a user should go), an
unreadable file, a failed copy. Warnings (behaviour that changes, things
left behind) do not make it False. ``DatabaseUnavailable`` is not caught.

A user's mail is copied before the user is added, so a failed copy leaves
no user behind and a re-run copies again (files already there are kept).
Everything written is flushed with ``os.sync()`` at the end. All of this
blocks: it is for ``qmailctl``, not for the reactor thread.
"""

from __future__ import annotations

import errno
import itertools
import os
import shlex
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.vdomain.interfaces import AlreadyExists, IUserStore
from qmailtx.vdomain.layout import BadName, domainFolder, userFolder
from qmailtx.vdomain.records import (
    Alias,
    CatchAll,
    CatchAllAction,
    Domain,
    QuotaError,
    User,
    UserFlags,
    parseQuota,
)
from qmailtx.vdomain.sqlite import SQLiteUserStore


class VpopmailFormatError(ValueError):
    """A line or file of the vpopmail tree that cannot be imported."""


# -- pure parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class VpasswdEntry:
    """One vpasswd line: the user, and its ``dir`` field as written ("" if empty)."""

    user: User
    directory: str


_BAD_NAME_CHARACTERS = frozenset("/@:\\\0")


def _checkName(name: str, what: str) -> None:
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
    _checkName(name, "user name")
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


def _dotQmailLines(text: str) -> list[tuple[int, str]]:
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
    lines = [line for _, line in _dotQmailLines(text) if _isVdelivermail(line)]
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
    _checkName(name, "alias name")
    return name


def parseAliasLines(text: str) -> tuple[str, ...]:
    """An alias file's targets: its delivery lines verbatim, trailing spaces
    and tabs cut, comments and blank lines dropped."""
    return tuple(line for _, line in _dotQmailLines(text))


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


# -- the plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """A path in a delivery line changed to the new data folder."""

    path: str  # the file in the old tree
    line: int
    old: str
    new: str


@dataclass(frozen=True)
class FileImport:
    """A dot-qmail file to write into the new tree."""

    source: str
    destination: str
    text: str


@dataclass(frozen=True)
class MailStats:
    messages: int = 0
    bytes: int = 0
    files: int = 0  # other files (maildirsize, uid lists, ...)


@dataclass(frozen=True)
class UserImport:
    user: User
    source: str  # "<vpasswd>:<line>"
    maildir: str | None  # the Maildir to copy from, None if there is none
    mail: MailStats
    files: tuple[FileImport, ...]


@dataclass(frozen=True)
class AliasImport:
    alias: Alias
    source: str


@dataclass
class DomainImport:
    domain: Domain
    folder: str
    users: list[UserImport] = field(default_factory=list)
    aliases: list[AliasImport] = field(default_factory=list)
    files: list[FileImport] = field(default_factory=list)


@dataclass
class ImportPlan:
    root: str
    data: str
    domains: list[DomainImport] = field(default_factory=list)
    aliasDomains: list[tuple[str, str]] = field(default_factory=list)  # (alias, domain)
    rewrites: list[Rewrite] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# -- reading the tree -----------------------------------------------------------------


def _norm(path: str) -> str:
    return os.path.normpath(path) if path else path


def _readText(path: str) -> str:
    """A file's text: UTF-8, or Latin-1 when it is not valid UTF-8 (old gecos)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _problem(path: str, e: OSError) -> str:
    return f"{path}: {e.strerror or e}"


def _visible(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _findDomains(
    domainsDir: str, plan: ImportPlan
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(folder name, path) of the domain folders, and (name, path) of symbolic
    links to folders, in ``domainsDir`` and one level further down."""
    folders: list[tuple[str, str]] = []
    links: list[tuple[str, str]] = []
    for entry in _visible(domainsDir):
        if not entry.is_dir():
            continue
        if entry.is_symlink():
            links.append((entry.name, entry.path))
        elif os.path.isfile(os.path.join(entry.path, "vpasswd")):
            folders.append((entry.name, entry.path))
        else:
            found = False
            for inner in _visible(entry.path):
                if not inner.is_dir():
                    continue
                if inner.is_symlink():
                    links.append((inner.name, inner.path))
                elif os.path.isfile(os.path.join(inner.path, "vpasswd")):
                    folders.append((inner.name, inner.path))
                    found = True
            if not found and "." in entry.name:
                plan.warnings.append(f"{entry.path}: no vpasswd file, not imported")
    return folders, links


def _lastIndex(parts: list[str], name: str) -> int | None:
    """Index of the last ``name`` in ``parts``, the final part excluded."""
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == name:
            return i
    return None


@dataclass(frozen=True)
class _Entry:
    """A vpasswd entry during the scan."""

    entry: VpasswdEntry
    source: str  # "<vpasswd>:<line>"
    oldPaths: tuple[str, ...]  # where the user folder was (dir field)
    relative: str  # the user folder below the domain folder
    folder: str | None  # the user folder in the tree as it is now, if found


@dataclass
class _Domain:
    """A domain during the scan."""

    name: str
    folder: str
    entries: list[_Entry] = field(default_factory=list)
    prefixes: set[str] = field(default_factory=set)  # paths the domain folder had or has


def _readVpasswd(domain: _Domain, folderName: str, plan: ImportPlan) -> None:
    path = os.path.join(domain.folder, "vpasswd")
    try:
        text = _readText(path)
    except OSError as e:
        plan.errors.append(_problem(path, e))
        return
    seen: set[str] = set()
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            entry = parseVpasswdLine(line, domain.name)
            userFolder(plan.data, entry.user.name, domain.name)
        except (VpopmailFormatError, BadName) as e:
            plan.errors.append(f"{source}: {e}; user not imported")
            continue
        name = entry.user.name
        if name in seen:
            plan.errors.append(f"{source}: user {name} listed twice; not imported again")
            continue
        seen.add(name)
        oldPaths: list[str] = []
        relative = name
        directory = entry.directory
        if directory:
            if not os.path.isabs(directory):
                directory = os.path.join(domain.folder, directory)
            directory = _norm(directory)
            oldPaths.append(directory)
            parts = directory.split("/")
            i = _lastIndex(parts, folderName)
            if i is not None:
                domain.prefixes.add("/".join(parts[: i + 1]))
                relative = "/".join(parts[i + 1 :])
        candidates = [*oldPaths, os.path.join(domain.folder, relative)]
        candidates.append(os.path.join(domain.folder, name))
        found = next((c for c in candidates if os.path.isdir(os.path.join(c, "Maildir"))), None)
        if found is None:
            found = next((c for c in candidates if os.path.isdir(c)), None)
        domain.entries.append(_Entry(entry, source, tuple(oldPaths), relative, found))


def _oldHomes(prefixes: set[str]) -> list[str]:
    """Old domain folder paths and the vpopmail homes holding them (longest first)."""
    homes = set(prefixes)
    for prefix in prefixes:
        parts = prefix.split("/")
        i = _lastIndex(parts, "domains")
        if i is not None and i > 0:
            homes.add("/".join(parts[:i]))
    return sorted(homes, key=len, reverse=True)


class _Rewriter:
    """Rewrites delivery lines of the old tree and reports what it did."""

    def __init__(self, moves: dict[str, str], oldHomes: list[str], plan: ImportPlan) -> None:
        self.moves = moves
        self.oldHomes = oldHomes
        self.plan = plan

    def line(self, path: str, number: int, line: str, what: str) -> str:
        new = rewriteTarget(line, self.moves)
        if new != line:
            self.plan.rewrites.append(Rewrite(path, number, line, new))
        elif line.startswith(("|", "/")):
            old = next((h for h in self.oldHomes if h in line), None)
            if old is not None:
                self.plan.warnings.append(
                    f"{path}:{number}: {what} refers to the old vpopmail tree ({old})"
                    " and is left as it is: keep that path"
                )
        return new

    def targets(self, path: str, text: str, what: str) -> tuple[str, ...]:
        return tuple(self.line(path, n, line, what) for n, line in _dotQmailLines(text))

    def text(self, path: str, text: str, what: str) -> str:
        """The whole file, delivery lines rewritten, everything else as it was."""
        out = []
        for number, raw in enumerate(text.split("\n"), start=1):
            line = raw.rstrip(" \t")
            if line and not line.startswith("#"):
                new = self.line(path, number, line, what)
                if new != line:
                    raw = new
            out.append(raw)
        return "\n".join(out)


def scanTree(root: str, data: str) -> ImportPlan:
    """Read a vpopmail tree into an ImportPlan; nothing is written anywhere."""
    data = os.path.abspath(data)
    plan = ImportPlan(root, data)
    if not os.path.isdir(root):
        plan.errors.append(f"{root}: not a folder")
        return plan
    inner = os.path.join(root, "domains")
    domainsDir = inner if os.path.isdir(inner) else root
    try:
        found, links = _findDomains(domainsDir, plan)
    except OSError as e:
        plan.errors.append(_problem(domainsDir, e))
        return plan
    folders = sorted(found, key=lambda f: (f[0].lower(), f[1]))
    if not folders:
        plan.errors.append(
            f"{domainsDir}: no domain folder (one holding a vpasswd file) found;"
            " vpopmail's SQL backends are not read"
        )
        return plan

    # 1. every vpasswd first: the rewrites need all users' old and new folders.
    domains: list[_Domain] = []
    for folderName, folder in folders:
        name = folderName.lower()
        try:
            _checkName(name, "domain name")
            domainFolder(data, name)
        except (VpopmailFormatError, BadName):
            plan.errors.append(f"{folder}: unusable domain name {folderName!r}; not imported")
            continue
        if any(d.name == name for d in domains):
            plan.errors.append(f"{folder}: domain {name} found twice; this one not imported")
            continue
        domain = _Domain(name, folder, prefixes={_norm(os.path.abspath(folder))})
        domain.prefixes.add(os.path.realpath(folder))
        _readVpasswd(domain, folderName, plan)
        domains.append(domain)

    moves: dict[str, str] = {}
    for domain in domains:
        for entry in domain.entries:
            new = userFolder(data, entry.entry.user.name, domain.name).path
            for prefix in domain.prefixes:
                moves[os.path.join(prefix, entry.relative)] = new
            for old in entry.oldPaths:
                moves[old] = new
            if entry.folder is not None:
                moves[_norm(os.path.abspath(entry.folder))] = new
    rewriter = _Rewriter(moves, _oldHomes({p for d in domains for p in d.prefixes}), plan)

    # 2. per domain: catch-all, users' files and Maildirs, aliases.
    for domain in domains:
        plan.domains.append(_scanDomain(domain, rewriter, plan))

    byRealPath = {os.path.realpath(d.folder): d.name for d in domains}
    for aliasName, link in links:
        target = byRealPath.get(os.path.realpath(link))
        alias = aliasName.lower()
        if target is None:
            plan.warnings.append(f"{link}: a link to no imported domain; not imported")
        elif target != alias:
            plan.aliasDomains.append((alias, target))
    return plan


def _scanDomain(domain: _Domain, rewriter: _Rewriter, plan: ImportPlan) -> DomainImport:
    catchall = _scanCatchAll(domain, rewriter.moves, plan)
    users: list[UserImport] = []
    for e in domain.entries:
        user = e.entry.user
        files: list[FileImport] = []
        maildir = None
        stats = MailStats()
        if e.folder is not None:
            newFolder = userFolder(plan.data, user.name, domain.name).path
            for name in _dotQmailFiles(e.folder, plan):
                path = os.path.join(e.folder, name)
                try:
                    text = _readText(path)
                except OSError as error:
                    plan.errors.append(_problem(path, error))
                    continue
                text = rewriter.text(path, text, f"{user.address}'s {name}")
                files.append(FileImport(path, os.path.join(newFolder, name), text))
            candidate = os.path.join(e.folder, "Maildir")
            if os.path.isdir(candidate):
                maildir = candidate
                try:
                    stats = _countMail(candidate)
                except OSError as error:
                    plan.errors.append(_problem(candidate, error))
        users.append(UserImport(user, e.source, maildir, stats, tuple(files)))
    clear = any(u.user.clearSecret is not None for u in users)
    result = DomainImport(Domain(domain.name, catchall, clear), domain.folder, users)

    try:
        names = sorted(os.listdir(domain.folder))
    except OSError as error:
        plan.errors.append(_problem(domain.folder, error))
        names = []
    userNames = {u.user.name for u in users}
    for fileName in names:
        path = os.path.join(domain.folder, fileName)
        try:
            aliasName = aliasNameOf(fileName)
        except VpopmailFormatError as error:
            plan.warnings.append(f"{domain.folder}: {error}; not imported")
            continue
        if aliasName is None or not os.path.isfile(path):
            continue
        address = f"{aliasName}@{domain.name}"
        try:
            text = _readText(path)
        except OSError as error:
            plan.errors.append(_problem(path, error))
            continue
        if aliasName in userNames:
            destination = os.path.join(domainFolder(plan.data, domain.name).path, fileName)
            text = rewriter.text(path, text, f"{address}'s file")
            result.files.append(FileImport(path, destination, text))
            plan.warnings.append(
                f"{path}: {address} is also a user; the file is kept as {destination},"
                " which is read before the user's mailbox (as qmail-local did)"
            )
            continue
        targets = rewriter.targets(path, text, f"alias {address}")
        if not targets:
            plan.warnings.append(f"{path}: no delivery lines; alias {address} not imported")
            continue
        result.aliases.append(AliasImport(Alias(aliasName, domain.name, targets), path))
    return result


def _scanCatchAll(domain: _Domain, moves: Mapping[str, str], plan: ImportPlan) -> CatchAll:
    path = os.path.join(domain.folder, ".qmail-default")
    fallback = f"unknown users of {domain.name} will bounce"
    if not os.path.lexists(path):
        return CatchAll()  # qmail-local bounces without one too
    try:
        text = _readText(path)
        parsed = parseVdelivermailInstruction(text)
    except OSError as e:
        plan.errors.append(_problem(path, e))
        return CatchAll()
    except VpopmailFormatError as e:
        plan.warnings.append(f"{path}: {e}; {fallback}")
        return CatchAll()
    lines = [line for _, line in _dotQmailLines(text)]
    if parsed is None:
        said = " / ".join(lines) or "nothing"
        plan.warnings.append(f"{path}: not a vdelivermail line ({said}); {fallback}")
        return CatchAll()
    if len(lines) > 1:
        plan.warnings.append(f"{path}: only the vdelivermail line is imported")
    if parsed.action is not CatchAllAction.MAILBOX:
        return parsed
    # A folder: vdelivermail delivers to <path>/Maildir/ (relative: to the domain folder).
    target = parsed.target
    if not target.startswith("/"):
        target = os.path.join(domain.folder, target)
    target = _norm(target)
    if os.path.basename(target) == "Maildir":
        target = os.path.dirname(target)
    new = moves.get(target)
    home = domainFolder(plan.data, domain.name).path
    if new is not None and os.path.dirname(new) == home:
        return CatchAll(CatchAllAction.MAILBOX, os.path.basename(new))
    where = "a mailbox of another domain" if new is not None else f"no user folder of {domain.name}"
    plan.warnings.append(f"{path}: catch-all {parsed.target} is {where}; {fallback}")
    return CatchAll()


def _dotQmailFiles(folder: str, plan: ImportPlan) -> list[str]:
    """A user folder's ``.qmail`` and ``.qmail-*`` files (regular files only)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        plan.errors.append(_problem(folder, e))
        return []
    return [
        name
        for name in names
        if (name == ".qmail" or name.startswith(".qmail-"))
        and os.path.isfile(os.path.join(folder, name))
        and not os.path.islink(os.path.join(folder, name))
    ]


# -- Maildirs -------------------------------------------------------------------------

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


def _countMail(source: str) -> MailStats:
    messages = size = files = 0
    for _, kind, entry in _walkMaildir(source):
        if kind == "message":
            messages += 1
            size += entry.stat(follow_symlinks=False).st_size
        elif kind == "file":
            files += 1
    return MailStats(messages, size, files)


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


def _copyFile(source: str, target: str, scratch: str) -> None:
    """Copy with its times and mode, under a scratch name, then link into place
    (FileExistsError if the target appeared meanwhile)."""
    temporary = _temporaryName(scratch)
    try:
        shutil.copy2(source, temporary, follow_symlinks=False)
        os.link(temporary, target)
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def copyMaildir(
    source: str, destination: str, address: str = "", linkOwner: int | None = None
) -> MailCopy:
    """Bring a Maildir over (see the module docstring); files already there stay.

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


# -- the report -----------------------------------------------------------------------

CREATE = "create"
SKIP = "skip"
FAIL = "fail"

_DONE = {CREATE: "created", SKIP: "skipped", FAIL: "failed"}
_DRY = {CREATE: "would create", SKIP: "would skip", FAIL: "would fail"}


@dataclass(frozen=True)
class Outcome:
    """What happened (or would happen) to one thing of the tree."""

    kind: str  # "domain", "alias domain", "user", "alias", "file"
    name: str
    action: str  # CREATE, SKIP or FAIL
    detail: str = ""


@dataclass
class ImportReport:
    """The result of ``runImport``: ``lines()`` for people, ``asDict()`` for JSON.

    ``ok`` is False when something could not be imported (``errors``);
    skipped things (already in the database) and warnings leave it True.
    """

    root: str
    data: str
    dryRun: bool
    copyMail: bool
    outcomes: list[Outcome] = field(default_factory=list)
    mail: list[MailCopy] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, dict[str, int]]:
        """{action: {kind: number}}."""
        counts: dict[str, dict[str, int]] = {CREATE: {}, SKIP: {}, FAIL: {}}
        for o in self.outcomes:
            counts[o.action][o.kind] = counts[o.action].get(o.kind, 0) + 1
        return counts

    def lines(self) -> list[str]:
        words = _DRY if self.dryRun else _DONE
        head = f"import-vpopmail {self.root} into {self.data}"
        if self.dryRun:
            head += " (dry run: nothing written)"
        elif not self.copyMail:
            head += " (without mail: empty Maildirs)"
        out = [head]
        for o in self.outcomes:
            indent = "" if o.kind in ("domain", "alias domain") else "  "
            detail = f" ({o.detail})" if o.detail else ""
            out.append(f"{indent}{o.kind} {o.name}: {words[o.action]}{detail}")
        for r in self.rewrites:
            out.append(f"rewrite {r.path}:{r.line}: {r.old} -> {r.new}")
        out.extend(f"warning: {w}" for w in self.warnings)
        out.extend(f"error: {e}" for e in self.errors)
        counts = self.counts()
        summary = []
        for action in (CREATE, SKIP, FAIL):
            if counts[action]:
                things = ", ".join(f"{n} {_plural(kind, n)}" for kind, n in counts[action].items())
                summary.append(f"{words[action]} {things}")
        summary.append(f"{len(self.warnings)} {_plural('warning', len(self.warnings))}")
        summary.append(f"{len(self.errors)} {_plural('error', len(self.errors))}")
        out.append("; ".join(summary))
        return out

    def asDict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dryRun": self.dryRun,
            "copyMail": self.copyMail,
            "root": self.root,
            "data": self.data,
            "items": [
                {"kind": o.kind, "name": o.name, "action": o.action, "detail": o.detail}
                for o in self.outcomes
            ],
            "mail": [m.asDict() for m in self.mail],
            "rewrites": [
                {"file": r.path, "line": r.line, "old": r.old, "new": r.new} for r in self.rewrites
            ],
            "counts": self.counts(),
            "warnings": list(self.warnings),
            "errors": list(self.errors),
        }


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + "es" if word.endswith("s") else word + "s"


def _mailText(copy: MailCopy, done: bool) -> str:
    if not copy.messages and not (copy.copied or copy.present):
        return "mail: no messages"
    text = f"mail: {copy.messages} {_plural('message', copy.messages)}, {copy.bytes} bytes"
    if done:
        how = [f"{copy.linked} linked", f"{copy.copied} {_plural('file', copy.copied)} copied"]
        if copy.present:
            how.append(f"{copy.present} there already")
        text += f" ({', '.join(how)})"
    return text


def _flagNames(flags: UserFlags) -> str:
    names = [f.name for f in UserFlags if f in flags and f.name]
    unknown = int(flags) & ~sum(int(f) for f in UserFlags)
    if unknown:
        names.append(hex(unknown))
    return "|".join(names)


def _userDetail(user: User) -> str:
    parts = [f"quota {user.quota}" if user.quota and not user.quota.unlimited else "no quota"]
    if user.flags:
        parts.append(f"flags {_flagNames(user.flags)}")
    if user.clearSecret is not None:
        parts.append("clear password")
    return ", ".join(parts)


# -- applying the plan ----------------------------------------------------------------


class _Conflict(Exception):
    pass


def _makeFolder(path: str) -> None:
    """A domain or user folder: 0700 like qmailctl's (never group-writable:
    qmail-local refuses such a home)."""
    os.makedirs(path, mode=0o700, exist_ok=True)


class _Applier:
    """Carries out an ImportPlan; ``view`` is None for a database that is
    known to be empty (a dry run against a file that does not exist yet)."""

    def __init__(
        self,
        store: IUserStore,
        view: IUserStore | None,
        report: ImportReport,
        data: str,
    ) -> None:
        self.store = store
        self.view = view
        self.report = report
        self.data = data
        self.dryRun = report.dryRun
        self.wrote = False
        self.used: set[str] = set()  # files whose lines were (or would be) imported

    def outcome(self, kind: str, name: str, action: str, detail: str = "") -> None:
        self.report.outcomes.append(Outcome(kind, name, action, detail))

    def fail(self, kind: str, name: str, message: str) -> None:
        self.report.errors.append(message)
        self.outcome(kind, name, FAIL, message)

    def run(self, plan: ImportPlan) -> None:
        imported: set[str] = set()
        for d in plan.domains:
            keepClear = self.domain(d)
            if keepClear is None:
                continue
            imported.add(d.domain.name)
            for alias, target in plan.aliasDomains:
                if target == d.domain.name:
                    self.aliasDomain(alias, target)
            for u in d.users:
                self.user(u, keepClear)
            for a in d.aliases:
                self.alias(a)
            for f in d.files:
                self.file(f)
        for alias, target in plan.aliasDomains:
            if target not in imported:
                self.fail(
                    "alias domain",
                    f"{alias} -> {target}",
                    f"alias domain {alias}: its domain {target} was not imported",
                )

    # -- domains

    def domain(self, d: DomainImport) -> bool | None:
        """Add the domain; whether clear passwords are kept (None: domain refused)."""
        name = d.domain.name
        detail = f"catch-all {d.domain.catchall}"
        if d.domain.clearPasswords:
            detail += ", clear passwords"
        canonical = self.view.canonicalDomain(name) if self.view is not None else None
        if canonical is None:
            if not self.dryRun:
                try:
                    self.store.addDomain(d.domain)
                except AlreadyExists as e:
                    self.fail("domain", name, f"{d.folder}: {e}; nothing of it imported")
                    return None
                try:
                    self.wrote = True
                    _makeFolder(domainFolder(self.data, name).path)
                except OSError as e:
                    self.report.errors.append(_problem(e.filename or name, e))
            self.outcome("domain", name, CREATE, detail)
            return d.domain.clearPasswords
        if canonical != name:
            self.fail(
                "domain",
                name,
                f"{d.folder}: {name} is an alias domain of {canonical}; nothing of it imported",
            )
            return None
        existing = self.view.domain(name) if self.view is not None else None
        self.outcome("domain", name, SKIP, "exists already; its settings are left as they are")
        if existing is not None and existing.catchall != d.domain.catchall:
            self.report.warnings.append(
                f"{d.folder}: {name} exists with catch-all {existing.catchall};"
                f" the tree's {d.domain.catchall} is not applied"
            )
        if existing is not None and d.domain.clearPasswords and not existing.clearPasswords:
            self.report.warnings.append(
                f"{d.folder}: {name} exists without clear passwords;"
                " the imported users' clear passwords are dropped"
            )
            return False
        return True

    def aliasDomain(self, alias: str, target: str) -> None:
        name = f"{alias} -> {target}"
        canonical = self.view.canonicalDomain(alias) if self.view is not None else None
        if canonical == target:
            self.outcome("alias domain", name, SKIP, "exists already")
        elif canonical is not None:
            self.fail("alias domain", name, f"alias domain {alias}: {alias} is taken already")
        else:
            if not self.dryRun:
                try:
                    self.store.addAliasDomain(alias, target)
                except AlreadyExists as e:
                    self.fail("alias domain", name, f"alias domain {alias}: {e}")
                    return
            self.outcome("alias domain", name, CREATE)

    # -- users

    def user(self, u: UserImport, keepClear: bool) -> None:
        user = u.user
        if not keepClear and user.clearSecret is not None:
            user = User(
                user.name, user.domain, user.passwordHash, None, user.quota, user.flags, user.gecos
            )
        view = self.view
        if view is not None and view.user(user.name, user.domain) is not None:
            self.outcome("user", user.address, SKIP, "exists already; mail not copied")
            return
        if view is not None and view.alias(user.name, user.domain) is not None:
            self.fail("user", user.address, f"{u.source}: {user.address} is an alias already")
            return
        detail = _userDetail(user)
        destination = os.path.join(userFolder(self.data, user.name, user.domain).path, "Maildir")
        names = "".join(f"; {os.path.basename(f.destination)}" for f in u.files)
        self.used.update(f.source for f in u.files)
        if self.dryRun:
            if u.maildir is not None and self.report.copyMail:
                copy = MailCopy(user.address, u.maildir, destination, u.mail.messages, u.mail.bytes)
                self.report.mail.append(copy)
                detail += f"; {_mailText(copy, done=False)}"
            self.outcome("user", user.address, CREATE, detail + names)
            return
        folder = os.path.dirname(destination)
        try:
            self.wrote = True
            if os.path.lexists(folder):
                self.report.warnings.append(
                    f"{folder} exists already (an earlier run?); {user.address}'s import adds to it"
                )
            for path in (os.path.dirname(folder), folder, destination):
                _makeFolder(path)
            if u.maildir is not None and self.report.copyMail:
                owner = os.stat(self.data).st_uid  # the server's account
                copy = copyMaildir(u.maildir, destination, user.address, owner)
                self.report.mail.append(copy)
                detail += f"; {_mailText(copy, done=True)}"
                for path in copy.skipped:
                    self.report.warnings.append(f"{path}: not a plain file or folder; left behind")
            else:
                makeMaildir(FileSystem(), destination)
            for f in u.files:
                self.writeFile(f)
        except (OSError, _Conflict) as e:
            message = _problem(e.filename, e) if isinstance(e, OSError) and e.filename else str(e)
            self.fail("user", user.address, f"{u.source}: {message}; user not added")
            return
        try:
            self.store.addUser(user)
        except AlreadyExists as e:
            self.fail("user", user.address, f"{u.source}: {e}")
            return
        self.outcome("user", user.address, CREATE, detail + names)

    # -- aliases and files

    def alias(self, a: AliasImport) -> None:
        alias = a.alias
        view = self.view
        existing = view.alias(alias.name, alias.domain) if view is not None else None
        if existing is not None:
            self.outcome("alias", alias.address, SKIP, "exists already")
            if set(existing.targets) != set(alias.targets):
                self.report.warnings.append(
                    f"{a.source}: alias {alias.address} exists with other targets; left as it is"
                )
            return
        if view is not None and view.user(alias.name, alias.domain) is not None:
            self.fail("alias", alias.address, f"{a.source}: {alias.address} is a user already")
            return
        if not self.dryRun:
            try:
                self.store.addAlias(alias)
            except AlreadyExists as e:
                self.fail("alias", alias.address, f"{a.source}: {e}")
                return
        self.used.add(a.source)
        n = len(alias.targets)
        self.outcome("alias", alias.address, CREATE, f"{n} {_plural('target', n)}")

    def file(self, f: FileImport) -> None:
        if os.path.lexists(f.destination):
            try:
                same = _readText(f.destination) == f.text
            except OSError:
                same = False
            if same:
                self.outcome("file", f.destination, SKIP, "exists already")
            else:
                self.fail("file", f.destination, f"{f.destination}: exists with other content")
            return
        if not self.dryRun:
            try:
                self.wrote = True
                self.writeFile(f)
            except (OSError, _Conflict) as e:
                self.fail("file", f.destination, f"{f.destination}: {e}")
                return
        self.used.add(f.source)
        self.outcome("file", f.destination, CREATE, f"from {f.source}")

    def writeFile(self, f: FileImport) -> None:
        """Write a dot-qmail file (mode 0600), unless the same text is there."""
        if os.path.lexists(f.destination):
            if _readText(f.destination) != f.text:
                raise _Conflict(f"{f.destination} exists with other content")
            return
        folder = os.path.dirname(f.destination)
        _makeFolder(folder)
        temporary = _temporaryName(folder)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(f.text.encode("utf-8", "surrogateescape"))
            os.link(temporary, f.destination)
        finally:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass


def applyPlan(store: IUserStore, plan: ImportPlan, dryRun: bool, copyMail: bool) -> ImportReport:
    """Carry out ``plan`` (see the module docstring); dry, only report.

    A dry run neither writes to ``store`` nor to the data folder; it reads the
    store to tell what would be skipped, except an SQLite database whose file
    does not exist yet (opening it would create it): that one counts as empty.
    """
    report = ImportReport(
        plan.root,
        plan.data,
        dryRun,
        copyMail,
        warnings=list(plan.warnings),
        errors=list(plan.errors),
    )
    view: IUserStore | None = store
    if dryRun and isinstance(store, SQLiteUserStore) and not os.path.exists(store.path):
        view = None
    applier = _Applier(store, view, report, plan.data)
    applier.run(plan)
    report.rewrites = [r for r in plan.rewrites if r.path in applier.used]
    if applier.wrote:
        os.sync()
    return report


def runImport(
    store: IUserStore, data: str, root: str, dryRun: bool, copyMail: bool
) -> ImportReport:
    """Import the vpopmail tree at ``root`` into ``store`` and ``<data>/domains``."""
    return applyPlan(store, scanTree(root, data), dryRun=dryRun, copyMail=copyMail)
