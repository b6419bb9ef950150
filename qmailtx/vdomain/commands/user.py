"""``qmailctl user ...``: mailbox users, their passwords, quotas, flags, vacation."""

from __future__ import annotations

import argparse
import os

from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.vdomain.commands.context import (
    EXIT_USAGE,
    CommandError,
    Context,
    Result,
    changed,
    giveToServer,
)
from qmailtx.vdomain.commands.describe import describeQuota, flagNames, quotaJson, userJson
from qmailtx.vdomain.commands.inputs import (
    checkNewName,
    domainName,
    existingUser,
    hostedDomain,
    mailboxOf,
    quotaLimit,
    readPassword,
)
from qmailtx.vdomain.layout import maildirOf, userFolder
from qmailtx.vdomain.passwords import hashPassword
from qmailtx.vdomain.records import CatchAllAction, User, UserFlags, Vacation
from qmailtx.vdomain.userlock import retireFolder


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


def userAdd(ctx: Context, args: argparse.Namespace) -> Result:
    name, domain = mailboxOf(ctx, args.address)
    checkNewName(name, "a user")
    address = f"{name}@{domain.name}"
    quota = quotaLimit(args.quota) if args.quota is not None else None
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
        password = readPassword(ctx)
        passwordHash = hashPassword(password)
        clearSecret = password if domain.clearPasswords else None
    ctx.store.addUser(
        User(name, domain.name, passwordHash, clearSecret, quota, UserFlags(0), args.name)
    )
    maildir = maildirOf(ctx.data, name, domain.name).path
    try:
        makeMaildir(FileSystem(), maildir)
        parents = [os.path.dirname(os.path.dirname(folder)), os.path.dirname(folder)]
        giveToServer(ctx.data, parents, tree=folder)
    except OSError as e:
        ctx.store.deleteUser(name, domain.name)
        raise CommandError(f"cannot make the Maildir {maildir}: {e.strerror or e}") from None
    if not passwordHash:
        ctx.warn(f"note: {address} has no password and cannot log in (set one: user passwd)")
    return changed(
        [f"added user {address} ({'quota ' if quota else ''}{describeQuota(quota)})"],
        address=address,
        quota=quotaJson(quota),
        maildir=maildir,
        hasPassword=bool(passwordHash),
    )


def userDel(ctx: Context, args: argparse.Namespace) -> Result:
    user = existingUser(ctx, args.address)
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
    return changed(lines, address=user.address, keptIn=kept if args.keep_mail else None)


def userPasswd(ctx: Context, args: argparse.Namespace) -> Result:
    user = existingUser(ctx, args.address)
    domain = hostedDomain(ctx, user.domain)
    password = readPassword(ctx)
    clearSecret = password if domain.clearPasswords else None
    ctx.store.setPassword(user.name, user.domain, hashPassword(password), clearSecret)
    return changed([f"changed the password of {user.address}"], address=user.address)


def userQuota(ctx: Context, args: argparse.Namespace) -> Result:
    user = existingUser(ctx, args.address)
    quota = quotaLimit(args.size)
    ctx.store.setQuota(user.name, user.domain, quota)
    return changed(
        [f"quota of {user.address}: {describeQuota(quota)}"],
        address=user.address,
        quota=quotaJson(quota),
    )


def userInfo(ctx: Context, args: argparse.Namespace) -> Result:
    user = existingUser(ctx, args.address)
    vacation = ctx.store.vacation(user.name, user.domain)
    maildir = maildirOf(ctx.data, user.name, user.domain).path
    usage = _maildirUsage(maildir)
    info = userJson(user)
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
        f"quota: {describeQuota(user.quota)}",
        f"flags: {', '.join(flagNames(user.flags)) or '-'}",
        f"password: {'set' if user.passwordHash else 'none (cannot log in)'}",
        f"clear secret: {'kept' if user.clearSecret is not None else 'no'}",
        f"vacation: {'off' if vacation is None else 'on: ' + vacation.subject}",
        f"maildir: {maildir}",
    ]
    if usage is not None:
        lines.append(f"usage: {usage[0]} bytes in {usage[1]} messages")
    return Result(lines, info)


def userList(ctx: Context, args: argparse.Namespace) -> Result:
    domain = hostedDomain(ctx, domainName(args.domain))
    users = ctx.store.users(domain.name)
    return Result([u.address for u in users], [userJson(u) for u in users])


def _flagByName(text: str) -> UserFlags:
    key = text.strip().upper().replace("-", "_")
    try:
        return UserFlags[key]
    except KeyError:
        known = ", ".join(f.name.lower() for f in UserFlags if f.name)
        raise CommandError(f"unknown flag: {text!r} (known: {known})") from None


def userFlags(ctx: Context, args: argparse.Namespace) -> Result:
    user = existingUser(ctx, args.address)
    flags = UserFlags(user.flags)
    for name in args.set:
        flags |= _flagByName(name)
    for name in args.clear:
        flags &= ~_flagByName(name)
    if args.set or args.clear:
        ctx.store.setFlags(user.name, user.domain, int(flags))
    names = flagNames(flags)
    return changed(
        [f"flags of {user.address}: {', '.join(names) or '-'}"], address=user.address, flags=names
    )


def userVacation(ctx: Context, args: argparse.Namespace) -> Result:
    user = existingUser(ctx, args.address)
    if args.off:
        if args.subject is not None or args.period is not None:
            raise CommandError("--off takes no --subject or --period", EXIT_USAGE)
        ctx.store.setVacation(user.name, user.domain, None)
        return changed([f"vacation of {user.address}: off"], address=user.address, vacation=None)
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
    return changed(
        [f"vacation of {user.address}: on ({subject!r}, once per {days} days per sender)"],
        address=user.address,
        vacation={"subject": subject, "period": vacation.period},
    )
