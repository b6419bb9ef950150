"""Where a local recipient's mail goes: qmail-local's and vdelivermail's rules.

Blocking (it reads the user database and ``.qmail`` files), so it runs in a
worker thread. For ``local@domain``, in this order:

1. The domain: a hosted domain of the user database, an alias domain of one
   (then the hosted name is used from here on), or a control-file local
   domain without users in the database (a plain folder per mailbox).
2. The domain folder's ``.qmail-<local>`` (and ``.qmail-<prefix>-default``)
   files, as qmail-local reads them in a vpopmail domain folder: aliases,
   lists and auto-responders made by other tools. The folder's
   ``.qmail-default`` is not read: the domain's catch-all setting is what
   vpopmail's ``.qmail-default`` said, and ``import-vpopmail`` converts it.
3. valias rows: the exact name, then ``<prefix>-default`` forms.
4. The user: its ``.qmail`` if present, else its ``Maildir/``.
5. ``user<delimiter>ext``: the user's ``.qmail-<ext>`` (or ``-default``
   forms, or ``.qmail-default``), else the user's ``Maildir/`` (vpopmail's
   qmail-extension behaviour, plus addressing).
6. The domain's catch-all: bounce (default), delete, forward, or a mailbox.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qmailtx.address import Address
from qmailtx.delivery.dotqmail import (
    DotQmailError,
    Forward,
    Instruction,
    MaildirLine,
    findDotQmail,
    parseDotQmail,
    readDotQmail,
)
from qmailtx.delivery.interfaces import DeliveryResult, delivered, permanent, temporary
from qmailtx.domains import DomainTable
from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.layout import BadName, domainFolder, userFolder
from qmailtx.vdomain.records import CatchAllAction, User, UserFlags

NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"
LOCKED = "Sorry, this account is locked and does not receive mail. (#5.2.1)"


@dataclass(frozen=True)
class Plan:
    """What to do for one recipient; ``final`` set means nothing to do but answer."""

    address: str  # local@domain as delivered: the Delivered-To line and the loop check
    home: str = ""  # folder for relative .qmail lines and programs' working folder
    instructions: tuple[Instruction, ...] = ()
    owner: User | None = None  # whose Maildir (quota) and auto-responder
    ownerFolder: str | None = None  # held against deletion while writing
    local: str = ""  # qmail's LOCAL, EXT and DEFAULT for programs
    ext: str = ""
    default: str | None = None
    # The .qmail file the lines came from: its folder and the dash and ext it
    # was found with (for qmail's "-owner" forwarding sender); None otherwise.
    dotQmail: tuple[str, str, str] | None = None
    final: DeliveryResult | None = None


def _answer(address: str, result: DeliveryResult) -> Plan:
    return Plan(address, final=result)


def _maildirOf(folder: str) -> tuple[Instruction, ...]:
    return (MaildirLine(os.path.join(folder, "Maildir") + "/"),)


def resolveRecipient(
    store: IUserStore | None,
    data: str,
    domains: DomainTable,
    recipient: Address,
    delimiters: str = "-",
) -> Plan:
    local = recipient.local.lower()
    domain = recipient.domain.lower()
    address = f"{local}@{domain}"
    canonical = store.canonicalDomain(domain) if store is not None else None
    if canonical is None:
        if domains.isLocal(domain):
            return _plainFolder(data, local, domain, address)
        return _answer(address, permanent(NO_MAILBOX))
    address = f"{local}@{canonical}"
    assert store is not None
    try:
        domainDir = domainFolder(data, canonical).path
    except BadName:
        return _answer(address, permanent(NO_MAILBOX))
    try:
        return _resolveHosted(store, data, domainDir, local, canonical, address, delimiters)
    except DotQmailError as e:
        return _answer(address, temporary(e.text) if e.temporary else permanent(e.text))


def _resolveHosted(
    store: IUserStore,
    data: str,
    domainDir: str,
    local: str,
    domain: str,
    address: str,
    delimiters: str,
) -> Plan:
    # 2. .qmail-<local> files in the domain folder
    found = findDotQmail(domainDir, local) if local else None
    if found is not None and os.path.basename(found[0]) != ".qmail-default":
        path, matched = found
        return Plan(
            address,
            domainDir,
            tuple(readDotQmail(path)),
            local=local,
            ext=local,
            default=matched,
            dotQmail=(domainDir, "-", local),
        )
    # 3. valias
    alias = store.alias(local, domain)
    default: str | None = None
    if alias is None:
        for prefix, rest in _defaultForms(local):
            alias = store.alias(prefix + "-default", domain)
            if alias is not None:
                default = rest
                break
    if alias is not None:
        lines = parseDotQmail("\n".join(alias.targets))
        return Plan(address, domainDir, tuple(lines), local=local, ext=local, default=default)
    # 4. the user
    user = store.user(local, domain)
    if user is not None:
        return _userPlan(data, user, address, "", local)
    # 5. user<delimiter>ext
    for i, c in enumerate(local):
        if c in delimiters and i > 0:
            user = store.user(local[:i], domain)
            if user is not None:
                return _userPlan(data, user, address, local[i + 1 :], local)
            break
    # 6. catch-all
    return _catchAll(store, data, domain, address, local)


def _defaultForms(local: str) -> list[tuple[str, str]]:
    """``a-b-c``: (``a-b``, ``c``), (``a``, ``b-c``): vdelivermail's shorter forms."""
    forms = []
    i = local.rfind("-")
    while i > 0:
        forms.append((local[:i], local[i + 1 :]))
        i = local.rfind("-", 0, i)
    return forms


