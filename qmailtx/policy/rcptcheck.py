"""The recipient check (P13, chkuser): refuse at RCPT what delivery would bounce.

For a recipient in a domain the user database hosts, a worker thread asks
the delivery resolver itself (``qmailtx.delivery.resolve``), so the check
cannot drift from delivery: valias, domain ``.qmail-*`` files, users,
extensions and the domain's catch-all all count, and a domain whose
catch-all is not "bounce-no-mailbox" has every address. Recipients in other
domains are not this check's business (the relay check has decided).

A mailbox that is already full is refused too, under the one quota policy
(decisions.md "Quota"): ``552 5.2.2`` when over-quota mail bounces, ``452
4.2.2`` when it is deferred. After ``maxBad`` unknown recipients in one
connection every further RCPT is refused, as chkuser does, which stops a
directory-harvest from learning anything more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.delivery.dotqmail import MaildirLine
from qmailtx.delivery.interfaces import Outcome
from qmailtx.delivery.local import maildirsizeLimit
from qmailtx.delivery.quota import MaildirQuota
from qmailtx.delivery.resolve import LOCKED, NO_MAILBOX, Plan, resolveRecipient
from qmailtx.domains import DomainTable
from qmailtx.policy.interfaces import IRecipientCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, reject, tempfail
from qmailtx.queue.store import Runner
from qmailtx.vdomain.cache import pinned
from qmailtx.vdomain.hosted import HostedDomains
from qmailtx.vdomain.interfaces import DatabaseUnavailable, IUserStore

if TYPE_CHECKING:
    from qmailtx.registry import PolicyContext, Registry

log = Logger()

MAX_BAD_RECIPIENTS = 10  # unknown recipients per connection before every RCPT is refused
NOTE = "rcptcheck"  # session.notes key: the connection's count of unknown recipients

UNKNOWN = reject(550, "5.1.1", "sorry, no mailbox here by that name")
DISABLED = reject(550, "5.2.1", "sorry, this account is locked and does not receive mail")
FULL_BOUNCE = reject(552, "5.2.2", "sorry, recipient mailbox is full")
FULL_DEFER = tempfail(452, "4.2.2", "sorry, recipient mailbox is full, try again later")
TOO_MANY = reject(550, "5.5.3", "sorry, you are violating our security policies")
UNAVAILABLE = tempfail(451, "4.3.0", "system temporarily unavailable, try again later")


class Status(Enum):
    NOT_OURS = "not hosted"
    EXISTS = "exists"
    UNKNOWN = "no mailbox"
    LOCKED = "locked"
    FULL = "mailbox full"


@dataclass(frozen=True)
class RecipientSettings:
    data: str
    domains: DomainTable
    delimiters: str = "-"
    overQuota: str = "bounce"  # or "defer"
    maxBad: int = MAX_BAD_RECIPIENTS  # 0: no limit


def lookupRecipient(
    store: IUserStore, settings: RecipientSettings, recipient: Address
) -> tuple[Status, str]:
    """Blocking (worker thread): what delivery would make of ``recipient``,
    with a note for the log (a quota that could not be read)."""
    with pinned(store):  # a cached store: one version check for the whole lookup
        return _lookupRecipient(store, settings, recipient)


def _lookupRecipient(
    store: IUserStore, settings: RecipientSettings, recipient: Address
) -> tuple[Status, str]:
    if store.canonicalDomain(recipient.domain) is None:
        return Status.NOT_OURS, ""
    plan = resolveRecipient(store, settings.data, settings.domains, recipient, settings.delimiters)
    final = plan.final
    if final is not None:
        if final.outcome is Outcome.PERMANENT and final.text == NO_MAILBOX:
            return Status.UNKNOWN, ""
        if final.outcome is Outcome.PERMANENT and final.text == LOCKED:
            return Status.LOCKED, ""
        return Status.EXISTS, ""  # delivery answers the rest (catch-all delete, ...)
    try:
        full = any(_isFull(plan, maildir) for maildir in _maildirs(plan))
    except FileNotFoundError:
        return Status.EXISTS, ""  # no Maildir yet: delivery decides
    except OSError as e:
        return Status.EXISTS, f"quota not checked: {e.strerror or e}"
    return (Status.FULL if full else Status.EXISTS), ""


def _maildirs(plan: Plan) -> list[str]:
    found = []
    for line in plan.instructions:
        if isinstance(line, MaildirLine):
            path = line.path if line.path.startswith("/") else os.path.join(plan.home, line.path)
            found.append(path.rstrip("/"))
    return found


def _isFull(plan: Plan, maildir: str) -> bool:
    """Delivery's quota rule (LocalDeliveryAgent._maildir) with a 1-byte message:
    true when the usage is at or above the limit already."""
    owner = plan.owner
    owned = owner is not None and os.path.join(plan.home, "Maildir") == maildir
    limit = owner.quota if owned and owner is not None else None
    if limit is None or limit.unlimited:
        limit = maildirsizeLimit(maildir)
    if limit is None:
        return False
    quota = MaildirQuota(maildir, limit)
    with quota.locked():
        return not quota.check(1, 1)


@implementer(IRecipientCheck)
class RecipientCheck:
    """Ask the user database (in a worker) whether a hosted recipient exists."""

    def __init__(
        self,
        store: IUserStore,
        runner: Runner,
        settings: RecipientSettings,
        hosted: HostedDomains | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        self.hosted = hosted

    def checkRecipient(
        self, session: ISMTPSession, recipient: Address
    ) -> Verdict | Deferred[Verdict]:
        bad: int = session.notes.get(NOTE, 0)
        if self.settings.maxBad and bad >= self.settings.maxBad:
            self._log("refused after too many unknown recipients", session, recipient, 550)
            return TOO_MANY
        if self.hosted is not None and not self.hosted.contains(recipient.domain):
            # Not a hosted domain (as far as the in-memory list knows): nothing
            # to check, and no trip to a worker. A domain added this very
            # second is checked by delivery instead, which bounces if need be.
            return CONTINUE
        return Deferred.fromCoroutine(self._check(session, recipient))

    async def _check(self, session: ISMTPSession, recipient: Address) -> Verdict:
        try:
            status, note = await self.runner(lookupRecipient, self.store, self.settings, recipient)
        except DatabaseUnavailable as e:
            self._log(f"user database unavailable: {e}", session, recipient, 451)
            return UNAVAILABLE
        except Exception:
            log.failure(
                "rcptcheck of {rcpt} crashed in session {session}",
                rcpt=str(recipient),
                session=session.sessionId,
            )
            return UNAVAILABLE
        if note:
            log.warn("rcptcheck {rcpt}: {note}", rcpt=str(recipient), note=note)
        if status is Status.UNKNOWN:
            session.notes[NOTE] = session.notes.get(NOTE, 0) + 1
            self._log("no mailbox", session, recipient, 550)
            return UNKNOWN
        if status is Status.LOCKED:
            self._log("account locked", session, recipient, 550)
            return DISABLED
        if status is Status.FULL:
            verdict = FULL_DEFER if self.settings.overQuota == "defer" else FULL_BOUNCE
            assert verdict.reply is not None
            self._log("mailbox full", session, recipient, verdict.reply.code)
            return verdict
        return CONTINUE

    def _log(self, reason: str, session: ISMTPSession, recipient: Address, code: int) -> None:
        log.info(
            "rcptcheck refused {rcpt} ({reason}) from {sender} at {peer} session {session}",
            policy="rcptcheck",
            reason=reason,
            rcpt=str(recipient),
            sender=str(session.sender or ""),
            peer=session.peerHost,
            session=session.sessionId,
            code=code,
        )


@implementer(IRecipientCheck)
class NoRecipientCheck:
    """Without a user database there is nothing to check."""

    def checkRecipient(self, session: ISMTPSession, recipient: Address) -> Verdict:
        return CONTINUE


def register(registry: Registry, context: PolicyContext) -> None:
    check: Any
    if context.users is None:
        check = NoRecipientCheck()
    else:
        if context.runner is None:
            from qmailtx.registry import RegistryError

            raise RegistryError("rcptcheck needs a worker runner for the user database")
        config = context.config
        settings = RecipientSettings(
            data=config.paths.data,
            domains=DomainTable.fromControl(config.control),
            delimiters=config.delivery.recipient_delimiter,
            overQuota=config.delivery.over_quota,
            maxBad=int(context.extra.get("max_bad_recipients", MAX_BAD_RECIPIENTS)),
        )
        check = RecipientCheck(context.users, context.runner, settings, context.hosted)
    registry.registerUtility(check, IRecipientCheck, name="rcptcheck")
