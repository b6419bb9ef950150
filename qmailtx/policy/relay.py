"""Relay control (qmail's rcpthosts + RELAYCLIENT), failing closed."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.domains import DomainTable
from qmailtx.policy.interfaces import IRecipientCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, reject

log = Logger()


@implementer(IRecipientCheck)
@dataclass(frozen=True)
class RelayControl:
    """Refuse recipients outside our domains unless the client may relay."""

    domains: DomainTable

    def checkRecipient(self, session: ISMTPSession, recipient: Address) -> Verdict:
        if self.domains.acceptsMailFor(recipient.domain) or session.relayAllowed:
            return CONTINUE
        log.info(
            "relay refused: {rcpt} from {peer} session {session}",
            rcpt=str(recipient),
            peer=session.peerHost,
            session=session.sessionId,
        )
        return reject(553, "5.7.1", "sorry, that domain isn't in my list of allowed rcpthosts")
