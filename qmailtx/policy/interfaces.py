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
    notes = Attribute(
        "dict[str, object]: per-connection state for policies (e.g. a count of bad"
        " recipients), keyed by policy name; kept across transactions"
    )


class ISenderCheck(Interface):
    def checkSender(
        session: ISMTPSession, sender: Address, parameters: dict[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        """Judge MAIL FROM. Answers a Verdict or a Deferred of one."""


class IRecipientCheck(Interface):
    def checkRecipient(session: ISMTPSession, recipient: Address) -> Verdict | Deferred[Verdict]:
        """Judge RCPT TO. Answers a Verdict or a Deferred of one."""


class IDataCheck(Interface):
    """Judges one message's content as it arrives (a fresh one per message).

    Registered as a named adapter from ISMTPSession; the server makes one at
    DATA and feeds it the message (after dot-unstuffing, LF line ends, without
    our Received line) chunk by chunk, then asks for the verdict. It must keep
    its memory bounded whatever the message size.
    """

    def dataReceived(chunk: bytes) -> None:
        """More of the message; cheap and incremental."""

    def endOfData() -> Verdict | Deferred[Verdict]:
        """The whole message has been seen: CONTINUE to queue it, or refuse it."""


class IPolicyPlugin(Interface):
    """A third-party policy, found with twisted.plugin and enabled by name.

    Ship a module in a ``twisted/plugins/`` folder holding an object that
    provides both ``twisted.plugin.IPlugin`` and this interface.
    """

    name = Attribute("str: the name that enables it in a listener's policies list")

    def register(registry: object, context: object) -> None:
        """Register the policy's components in ``registry`` (a qmailtx Registry)
        under ``name``: ISenderCheck / IRecipientCheck utilities, IDataCheck
        adapters. ``context`` is a qmailtx.registry.PolicyContext."""
