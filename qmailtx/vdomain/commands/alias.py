"""``qmailctl alias ...``: valiases, addresses whose mail goes elsewhere."""

from __future__ import annotations

import argparse

from qmailtx.vdomain.commands.context import CommandError, Context, Result, changed
from qmailtx.vdomain.commands.inputs import (
    checkNewName,
    domainName,
    hostedDomain,
    mailAddress,
    mailboxOf,
)
from qmailtx.vdomain.records import Alias

_DOT_QMAIL_PREFIXES = ("/", "./", "|", "&")


def _dotQmailTarget(text: str) -> str:
    """An alias target as stored: a dot-qmail line; a bare address becomes ``&address``."""
    target = text.strip()
    if not target or any(c in target for c in "\r\n\0"):
        raise CommandError(f"not an alias target: {text!r}")
    if target.startswith("&"):
        return "&" + str(mailAddress(target[1:]))
    if target.startswith(_DOT_QMAIL_PREFIXES):
        return target
    return "&" + str(mailAddress(target))


def aliasAdd(ctx: Context, args: argparse.Namespace) -> Result:
    name, domain = mailboxOf(ctx, args.address)
    address = f"{name}@{domain.name}"
    targets = tuple(_dotQmailTarget(t) for t in args.targets)
    if ctx.store.user(name, domain.name) is not None:
        raise CommandError(f"{address} is a user")
    if ctx.store.alias(name, domain.name) is None:
        checkNewName(name, "an alias")
    ctx.store.addAlias(Alias(name, domain.name, targets))
    alias = ctx.store.alias(name, domain.name)
    now = list(alias.targets) if alias is not None else list(targets)
    return changed([f"{address} -> {t}" for t in now], address=address, targets=now)


def aliasDel(ctx: Context, args: argparse.Namespace) -> Result:
    name, domain = mailboxOf(ctx, args.address)
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
    return changed([what], address=address, targets=remaining)


def aliasList(ctx: Context, args: argparse.Namespace) -> Result:
    domain = hostedDomain(ctx, domainName(args.domain))
    aliases = ctx.store.aliases(domain.name)
    lines = [f"{a.address} -> {t}" for a in aliases for t in a.targets]
    data = [{"address": a.address, "targets": list(a.targets)} for a in aliases]
    return Result(lines, data)
