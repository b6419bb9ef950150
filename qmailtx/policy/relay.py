"""Relay control (qmail's rcpthosts + RELAYCLIENT), failing closed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.domains import DomainTable
from qmailtx.policy.interfaces import IRecipientCheck, ISMTPSession
from qmailtx.policy.verdict import CONTINUE, Verdict, reject
from qmailtx.vdomain.hosted import HostedDomains

log = Logger()


@implementer(IRecipientCheck)
@dataclass(frozen=True)
class RelayControl:
    """Refuse recipients outside our domains unless the client may relay.

    Our domains are the control files' (rcpthosts, or locals and
    virtualdomains) and the user database's hosted domains.
    """

    domains: DomainTable
    hosted: HostedDomains | None = None

    def checkRecipient(
        self, session: ISMTPSession, recipient: Address
    ) -> Verdict | Deferred[Verdict]:
        if self.domains.acceptsMailFor(recipient.domain) or session.relayAllowed:
            return CONTINUE
        if self.hosted is not None:
            found = self.hosted.lookup(recipient.domain)
            if isinstance(found, Deferred):
                return found.addCallback(self._decide, session, recipient)
            return self._decide(found, session, recipient)
        return self._decide(False, session, recipient)

    def _decide(self, hosted: bool, session: ISMTPSession, recipient: Address) -> Verdict:
        if hosted:
            return CONTINUE
        log.info(
            "relay refused: {rcpt} from {peer} session {session}",
            rcpt=str(recipient),
            peer=session.peerHost,
            session=session.sessionId,
        )
        return reject(553, "5.7.1", "sorry, that domain isn't in my list of allowed rcpthosts")


def register(registry: Any, context: Any) -> None:
    domains = DomainTable.fromControl(context.config.control)
    registry.registerUtility(RelayControl(domains, context.hosted), IRecipientCheck, name="relay")
