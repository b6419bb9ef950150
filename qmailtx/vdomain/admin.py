"""qmailctl: vpopmail's vadddomain/vadduser/valias jobs over the user database.

``qmailctl [--config FILE] [--json] COMMAND ...``::

    domain add D [--clear-passwords]       domain del D [--keep-mail]
    domain list                            domain info D
    domain alias ALIAS D                   domain unalias ALIAS
    domain catchall D bounce-no-mailbox|delete|forward ADDRESS|mailbox USER
    domain clear-passwords D on|off
    user add U@D [--password-stdin] [--quota SIZE] [--name GECOS]
    user del U@D [--keep-mail]             user passwd U@D --password-stdin
    user quota U@D SIZE                    user info U@D
    user list D                            user flags U@D [--set F] [--clear F]
    user vacation U@D --subject S (--message-file F | --message-stdin) [--period DAYS]
    user vacation U@D --off
    alias add A@D TARGET...                alias del A@D [TARGET]
    alias list D
    import-vpopmail DIR [--dry-run] [--no-mail]

Without ``--config`` the built-in defaults apply (data in ``./var``). Every
change is written to the user database at once, in its own short
transaction; a running server sees it at its next lookup. A deleted
mailbox is moved out of the live tree with ``retireFolder`` (which waits
for deliveries in progress) into ``<data>/deleted/``, and removed unless
``--keep-mail``. Passwords are read from the first line of standard input
and never printed; neither are hashes. Run as root, qmailctl hands the
folders and database files it creates to the owner of the data folder (the
server's account), as vpopmail does for vpopmail:vchkpw.

With ``--json`` (before or after the command) stdout carries one JSON value:
an array for lists, an object for ``info``, ``{"ok": true, ...}`` for a
change, and ``{"error": "..."}`` for a failure. Notes for people (such as
"this account has no password") always go to stderr.

Exit codes:

- 0: done.
- 1: refused: bad input (address, domain name, quota), unknown domain, user
  or alias, an existing name, a configuration error, a file error.
- 2: usage error (unknown command, missing argument).
- 111: the user database is unavailable (temporary; try again).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

from qmailtx.address import Address, AddressError, normaliseDomain, parseMailbox
from qmailtx.config import Config, ConfigError, defaultConfig, loadConfig
from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.vdomain.interfaces import DatabaseUnavailable, IUserStore, UserDatabaseError
from qmailtx.vdomain.layout import BadName, domainFolder, maildirOf, userFolder
from qmailtx.vdomain.passwords import hashPassword
from qmailtx.vdomain.records import (
    Alias,
    CatchAll,
    CatchAllAction,
    Domain,
    QuotaError,
    QuotaLimit,
    User,
    UserFlags,
    Vacation,
    parseQuota,
)
from qmailtx.vdomain.sqlite import SQLiteUserStore
from qmailtx.vdomain.userlock import retireFolder

PROG = "qmailctl"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMPORARY = 111

# New user and alias names: vpopmail allows more, but these are safe as
# folder names, in .qmail file names and on every client.
_NAME = re.compile(r"[a-z0-9_][a-z0-9._+=-]{0,63}\Z")
_DOT_QMAIL_PREFIXES = ("/", "./", "|", "&")


class CommandError(Exception):
    """A refused request; the message is shown as ``qmailctl: <message>``."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


class _UsageError(Exception):
    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises on bad usage instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.format_usage(), f"{self.prog}: error: {message}")


@dataclass
class _Result:
    """What a command reports: lines for people, a JSON value for --json."""

    lines: list[str]
    data: Any
    code: int = EXIT_OK


