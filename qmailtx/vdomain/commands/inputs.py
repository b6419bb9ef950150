"""Names and addresses typed on qmailctl's command line: checked, then looked up.

Each function raises ``CommandError`` with a message for the administrator.
"""

from __future__ import annotations

import re

from qmailtx.address import Address, AddressError, normaliseDomain, parseMailbox
from qmailtx.vdomain.commands.context import CommandError, Context
from qmailtx.vdomain.layout import BadName, domainFolder
from qmailtx.vdomain.records import Domain, QuotaError, QuotaLimit, User, parseQuota

# New user and alias names: vpopmail allows more, but these are safe as
# folder names, in .qmail file names and on every client.
_NAME = re.compile(r"[a-z0-9_][a-z0-9._+=-]{0,63}\Z")


def domainName(text: str) -> str:
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


def mailAddress(text: str) -> Address:
    """A ``user@domain`` address (the domain is required)."""
    try:
        address = parseMailbox(text.strip())
    except AddressError as e:
        raise CommandError(f"not an address: {text!r} ({e})") from None
    if not address.domain:
        raise CommandError(f"not an address: {text!r} (the domain is missing)")
    return address


def checkNewName(name: str, what: str) -> None:
    """Refuse ``name`` for a new user or alias unless it is a safe name."""
    if not _NAME.match(name) or ".." in name:
        raise CommandError(
            f"not usable as {what} name: {name!r} (letters, digits and . _ - + =;"
            " starting with a letter, digit or _; at most 64 characters)"
        )


def quotaLimit(text: str) -> QuotaLimit | None:
    """A quota as ``parseQuota`` reads it."""
    try:
        return parseQuota(text)
    except QuotaError as e:
        raise CommandError(str(e)) from None


def readPassword(ctx: Context) -> str:
    """The first line of standard input, without its line end; never empty."""
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


def hostedDomain(ctx: Context, name: str) -> Domain:
    """The hosted domain ``name`` is or is an alias of (CommandError otherwise)."""
    canonical = ctx.store.canonicalDomain(name)
    domain = None if canonical is None else ctx.store.domain(canonical)
    if domain is None:
        raise CommandError(f"no such domain: {name}")
    return domain


def ownDomain(ctx: Context, text: str) -> Domain:
    """A hosted domain by its own name (an alias domain is refused, with a hint)."""
    name = domainName(text)
    domain = hostedDomain(ctx, name)
    if domain.name != name:
        raise CommandError(f"{name} is an alias domain of {domain.name}")
    return domain


def mailboxOf(ctx: Context, text: str) -> tuple[str, Domain]:
    """``user@domain`` -> (lower-cased local part, hosted domain)."""
    address = mailAddress(text)
    return address.local.lower(), hostedDomain(ctx, address.domain)


def existingUser(ctx: Context, text: str) -> User:
    """The user ``user@domain`` names."""
    name, domain = mailboxOf(ctx, text)
    user = ctx.store.user(name, domain.name)
    if user is None:
        raise CommandError(f"no such user: {name}@{domain.name}")
    return user
