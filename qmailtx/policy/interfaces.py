"""The session as checks see it, and the check interfaces per SMTP stage.

A check method may answer a ``Verdict`` at once or a ``Deferred`` that fires
with one; the server holds further pipelined commands until it has answered,
so replies always leave in command order.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from qmailtx.address import Address
from qmailtx.policy.verdict import Verdict


class ISMTPSession(Interface):
    """One SMTP connection, read-only for checks."""

    sessionId = Attribute("str: short unique id of this connection, used in logs")
    listener = Attribute("str: name of the listener the client connected to")
    peerHost = Attribute("str: the client's IP address")
    peerPort = Attribute("int: the client's port")
    helo = Attribute("str | None: the HELO/EHLO argument")
    esmtp = Attribute("bool: the client said EHLO")
    secure = Attribute("bool: the connection is encrypted")
    authenticatedAs = Attribute("str | None: the SMTP AUTH identity")
    relayAllowed = Attribute("bool: this client may relay (relay_clients, AUTH, ...)")
    sender = Attribute("Address | None: the MAIL FROM address of the open transaction")
    recipients = Attribute("list[Address]: recipients accepted so far in the transaction")


class ISenderCheck(Interface):
    def checkSender(
        session: ISMTPSession, sender: Address, parameters: dict[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        """Judge MAIL FROM. Answers a Verdict or a Deferred of one."""


class IRecipientCheck(Interface):
    def checkRecipient(session: ISMTPSession, recipient: Address) -> Verdict | Deferred[Verdict]:
        """Judge RCPT TO. Answers a Verdict or a Deferred of one."""