@dataclass
class _Context:
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
                _giveToServer(self.data, files)
            except OSError as e:
                self.warn(f"cannot hand {database} to the server's account: {e.strerror or e}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.stderr.write(f"{PROG}: {text}\n")


Handler = Callable[[_Context, argparse.Namespace], _Result]


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


def _giveToServer(data: str, paths: list[str], tree: str | None = None) -> None:
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


# -- names, addresses and other input ----------------------------------------


def _domainName(text: str) -> str:
    """A domain name as typed on the command line, checked and lower-cased."""
    try:
        name = normaliseDomain(text.strip())
    except AddressError as e:
        raise CommandError(f"not a domain name: {text!r} ({e})") from None
    if name.startswith("["):
        raise CommandError(f"not a domain name: {text!r} (address literals cannot be hosted)")
    try:
        domainFolder("/", name)
    except BadName as e:
        raise CommandError(str(e)) from None
    return name


def _address(text: str) -> Address:
    try:
        address = parseMailbox(text.strip())
    except AddressError as e:
        raise CommandError(f"not an address: {text!r} ({e})") from None
    if not address.domain:
        raise CommandError(f"not an address: {text!r} (the domain is missing)")
    return address


def _checkNewName(name: str, what: str) -> None:
    if not _NAME.match(name) or ".." in name:
        raise CommandError(
            f"not usable as {what} name: {name!r} (letters, digits and . _ - + =;"
            " starting with a letter, digit or _; at most 64 characters)"
        )


def _hostedDomain(ctx: _Context, name: str) -> Domain:
    """The hosted domain ``name`` is or is an alias of (NoSuchDomain otherwise)."""
    canonical = ctx.store.canonicalDomain(name)
    domain = None if canonical is None else ctx.store.domain(canonical)
    if domain is None:
        raise CommandError(f"no such domain: {name}")
    return domain


def _ownDomain(ctx: _Context, text: str) -> Domain:
    """A hosted domain by its own name (an alias domain is refused, with a hint)."""
    name = _domainName(text)
    domain = _hostedDomain(ctx, name)
    if domain.name != name:
        raise CommandError(f"{name} is an alias domain of {domain.name}")
    return domain


def _mailboxOf(ctx: _Context, text: str) -> tuple[str, Domain]:
    """``user@domain`` -> (lower-cased local part, hosted domain)."""
    address = _address(text)
    return address.local.lower(), _hostedDomain(ctx, address.domain)


def _existingUser(ctx: _Context, text: str) -> User:
    name, domain = _mailboxOf(ctx, text)
    user = ctx.store.user(name, domain.name)
    if user is None:
        raise CommandError(f"no such user: {name}@{domain.name}")
    return user


def _readPassword(ctx: _Context) -> str:
    line = ctx.stdin.readline()
    if not line:
        raise CommandError("no password on standard input")
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    if not line:
        raise CommandError("the password on standard input is empty")
    return line


def _quota(text: str) -> QuotaLimit | None:
    try:
        return parseQuota(text)
    except QuotaError as e:
        raise CommandError(str(e)) from None


def _dotQmailTarget(text: str) -> str:
    """An alias target as stored: a dot-qmail line; a bare address becomes ``&address``."""
    target = text.strip()
    if not target or any(c in target for c in "\r\n\0"):
        raise CommandError(f"not an alias target: {text!r}")
    if target.startswith("&"):
        return "&" + str(_address(target[1:]))
    if target.startswith(_DOT_QMAIL_PREFIXES):
        return target
    return "&" + str(_address(target))


# -- descriptions --------------------------------------------------------------


def _describeBytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n} bytes"


def _describeQuota(quota: QuotaLimit | None) -> str:
    if quota is None or quota.unlimited:
        return "no quota"
    parts = []
    if quota.bytes is not None:
        parts.append(_describeBytes(quota.bytes))
    if quota.count is not None:
        parts.append(f"{quota.count} messages")
    return ", ".join(parts)


def _quotaJson(quota: QuotaLimit | None) -> dict[str, Any] | None:
    if quota is None or quota.unlimited:
        return None
    return {"bytes": quota.bytes, "count": quota.count, "maildirsize": str(quota)}


def _flagNames(flags: int) -> list[str]:
    return [f.name.lower() for f in UserFlags if f.name and flags & f]


def _catchAllJson(catchall: CatchAll) -> dict[str, str]:
    return {"action": catchall.action.value, "target": catchall.target}


def _domainJson(domain: Domain) -> dict[str, Any]:
    return {
        "name": domain.name,
        "aliases": list(domain.aliases),
        "catchall": _catchAllJson(domain.catchall),
        "clearPasswords": domain.clearPasswords,
    }


