"""Per-connection SMTP state, offered to checks as ISMTPSession."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.policy.interfaces import ISMTPSession

_ids = itertools.count(1)


def newSessionId() -> str:
    return f"{os.getpid()}.{next(_ids)}"


@implementer(ISMTPSession)
@dataclass
class SMTPSession:
    peerHost: str
    peerPort: int
    listener: str = "smtp"
    sessionId: str = field(default_factory=newSessionId)
    helo: str | None = None
    esmtp: bool = False
    secure: bool = False
    authenticatedAs: str | None = None
    clientRelay: bool = False  # the client's address is in relay_clients
    sender: Address | None = None
    recipients: list[Address] = field(default_factory=list)
    bodyType: str | None = None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def relayAllowed(self) -> bool:
        return self.clientRelay or self.authenticatedAs is not None

    def resetTransaction(self) -> None:
        self.sender = None
        self.recipients = []
        self.bodyType = None
