"""``qmailctl domain ...``: hosted domains, alias domains, catch-alls."""

from __future__ import annotations

import argparse
import os

from qmailtx.vdomain.commands.context import (
    EXIT_USAGE,
    CommandError,
    Context,
    Result,
    changed,
    giveToServer,
)
from qmailtx.vdomain.commands.describe import catchAllJson, domainJson
from qmailtx.vdomain.commands.inputs import domainName, mailAddress, ownDomain
from qmailtx.vdomain.layout import domainFolder
from qmailtx.vdomain.records import CatchAll, CatchAllAction, Domain
from qmailtx.vdomain.userlock import retireFolder


def domainAdd(ctx: Context, args: argparse.Namespace) -> Result:
    name = domainName(args.domain)
    taken = ctx.store.canonicalDomain(name)
    if taken == name:
        raise CommandError(f"domain exists already: {name}")
    if taken is not None:
        raise CommandError(f"{name} exists already as an alias domain of {taken}")
    folder = domainFolder(ctx.data, name).path
    ctx.store.addDomain(Domain(name, clearPasswords=args.clear_passwords))
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        giveToServer(ctx.data, [os.path.dirname(folder), folder])
    except OSError as e:
        ctx.store.deleteDomain(name)
        raise CommandError(f"cannot make the domain folder {folder}: {e.strerror}") from None
    if name in ctx.config.control.locals:
        ctx.warn(f"note: {name} is also in control/locals; the user database now serves it")
    extra = " (clear passwords kept)" if args.clear_passwords else ""
    return changed(
        [f"added domain {name}{extra}"],
        domain=name,
        folder=folder,
        clearPasswords=args.clear_passwords,
    )


def _retireUserFolders(ctx: Context, domain: str, folder: str, keep: bool) -> None:
    trash = os.path.join(ctx.data, "deleted", domain)
    with os.scandir(folder) as entries:
        users = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    for path in sorted(users):
        if not os.path.basename(path).startswith("."):
            retireFolder(path, trash, keep=keep)


def domainDel(ctx: Context, args: argparse.Namespace) -> Result:
    domain = ownDomain(ctx, args.domain)
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
    return changed(
        lines,
        domain=domain.name,
        aliases=list(domain.aliases),
        keptIn=kept if args.keep_mail else None,
    )


def domainList(ctx: Context, args: argparse.Namespace) -> Result:
    domains = ctx.store.domains()
    lines = []
    for d in domains:
        lines.append(d.name + (f" (aliases: {', '.join(d.aliases)})" if d.aliases else ""))
    return Result(lines, [domainJson(d) for d in domains])


def domainInfo(ctx: Context, args: argparse.Namespace) -> Result:
    domain = ownDomain(ctx, args.domain)
    users = ctx.store.users(domain.name)
    aliases = ctx.store.aliases(domain.name)
    folder = domainFolder(ctx.data, domain.name).path
    info = domainJson(domain)
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
    return Result(lines, info)


def domainAlias(ctx: Context, args: argparse.Namespace) -> Result:
    alias = domainName(args.alias)
    domain = ownDomain(ctx, args.domain)
    taken = ctx.store.canonicalDomain(alias)
    if taken is not None:
        what = "a domain" if taken == alias else f"an alias domain of {taken}"
        raise CommandError(f"{alias} exists already as {what}")
    ctx.store.addAliasDomain(alias, domain.name)
    return changed(
        [f"added alias domain {alias} -> {domain.name}"], alias=alias, domain=domain.name
    )


def domainUnalias(ctx: Context, args: argparse.Namespace) -> Result:
    alias = domainName(args.alias)
    canonical = ctx.store.canonicalDomain(alias)
    if canonical == alias:
        raise CommandError(f"{alias} is a domain, not an alias domain (use: domain del)")
    if canonical is None:
        raise CommandError(f"no such alias domain: {alias}")
    ctx.store.deleteAliasDomain(alias)
    return changed(
        [f"deleted alias domain {alias} (of {canonical})"], alias=alias, domain=canonical
    )


def domainCatchAll(ctx: Context, args: argparse.Namespace) -> Result:
    domain = ownDomain(ctx, args.domain)
    action = CatchAllAction(args.mode)
    target: str = args.target or ""
    if action in (CatchAllAction.BOUNCE, CatchAllAction.DELETE):
        if target:
            raise CommandError(f"catchall {action.value} takes no target", EXIT_USAGE)
    elif not target:
        what = "an ADDRESS" if action is CatchAllAction.FORWARD else "a USER of the domain"
        raise CommandError(f"catchall {action.value} needs {what}", EXIT_USAGE)
    elif action is CatchAllAction.FORWARD:
        target = str(mailAddress(target))
    else:
        local, _, at = target.strip().lower().partition("@")
        if at and ctx.store.canonicalDomain(at) != domain.name:
            raise CommandError(f"the catch-all mailbox must be a user of {domain.name}")
        if ctx.store.user(local, domain.name) is None:
            raise CommandError(f"no such user: {local}@{domain.name}")
        target = local
    catchall = CatchAll(action, target)
    ctx.store.setCatchAll(domain.name, catchall)
    return changed(
        [f"catchall of {domain.name}: {catchall}"],
        domain=domain.name,
        catchall=catchAllJson(catchall),
    )


def domainClearPasswords(ctx: Context, args: argparse.Namespace) -> Result:
    domain = ownDomain(ctx, args.domain)
    enabled = args.setting == "on"
    ctx.store.setClearPasswords(domain.name, enabled)
    if enabled:
        ctx.warn("note: only passwords set from now on are kept in clear")
    word = "kept" if enabled else "not kept"
    return changed(
        [f"clear passwords of {domain.name}: {word}"], domain=domain.name, clearPasswords=enabled
    )