def _userJson(user: User) -> dict[str, Any]:
    return {
        "address": user.address,
        "name": user.name,
        "domain": user.domain,
        "gecos": user.gecos,
        "quota": _quotaJson(user.quota),
        "flags": _flagNames(user.flags),
        "hasPassword": bool(user.passwordHash),
        "hasClearSecret": user.clearSecret is not None,
    }


def _maildirUsage(maildir: str) -> tuple[int, int] | None:
    """(bytes, messages) from ``maildirsize``, or None without one."""
    try:
        with open(os.path.join(maildir, "maildirsize"), encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    size = count = 0
    for line in lines:
        parts = line.split()
        if len(parts) >= 2:
            try:
                size += int(parts[0])
                count += int(parts[1])
            except ValueError:
                continue
    return size, count


def _changed(lines: list[str], **fields: Any) -> _Result:
    return _Result(lines, {"ok": True, **fields})


# -- domain commands -------------------------------------------------------------


def _domainAdd(ctx: _Context, args: argparse.Namespace) -> _Result:
    name = _domainName(args.domain)
    taken = ctx.store.canonicalDomain(name)
    if taken == name:
        raise CommandError(f"domain exists already: {name}")
    if taken is not None:
        raise CommandError(f"{name} exists already as an alias domain of {taken}")
    folder = domainFolder(ctx.data, name).path
    ctx.store.addDomain(Domain(name, clearPasswords=args.clear_passwords))
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        _giveToServer(ctx.data, [os.path.dirname(folder), folder])
    except OSError as e:
        ctx.store.deleteDomain(name)
        raise CommandError(f"cannot make the domain folder {folder}: {e.strerror}") from None
    if name in ctx.config.control.locals:
        ctx.warn(f"note: {name} is also in control/locals; the user database now serves it")
    extra = " (clear passwords kept)" if args.clear_passwords else ""
    return _changed(
        [f"added domain {name}{extra}"],
        domain=name,
        folder=folder,
        clearPasswords=args.clear_passwords,
    )


def _retireUserFolders(ctx: _Context, domain: str, folder: str, keep: bool) -> None:
    trash = os.path.join(ctx.data, "deleted", domain)
    with os.scandir(folder) as entries:
        users = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    for path in sorted(users):
        if not os.path.basename(path).startswith("."):
            retireFolder(path, trash, keep=keep)


def _domainDel(ctx: _Context, args: argparse.Namespace) -> _Result:
    domain = _ownDomain(ctx, args.domain)
    folder = domainFolder(ctx.data, domain.name).path
    ctx.store.deleteDomain(domain.name)
    lines = [f"deleted domain {domain.name}"]
    kept: str | None = None
    if os.path.isdir(folder):
        try:
            # Each mailbox first, so deliveries in progress are waited for.
            _retireUserFolders(ctx, domain.name, folder, args.keep_mail)
            kept = retireFolder(folder, os.path.join(ctx.data, "deleted"), keep=args.keep_mail)
        except OSError as e:
            raise CommandError(
                f"deleted domain {domain.name} from the database, but could not retire"
                f" its folder {folder}: {e.strerror or e}"
            ) from None
        if args.keep_mail:
            users = os.path.join(ctx.data, "deleted", domain.name)
            lines.append(f"mailboxes kept in {users}, domain files in {kept}")
    else:
        lines.append(f"(it had no folder {folder})")
    return _changed(
        lines,
        domain=domain.name,
        aliases=list(domain.aliases),
        keptIn=kept if args.keep_mail else None,
    )


def _domainList(ctx: _Context, args: argparse.Namespace) -> _Result:
    domains = ctx.store.domains()
    lines = []
    for d in domains:
        lines.append(d.name + (f" (aliases: {', '.join(d.aliases)})" if d.aliases else ""))
    return _Result(lines, [_domainJson(d) for d in domains])


def _domainInfo(ctx: _Context, args: argparse.Namespace) -> _Result:
    domain = _ownDomain(ctx, args.domain)
    users = ctx.store.users(domain.name)
    aliases = ctx.store.aliases(domain.name)
    folder = domainFolder(ctx.data, domain.name).path
    info = _domainJson(domain)
    info.update(users=len(users), valiases=len(aliases), folder=folder)
    lines = [
        f"domain: {domain.name}",
        f"aliases: {', '.join(domain.aliases) or '-'}",
        f"catchall: {domain.catchall}",
        f"clear passwords: {'yes' if domain.clearPasswords else 'no'}",
        f"users: {len(users)}",
        f"valiases: {len(aliases)}",
        f"folder: {folder}",
    ]
    return _Result(lines, info)


def _domainAlias(ctx: _Context, args: argparse.Namespace) -> _Result:
    alias = _domainName(args.alias)
    domain = _ownDomain(ctx, args.domain)
    taken = ctx.store.canonicalDomain(alias)
    if taken is not None:
        what = "a domain" if taken == alias else f"an alias domain of {taken}"
        raise CommandError(f"{alias} exists already as {what}")
    ctx.store.addAliasDomain(alias, domain.name)
    return _changed(
        [f"added alias domain {alias} -> {domain.name}"], alias=alias, domain=domain.name
    )


def _domainUnalias(ctx: _Context, args: argparse.Namespace) -> _Result:
    alias = _domainName(args.alias)
    canonical = ctx.store.canonicalDomain(alias)
    if canonical == alias:
        raise CommandError(f"{alias} is a domain, not an alias domain (use: domain del)")
    if canonical is None:
        raise CommandError(f"no such alias domain: {alias}")
    ctx.store.deleteAliasDomain(alias)
    return _changed(
        [f"deleted alias domain {alias} (of {canonical})"], alias=alias, domain=canonical
    )


def _domainCatchAll(ctx: _Context, args: argparse.Namespace) -> _Result:
    domain = _ownDomain(ctx, args.domain)
    action = CatchAllAction(args.mode)
    target: str = args.target or ""
    if action in (CatchAllAction.BOUNCE, CatchAllAction.DELETE):
        if target:
            raise CommandError(f"catchall {action.value} takes no target", EXIT_USAGE)
    elif not target:
        what = "an ADDRESS" if action is CatchAllAction.FORWARD else "a USER of the domain"
        raise CommandError(f"catchall {action.value} needs {what}", EXIT_USAGE)
    elif action is CatchAllAction.FORWARD:
        target = str(_address(target))
    else:
        local, _, at = target.strip().lower().partition("@")
        if at and ctx.store.canonicalDomain(at) != domain.name:
            raise CommandError(f"the catch-all mailbox must be a user of {domain.name}")
        if ctx.store.user(local, domain.name) is None:
            raise CommandError(f"no such user: {local}@{domain.name}")
        target = local
    catchall = CatchAll(action, target)
    ctx.store.setCatchAll(domain.name, catchall)
    return _changed(
        [f"catchall of {domain.name}: {catchall}"],
        domain=domain.name,
        catchall=_catchAllJson(catchall),
    )


def _domainClearPasswords(ctx: _Context, args: argparse.Namespace) -> _Result:
    domain = _ownDomain(ctx, args.domain)
    enabled = args.setting == "on"
    ctx.store.setClearPasswords(domain.name, enabled)
    if enabled:
        ctx.warn("note: only passwords set from now on are kept in clear")
    word = "kept" if enabled else "not kept"
    return _changed(
        [f"clear passwords of {domain.name}: {word}"], domain=domain.name, clearPasswords=enabled
    )


# -- user commands ---------------------------------------------------------------


def _userAdd(ctx: _Context, args: argparse.Namespace) -> _Result:
    name, domain = _mailboxOf(ctx, args.address)
    _checkNewName(name, "a user")
    address = f"{name}@{domain.name}"
    quota = _quota(args.quota) if args.quota is not None else None
    if any(c in args.name for c in "\r\n\0:"):
        raise CommandError("--name cannot hold line breaks, NUL or ':'")
    if ctx.store.user(name, domain.name) is not None:
        raise CommandError(f"{address} exists already")
    if ctx.store.alias(name, domain.name) is not None:
        raise CommandError(f"{address} exists already as an alias")
    folder = userFolder(ctx.data, name, domain.name).path
    if os.path.lexists(folder):
        raise CommandError(
            f"{folder} exists already (mail of an earlier {address}?); move it away first"
        )
    passwordHash, clearSecret = "", None
    if args.password_stdin:
        password = _readPassword(ctx)
        passwordHash = hashPassword(password)
        clearSecret = password if domain.clearPasswords else None
    ctx.store.addUser(
        User(name, domain.name, passwordHash, clearSecret, quota, UserFlags(0), args.name)
    )
    maildir = maildirOf(ctx.data, name, domain.name).path
    try:
        makeMaildir(FileSystem(), maildir)
        parents = [os.path.dirname(os.path.dirname(folder)), os.path.dirname(folder)]
        _giveToServer(ctx.data, parents, tree=folder)
    except OSError as e:
        ctx.store.deleteUser(name, domain.name)
        raise CommandError(f"cannot make the Maildir {maildir}: {e.strerror or e}") from None
    if not passwordHash:
        ctx.warn(f"note: {address} has no password and cannot log in (set one: user passwd)")
    return _changed(
        [f"added user {address} ({'quota ' if quota else ''}{_describeQuota(quota)})"],
        address=address,
        quota=_quotaJson(quota),
        maildir=maildir,
        hasPassword=bool(passwordHash),
    )


def _userDel(ctx: _Context, args: argparse.Namespace) -> _Result:
    user = _existingUser(ctx, args.address)
    domain = ctx.store.domain(user.domain)
    folder = userFolder(ctx.data, user.name, user.domain).path
    ctx.store.deleteUser(user.name, user.domain)
    lines = [f"deleted user {user.address}"]
    kept: str | None = None
    if os.path.isdir(folder):
        trash = os.path.join(ctx.data, "deleted", user.domain)
        try:
            kept = retireFolder(folder, trash, keep=args.keep_mail)
        except OSError as e:
            raise CommandError(
                f"deleted {user.address} from the database, but could not retire"
                f" its folder {folder}: {e.strerror or e}"
            ) from None
        if args.keep_mail:
            lines.append(f"mail kept in {kept}")
    else:
        lines.append(f"(it had no folder {folder})")
    if (
        domain is not None
        and domain.catchall.action is CatchAllAction.MAILBOX
        and domain.catchall.target == user.name
    ):
        ctx.warn(
            f"note: {user.address} was the catch-all mailbox of {user.domain}: mail for"
            f" unknown users there is deferred until you change it (domain catchall)"
        )
    return _changed(lines, address=user.address, keptIn=kept if args.keep_mail else None)


def _userPasswd(ctx: _Context, args: argparse.Namespace) -> _Result:
    user = _existingUser(ctx, args.address)
    domain = _hostedDomain(ctx, user.domain)
    password = _readPassword(ctx)
    clearSecret = password if domain.clearPasswords else None
    ctx.store.setPassword(user.name, user.domain, hashPassword(password), clearSecret)
    return _changed([f"changed the password of {user.address}"], address=user.address)


def _userQuota(ctx: _Context, args: argparse.Namespace) -> _Result:
    user = _existingUser(ctx, args.address)
    quota = _quota(args.size)
    ctx.store.setQuota(user.name, user.domain, quota)
    return _changed(
        [f"quota of {user.address}: {_describeQuota(quota)}"],
        address=user.address,
        quota=_quotaJson(quota),
    )


def _userInfo(ctx: _Context, args: argparse.Namespace) -> _Result:
    user = _existingUser(ctx, args.address)
    vacation = ctx.store.vacation(user.name, user.domain)
    maildir = maildirOf(ctx.data, user.name, user.domain).path
    usage = _maildirUsage(maildir)
    info = _userJson(user)
    info.update(
        maildir=maildir,
        vacation=None
        if vacation is None
        else {"subject": vacation.subject, "period": vacation.period},
        usage=None if usage is None else {"bytes": usage[0], "count": usage[1]},
    )
    lines = [
        f"address: {user.address}",
        f"name: {user.gecos}",
        f"domain: {user.domain}",
        f"quota: {_describeQuota(user.quota)}",
        f"flags: {', '.join(_flagNames(user.flags)) or '-'}",
        f"password: {'set' if user.passwordHash else 'none (cannot log in)'}",
        f"clear secret: {'kept' if user.clearSecret is not None else 'no'}",
        f"vacation: {'off' if vacation is None else 'on: ' + vacation.subject}",
        f"maildir: {maildir}",
    ]
    if usage is not None:
        lines.append(f"usage: {usage[0]} bytes in {usage[1]} messages")
    return _Result(lines, info)


def _userList(ctx: _Context, args: argparse.Namespace) -> _Result:
    domain = _hostedDomain(ctx, _domainName(args.domain))
    users = ctx.store.users(domain.name)
    return _Result([u.address for u in users], [_userJson(u) for u in users])


def _flagByName(text: str) -> UserFlags:
    key = text.strip().upper().replace("-", "_")
    try:
        return UserFlags[key]
    except KeyError:
        known = ", ".join(f.name.lower() for f in UserFlags if f.name)
        raise CommandError(f"unknown flag: {text!r} (known: {known})") from None


def _userFlags(ctx: _Context, args: argparse.Namespace) -> _Result:
    user = _existingUser(ctx, args.address)
    flags = UserFlags(user.flags)
    for name in args.set:
        flags |= _flagByName(name)
    for name in args.clear:
        flags &= ~_flagByName(name)
    if args.set or args.clear:
        ctx.store.setFlags(user.name, user.domain, int(flags))
    names = _flagNames(flags)
    return _changed(
        [f"flags of {user.address}: {', '.join(names) or '-'}"], address=user.address, flags=names
    )


def _userVacation(ctx: _Context, args: argparse.Namespace) -> _Result:
    user = _existingUser(ctx, args.address)
    if args.off:
        if args.subject is not None or args.period is not None:
            raise CommandError("--off takes no --subject or --period", EXIT_USAGE)
        ctx.store.setVacation(user.name, user.domain, None)
        return _changed([f"vacation of {user.address}: off"], address=user.address, vacation=None)
    if args.subject is None or (args.message_file is None and not args.message_stdin):
        raise CommandError(
            "user vacation needs --subject and --message-file or --message-stdin (or --off)",
            EXIT_USAGE,
        )
    subject = args.subject.strip()
    if not subject or any(c in subject for c in "\r\n\0"):
        raise CommandError("the subject must be one non-empty line")
    days = 7 if args.period is None else args.period
    if days < 1:
        raise CommandError("--period must be at least 1 day")
    if args.message_stdin:
        body = ctx.stdin.read()
    else:
        try:
            with open(args.message_file, encoding="utf-8") as f:
                body = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CommandError(f"cannot read {args.message_file}: {e}") from None
    vacation = Vacation(subject, body, days * 24 * 3600)
    ctx.store.setVacation(user.name, user.domain, vacation)
    return _changed(
        [f"vacation of {user.address}: on ({subject!r}, once per {days} days per sender)"],
        address=user.address,
        vacation={"subject": subject, "period": vacation.period},
    )


# -- alias (valias) commands -------------------------------------------------------


def _aliasAdd(ctx: _Context, args: argparse.Namespace) -> _Result:
    name, domain = _mailboxOf(ctx, args.address)
    address = f"{name}@{domain.name}"
    targets = tuple(_dotQmailTarget(t) for t in args.targets)
    if ctx.store.user(name, domain.name) is not None:
        raise CommandError(f"{address} is a user")
    if ctx.store.alias(name, domain.name) is None:
        _checkNewName(name, "an alias")
    ctx.store.addAlias(Alias(name, domain.name, targets))
    alias = ctx.store.alias(name, domain.name)
    now = list(alias.targets) if alias is not None else list(targets)
    return _changed([f"{address} -> {t}" for t in now], address=address, targets=now)


def _aliasDel(ctx: _Context, args: argparse.Namespace) -> _Result:
    name, domain = _mailboxOf(ctx, args.address)
    address = f"{name}@{domain.name}"
    target: str | None = args.target
    if target is not None:
        try:
            target = _dotQmailTarget(target)
        except CommandError:
            pass  # perhaps stored as typed (an imported line): looked up as it is
    existing = ctx.store.alias(name, domain.name)
    if existing is None:
        raise CommandError(f"no such alias: {address}")
    if target is not None and target not in existing.targets:
        if args.target in existing.targets:
            target = args.target
        else:
            raise CommandError(f"{address} has no target {target}")
    ctx.store.deleteAlias(name, domain.name, target)
    left = ctx.store.alias(name, domain.name)
    remaining = list(left.targets) if left is not None else []
    what = f"deleted {target} from alias {address}" if target else f"deleted alias {address}"
    return _changed([what], address=address, targets=remaining)


def _aliasList(ctx: _Context, args: argparse.Namespace) -> _Result:
    domain = _hostedDomain(ctx, _domainName(args.domain))
    aliases = ctx.store.aliases(domain.name)
    lines = [f"{a.address} -> {t}" for a in aliases for t in a.targets]
    data = [{"address": a.address, "targets": list(a.targets)} for a in aliases]
    return _Result(lines, data)


# -- import ------------------------------------------------------------------------


def _importVpopmail(ctx: _Context, args: argparse.Namespace) -> _Result:
    try:
        vpopmail = importlib.import_module("qmailtx.vdomain.vpopmail")
    except ModuleNotFoundError as e:
        if e.name != "qmailtx.vdomain.vpopmail":
            raise
        raise CommandError("import-vpopmail is not available in this installation") from None
    report = vpopmail.runImport(
        ctx.store, ctx.data, args.directory, dryRun=args.dry_run, copyMail=not args.no_mail
    )
    return _Result(list(report.lines()), report.asDict(), EXIT_OK if report.ok else EXIT_REFUSED)


# -- the parser ------------------------------------------------------------------


def _buildParser() -> _Parser:
    # Options also accepted after the command (not overriding the ones before it).
    common = _Parser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="answer in JSON"
    )
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="config file")

    parser = _Parser(
        prog=PROG,
        description="Manage hosted domains, users and aliases (vpopmail's jobs).",
        epilog="exit codes: 0 done, 1 refused, 2 usage error, 111 database unavailable",
    )
    parser.add_argument(
        "--config", metavar="FILE", default=None, help="config file (default: built-in, ./var)"
    )
    parser.add_argument("--json", action="store_true", default=False, help="answer in JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> argparse._SubParsersAction[_Parser]:
        p = commands.add_parser(name, help=help, parents=[common])
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def command(
        actions: argparse._SubParsersAction[_Parser], name: str, handler: Handler, help: str
    ) -> _Parser:
        p = actions.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(handler=handler)
        return p

    domain = group("domain", "hosted domains")
    p = command(domain, "add", _domainAdd, "add a domain and its folder")
    p.add_argument("domain")
    p.add_argument(
        "--clear-passwords", action="store_true", help="keep passwords in clear (CRAM-MD5, APOP)"
    )
    p = command(domain, "del", _domainDel, "delete a domain with its users, aliases and mail")
    p.add_argument("domain")
    p.add_argument("--keep-mail", action="store_true", help="keep the folder in <data>/deleted/")
    command(domain, "list", _domainList, "list the domains")
    p = command(domain, "info", _domainInfo, "show a domain")
    p.add_argument("domain")
    p = command(domain, "alias", _domainAlias, "make ALIAS another name of DOMAIN")
    p.add_argument("alias")
    p.add_argument("domain")
    p = command(domain, "unalias", _domainUnalias, "delete an alias domain")
    p.add_argument("alias")
    p = command(domain, "catchall", _domainCatchAll, "what mail for unknown users becomes")
    p.add_argument("domain")
    p.add_argument("mode", choices=[a.value for a in CatchAllAction])
    p.add_argument("target", nargs="?", help="forward: an ADDRESS; mailbox: a USER of the domain")
    p = command(domain, "clear-passwords", _domainClearPasswords, "keep new passwords in clear")
    p.add_argument("domain")
    p.add_argument("setting", choices=["on", "off"])

    user = group("user", "mailbox users")
    p = command(user, "add", _userAdd, "add a user and its Maildir")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    p.add_argument("--quota", metavar="SIZE", help="100MB, 104857600, 104857600S,1000C, NOQUOTA")
    p.add_argument("--name", metavar="GECOS", default="", help="the user's full name")
    p = command(user, "del", _userDel, "delete a user and its mail")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("--keep-mail", action="store_true", help="keep the folder in <data>/deleted/")
    p = command(user, "passwd", _userPasswd, "set a user's password")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the password from standard input",
    )
    p = command(user, "quota", _userQuota, "set a user's quota")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("size", metavar="SIZE")
    p = command(user, "info", _userInfo, "show a user")
    p.add_argument("address", metavar="USER@DOMAIN")
    p = command(user, "list", _userList, "list the users of a domain")
    p.add_argument("domain")
    p = command(user, "flags", _userFlags, "show or change a user's flags")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("--set", action="append", default=[], metavar="FLAG", help="e.g. no_pop")
    p.add_argument("--clear", action="append", default=[], metavar="FLAG")
    p = command(user, "vacation", _userVacation, "switch the auto-responder on or off")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("--subject", metavar="S")
    p.add_argument("--period", metavar="DAYS", type=int, help="answer a sender once per DAYS (7)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--message-file", metavar="F")
    how.add_argument("--message-stdin", action="store_true")
    how.add_argument("--off", action="store_true")

    alias = group("alias", "valiases: addresses forwarded elsewhere")
    p = command(alias, "add", _aliasAdd, "add targets to an alias")
    p.add_argument("address", metavar="ALIAS@DOMAIN")
    p.add_argument(
        "targets", nargs="+", metavar="TARGET", help="an address, /path/Maildir/, |program"
    )
    p = command(alias, "del", _aliasDel, "delete an alias, or one target of it")
    p.add_argument("address", metavar="ALIAS@DOMAIN")
    p.add_argument("target", nargs="?", metavar="TARGET")
    p = command(alias, "list", _aliasList, "list the aliases of a domain")
    p.add_argument("domain")

    p = commands.add_parser("import-vpopmail", help="import a vpopmail tree", parents=[common])
    p.set_defaults(handler=_importVpopmail)
    p.add_argument("directory", metavar="DIR", help="the vpopmail home (holding domains/)")
    p.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    p.add_argument("--no-mail", action="store_true", help="import accounts, not the mail")
    return parser