def _userPlan(data: str, user: User, address: str, ext: str, local: str) -> Plan:
    if user.flags & UserFlags.BOUNCE_MAIL:
        return _answer(address, permanent(LOCKED))
    try:
        folder = userFolder(data, user.name, user.domain).path
    except BadName:
        return _answer(address, permanent(NO_MAILBOX))
    instructions: tuple[Instruction, ...] = _maildirOf(folder)
    default = None
    dash = "-" if ext else ""
    found = findDotQmail(folder, ext, dash=dash)
    dotQmail = None
    if found is not None:
        path, default = found
        instructions = tuple(readDotQmail(path, defaultDelivery="./Maildir/"))
        dotQmail = (folder, dash, ext)
    return Plan(address, folder, instructions, user, folder, local, ext, default, dotQmail)


def _catchAll(store: IUserStore, data: str, domain: str, address: str, local: str) -> Plan:
    hosted = store.domain(domain)
    if hosted is None:
        return _answer(address, permanent(NO_MAILBOX))
    catchall = hosted.catchall
    if catchall.action is CatchAllAction.DELETE:
        return _answer(address, delivered("discarded by the domain's catch-all"))
    if catchall.action is CatchAllAction.FORWARD:
        return Plan(address, "", (Forward(catchall.target),), local=local, ext=local)
    if catchall.action is CatchAllAction.MAILBOX:
        user = store.user(catchall.target, domain)
        if user is None:
            return _answer(
                address,
                temporary(
                    f"The catch-all mailbox {catchall.target}@{domain} does not exist. (#4.2.1)"
                ),
            )
        plan = _userPlan(data, user, address, "", local)
        if plan.final is None:
            return Plan(address, plan.home, _maildirOf(plan.home), user, plan.ownerFolder, local)
        return plan
    return _answer(address, permanent(NO_MAILBOX))


def _plainFolder(data: str, local: str, domain: str, address: str) -> Plan:
    """A control-file local domain: ``<data>/domains/<domain>/<user>/`` is the mailbox."""
    try:
        folder = userFolder(data, local, domain).path
    except BadName:
        return _answer(address, permanent(NO_MAILBOX))
    if not os.path.isdir(folder):
        return _answer(address, permanent(NO_MAILBOX))
    try:
        found = findDotQmail(folder, "", dash="")
        instructions = (
            tuple(readDotQmail(found[0], defaultDelivery="./Maildir/"))
            if found
            else _maildirOf(folder)
        )
    except DotQmailError as e:
        return _answer(address, temporary(e.text) if e.temporary else permanent(e.text))
    return Plan(address, folder, instructions, None, folder, local)
