"""Reading a vpopmail tree into an ImportPlan: ``scanTree``. Writes nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from qmailtx.vdomain.layout import BadName, domainFolder, userFolder
from qmailtx.vdomain.records import Alias, CatchAll, CatchAllAction, Domain
from qmailtx.vdomain.vpopmail.files import countMail, problem, readText
from qmailtx.vdomain.vpopmail.parse import (
    VpasswdEntry,
    VpopmailFormatError,
    aliasNameOf,
    checkName,
    dotQmailLines,
    parseVdelivermailInstruction,
    parseVpasswdLine,
)
from qmailtx.vdomain.vpopmail.plan import (
    AliasImport,
    DomainImport,
    FileImport,
    ImportPlan,
    MailStats,
    UserImport,
)
from qmailtx.vdomain.vpopmail.rewrite import Rewriter, lastIndex, oldHomes


def _norm(path: str) -> str:
    return os.path.normpath(path) if path else path


def _read(path: str, plan: ImportPlan) -> str | None:
    """A file's text (see readText), or None with the error noted in ``plan``."""
    try:
        return readText(path)
    except OSError as e:
        plan.errors.append(problem(path, e))
        return None


def _names(folder: str, plan: ImportPlan) -> list[str]:
    """A folder's names, sorted; none, with the error noted in ``plan``."""
    try:
        return sorted(os.listdir(folder))
    except OSError as e:
        plan.errors.append(problem(folder, e))
        return []


def _visible(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _sortEntry(
    entry: os.DirEntry[str], folders: list[tuple[str, str]], links: list[tuple[str, str]]
) -> str:
    """Add a domain folder to ``folders``, a link to a folder to ``links``;
    which it was: ``domain``, ``link``, ``folder`` (any other) or ``""`` (no folder)."""
    if not entry.is_dir():
        return ""
    if entry.is_symlink():
        links.append((entry.name, entry.path))
        return "link"
    if os.path.isfile(os.path.join(entry.path, "vpasswd")):
        folders.append((entry.name, entry.path))
        return "domain"
    return "folder"


def _findDomains(
    domainsDir: str, plan: ImportPlan
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(folder name, path) of the domain folders, and (name, path) of symbolic
    links to folders, in ``domainsDir`` and one level further down."""
    folders: list[tuple[str, str]] = []
    links: list[tuple[str, str]] = []
    for entry in _visible(domainsDir):
        if _sortEntry(entry, folders, links) == "folder":
            inside = [_sortEntry(inner, folders, links) for inner in _visible(entry.path)]
            if "domain" not in inside and "." in entry.name:
                plan.warnings.append(f"{entry.path}: no vpasswd file, not imported")
    return folders, links


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
    text = _read(path, plan)
    if text is None:
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
            i = lastIndex(parts, folderName)
            if i is not None:
                domain.prefixes.add("/".join(parts[: i + 1]))
                relative = "/".join(parts[i + 1 :])
        candidates = [*oldPaths, os.path.join(domain.folder, relative)]
        candidates.append(os.path.join(domain.folder, name))
        found = next((c for c in candidates if os.path.isdir(os.path.join(c, "Maildir"))), None)
        if found is None:
            found = next((c for c in candidates if os.path.isdir(c)), None)
        domain.entries.append(_Entry(entry, source, tuple(oldPaths), relative, found))


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
        plan.errors.append(problem(domainsDir, e))
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
            checkName(name, "domain name")
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
    rewriter = Rewriter(moves, oldHomes({p for d in domains for p in d.prefixes}), plan)

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


def _scanDomain(domain: _Domain, rewriter: Rewriter, plan: ImportPlan) -> DomainImport:
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
                text = _read(path, plan)
                if text is None:
                    continue
                text = rewriter.text(path, text, f"{user.address}'s {name}")
                files.append(FileImport(path, os.path.join(newFolder, name), text))
            candidate = os.path.join(e.folder, "Maildir")
            if os.path.isdir(candidate):
                maildir = candidate
                try:
                    stats = countMail(candidate)
                except OSError as error:
                    plan.errors.append(problem(candidate, error))
        users.append(UserImport(user, e.source, maildir, stats, tuple(files)))
    clear = any(u.user.clearSecret is not None for u in users)
    result = DomainImport(Domain(domain.name, catchall, clear), domain.folder, users)

    names = _names(domain.folder, plan)
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
        text = _read(path, plan)
        if text is None:
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
        text = readText(path)
        parsed = parseVdelivermailInstruction(text)
    except OSError as e:
        plan.errors.append(problem(path, e))
        return CatchAll()
    except VpopmailFormatError as e:
        plan.warnings.append(f"{path}: {e}; {fallback}")
        return CatchAll()
    lines = [line for _, line in dotQmailLines(text)]
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
    return [
        name
        for name in _names(folder, plan)
        if (name == ".qmail" or name.startswith(".qmail-"))
        and os.path.isfile(os.path.join(folder, name))
        and not os.path.islink(os.path.join(folder, name))
    ]
