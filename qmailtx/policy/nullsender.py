"""A bounce has one recipient (P6, Charles Cazabon's nullenvsender).

With ``MAIL FROM:<>`` (or qmail's double-bounce sender ``#@[]``) the first
recipient is judged as usual; any other recipient of the same transaction
is refused. Only accepted recipients count, and MAIL, RSET, HELO and EHLO
start a new transaction, so the count starts again there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.policy.interfaces import IRecipientCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, reject

if TYPE_CHECKING:
    from qmailtx.registry import PolicyContext, Registry

log = Logger()

REFUSED = reject(553, "5.7.1", "sorry, bounce messages should have a single envelope recipient")


@implementer(IRecipientCheck)
class NullSenderSingleRecipient:
    """Refuse a second recipient for a bounce (the same one again is harmless)."""

    def checkRecipient(self, session: ISMTPSession, recipient: Address) -> Verdict:
        sender = session.sender
        if sender is None or not (sender.isNull or sender.isDoubleBounce):
            return CONTINUE
        lowered = recipient.lowered()
        accepted: list[Address] = session.recipients
        if all(r.lowered() == lowered for r in accepted):
            return CONTINUE
        log.info(
            "nullsender refused {rcpt}: a bounce has a recipient already"
            " at {peer} session {session}",
            policy="nullsender",
            sender=str(sender),
            rcpt=str(recipient),
            peer=session.peerHost,
            session=session.sessionId,
            code=553,
        )
        return REFUSED


def register(registry: Registry, context: PolicyContext) -> None:
    registry.registerUtility(NullSenderSingleRecipient(), IRecipientCheck, name="nullsender")