# -- main ----------------------------------------------------------------------------


def _emitJson(stdout: TextIO, value: Any) -> None:
    stdout.write(json.dumps(value, indent=None, sort_keys=False) + "\n")


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one qmailctl command; returns the exit code (see the module docstring)."""
    args_ = list(sys.argv[1:] if argv is None else argv)
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    wantJson = "--json" in args_

    def fail(message: str, code: int) -> int:
        if wantJson:
            _emitJson(stdout, {"error": message})
        else:
            stderr.write(f"{PROG}: {message}\n")
        return code

    parser = _buildParser()
    try:
        args = parser.parse_args(args_)
    except _UsageError as e:
        if wantJson:
            _emitJson(stdout, {"error": str(e)})
        stderr.write(e.usage + str(e) + "\n")
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    wantJson = args.json

    try:
        config = defaultConfig() if args.config is None else loadConfig(args.config)
    except ConfigError as e:
        return fail(str(e), EXIT_REFUSED)

    ctx = _Context(config, stdin, stderr)
    try:
        result: _Result = args.handler(ctx, args)
    except CommandError as e:
        return fail(str(e), e.code)
    except DatabaseUnavailable as e:
        return fail(f"temporary failure: {e}", EXIT_TEMPORARY)
    except (UserDatabaseError, BadName) as e:
        return fail(str(e), EXIT_REFUSED)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        return fail(f"file error{where}: {e.strerror or e}", EXIT_REFUSED)
    finally:
        ctx.close()

    if wantJson:
        data = result.data
        if ctx.warnings and isinstance(data, dict):
            data = {**data, "warnings": ctx.warnings}
        _emitJson(stdout, data)
    else:
        for line in result.lines:
            stdout.write(line + "\n")
    stdout.flush()
    return result.code


if __name__ == "__main__":
    sys.exit(main())
