"""qmail's badmailfrom, with every hit logged (P23).

As in qmail-smtpd 1.03 a listed sender is not refused at MAIL: every RCPT
of the transaction is (decisions.md, "Where each check speaks"). Entries
are ``user@host`` (the whole address) or ``@host``, matched
case-insensitively; the null sender never matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.policy.interfaces import IRecipientCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, reject

if TYPE_CHECKING:
    from qmailtx.registry import PolicyContext, Registry

log = Logger()

REFUSED = reject(553, "5.7.1", "sorry, your envelope sender is in my badmailfrom list")


def listedSet(entries: Iterable[str]) -> frozenset[str]:
    """Control-file entries as lower-cased ``user@host`` / ``@host`` keys."""
    return frozenset(e.strip().lower() for e in entries if e.strip())


def isListed(listed: frozenset[str], address: Address) -> bool:
    """qmail's constmap test: the whole address, then ``@domain``."""
    if address.isNull:
        return False
    return address.lowered() in listed or address.atDomain().lower() in listed


@implementer(IRecipientCheck)
@dataclass(frozen=True)
class BadMailFrom:
    """Refuse every recipient of a transaction whose sender is listed."""

    listed: frozenset[str]

    def checkRecipient(self, session: ISMTPSession, recipient: Address) -> Verdict:
        sender = session.sender
        if sender is None or not isListed(self.listed, sender):
            return CONTINUE
        log.info(
            "badmailfrom refused {rcpt} from {sender} at {peer} session {session}",
            policy="badmailfrom",
            sender=str(sender),
            rcpt=str(recipient),
            peer=session.peerHost,
            session=session.sessionId,
            code=553,
        )
        return REFUSED


def register(registry: Registry, context: PolicyContext) -> None:
    check = BadMailFrom(listedSet(context.config.control.badmailfrom))
    registry.registerUtility(check, IRecipientCheck, name="badmailfrom")
