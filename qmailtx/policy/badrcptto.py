"""badrcptto (P9): refuse listed recipients, for every client.

Entries are ``user@host`` (the whole address) or ``@host``, matched
case-insensitively. Only the refused RCPT is affected; the transaction goes
on. Relay clients are refused too (decisions.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.policy.badmailfrom import isListed, listedSet
from qmailtx.policy.interfaces import IRecipientCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, reject

if TYPE_CHECKING:
    from qmailtx.registry import PolicyContext, Registry

log = Logger()

REFUSED = reject(553, "5.7.1", "sorry, mail to that recipient is not accepted")


@implementer(IRecipientCheck)
@dataclass(frozen=True)
class BadRcptTo:
    """Refuse recipients listed in badrcptto (full address or "@domain")."""

    listed: frozenset[str]

    def checkRecipient(self, session: ISMTPSession, recipient: Address) -> Verdict:
        if not isListed(self.listed, recipient):
            return CONTINUE
        log.info(
            "badrcptto refused {rcpt} from {sender} at {peer} session {session}",
            policy="badrcptto",
            sender=str(session.sender or ""),
            rcpt=str(recipient),
            peer=session.peerHost,
            session=session.sessionId,
            code=553,
        )
        return REFUSED


def register(registry: Registry, context: PolicyContext) -> None:
    check = BadRcptTo(listedSet(context.config.control.badrcptto))
    registry.registerUtility(check, IRecipientCheck, name="badrcptto")
