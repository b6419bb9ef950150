"""ESMTP client for one delivery attempt: one connection, one transaction.

``sendMessage`` connects through an endpoint, speaks ESMTP and answers a
``TransactionResult`` with every reply it saw; it never raises for anything
the peer does. Turning replies into delivered / temporary / permanent is the
delivery agent's business (``qmailtx.delivery.remote``); the client decides
alone only where no reply says it: connection problems, timeouts, TLS and
protocol errors (``failure``, temporary) and a message larger than the
peer's ``SIZE`` (``failure`` with ``permanent=True``).

The dialogue:

- greeting: anything but 220 ends the attempt (``greeting`` holds the
  reply, ``failure`` says "greeting failed"), after a QUIT;
- ``EHLO``, and ``HELO`` when EHLO gets a 5xx; extensions understood:
  PIPELINING, SIZE, 8BITMIME, STARTTLS, AUTH;
- STARTTLS by ``ClientOptions.tls``: ``"opportunistic"`` uses it when
  offered and accepts any certificate (plaintext when it is not offered or
  the server refuses the command), ``"verify"`` requires it and a
  certificate valid for ``tlsHostname`` (else ``TLS required ... (#4.7.0)``),
  ``"none"`` never uses it. Bytes the server sent after its ``220`` to
  STARTTLS are discarded (CVE-2011-0411), and EHLO is sent again inside TLS;
- AUTH PLAIN (preferred) or LOGIN when ``ClientOptions.auth`` is set; the
  password is sent only inside TLS unless ``tls == "none"``;
- ``MAIL FROM`` with ``SIZE=`` and ``BODY=8BITMIME`` when offered (8-bit
  messages go to servers without 8BITMIME anyway, as qmail does), one RCPT
  per recipient, DATA only when one was accepted; with PIPELINING, MAIL,
  all RCPTs and DATA leave in one write;
- QUIT at the end (its reply is awaited briefly), then the connection is
  closed and ``sendMessage`` returns once it is.

The message is stored with LF line ends and sent in wire form
(``qmailtx.smtp.wire``: CRLF, bare CR dropped, dot-stuffed, ``CRLF.CRLF``).
It comes from a ``MessageSource`` (``qmailtx.smtp.source``; plain bytes are
wrapped in a ``BytesSource``), streamed chunk by chunk through a producer,
so a connection never holds more than a chunk or two of it. The time from
the 354 to DATA until the reply after the message is bounded by
``replyTimeout``, sending included, as when the message went out in one
write.

Replies are parsed within bounds (``qmailtx.smtp.replies``); a hostile or
broken reply aborts the connection with a temporary ``failure``.
"""

from __future__ import annotations

import base64
import collections
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from qmailtx.smtp.replies import MAX_LINE_LENGTH, MAX_LINES, Reply, ReplyError, ReplyParser
from qmailtx.smtp.source import BytesSource, DataProducer, MessageSource, SourceError
from qmailtx.smtp.wire import wireMessage

__all__ = ["ClientOptions", "Reply", "TransactionResult", "sendMessage", "wireMessage"]

log = Logger()

TLS_POLICIES = ("none", "opportunistic", "verify")
QUIT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True)
class ClientOptions:
    """How to talk to one peer."""

    heloName: str
    tls: str = "opportunistic"
    tlsHostname: str | None = None
    auth: tuple[str, str] | None = None
    replyTimeout: float = 1200.0
    connectTimeout: float = 60.0

    def __post_init__(self) -> None:
        if self.tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {self.tls!r}")


@dataclass
class TransactionResult:
    """Everything one attempt saw; ``None`` replies were never reached.

    ``data`` is the reply after the message, or the refusal of the DATA
    command itself (``messageSent`` tells which). ``permanent`` is set only
    where the client decided alone (SIZE too small, an address it refuses to
    send, AUTH answered 5xx); reply codes are for the agent to read.
    ``helo`` is the EHLO (or HELO) reply last seen, ``extensions`` the EHLO
    keywords (upper case) with their parameters, ``auth`` the final AUTH reply.
    """

    connected: bool
    greeting: Reply | None = None
    mail: Reply | None = None
    recipients: list[Reply | None] = field(default_factory=list)
    data: Reply | None = None
    tls: str | None = None
    peer: str = ""
    failure: str | None = None
    permanent: bool = False
    helo: Reply | None = None
    auth: Reply | None = None
    extensions: dict[str, str] = field(default_factory=dict)
    messageSent: bool = False


class _Abort(Exception):
    """Ends the dialogue with ``failure`` text (the connection may be dead)."""

    def __init__(self, failure: str, permanent: bool = False, quit: bool = True) -> None:
        super().__init__(failure)
        self.failure = failure
        self.permanent = permanent
        self.quit = quit


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _AnyCertificate:
    """Opportunistic TLS: encrypt, accept whatever certificate is shown."""

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions(verify=False)
        self._serverName = None if _isIP(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._serverName:
            connection.set_tlsext_host_name(self._serverName)
        return connection


@implementer(IHandshakeListener)
class _ClientProtocol(Protocol):
    """Bytes to replies and commands to bytes; the dialogue is in
    ``_Dialogue``. One reader at a time waits in ``readReply``."""

    def __init__(self, reactor: IReactorTime, maxLineLength: int, maxLines: int) -> None:
        self.reactor = reactor
        self.parser = ReplyParser(maxLineLength, maxLines)
        self.replies: collections.deque[Reply] = collections.deque()
        self.waiter: Deferred[Reply] | None = None
        self.error: str | None = None
        self.lost: Failure | None = None
        self.closed: Deferred[None] = Deferred()
        self.outstanding = 1  # the greeting
        self.tlsStarting = False  # a 220 to STARTTLS ends what we read in plaintext
        self.discarding = False
        self.handshake: Deferred[None] | None = None
        self.discarded = 0  # octets the server sent after its 220 to STARTTLS
        self.producer: DataProducer | None = None

    # IProtocol

    def dataReceived(self, data: bytes) -> None:
        if self.discarding:
            self.discarded += len(data)  # counted, never kept
            return
        if self.error is not None:
            return
        try:
            self.parser.add(data)
            while True:
                reply = self.parser.next()
                if reply is None:
                    break
                self.replies.append(reply)
                if len(self.replies) > self.outstanding + 8:
                    raise ReplyError("remote sent replies nobody asked for")
                if self.tlsStarting:
                    self.tlsStarting = False
                    self.discarding = True
                    self.discarded = len(self.parser.discard())
                    break
        except ReplyError as e:
            self.protocolError(str(e))
            return
        self._deliver()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason = reason or Failure(ConnectionDone())
        if self.producer is not None:
            self.producer.stopProducing()
        self._deliver()
        if self.handshake is not None:
            d, self.handshake = self.handshake, None
            d.errback(reason)
        self.closed.callback(None)

    def handshakeCompleted(self) -> None:
        if self.handshake is not None:
            d, self.handshake = self.handshake, None
            d.callback(None)

    # used by the dialogue

    def protocolError(self, message: str) -> None:
        self.error = message
        self.replies.clear()
        self.parser.discard()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._deliver()

    def send(self, line: str, replies: int = 1) -> None:
        self.outstanding += replies
        assert self.transport is not None
        self.transport.write(line.encode("utf-8") + b"\r\n")

    def sendRaw(self, data: bytes, replies: int) -> None:
        self.outstanding += replies
        assert self.transport is not None
        self.transport.write(data)

    def sendData(self, source: MessageSource) -> Deferred[None]:
        """Stream the message (one reply expected after it); fires once all is written."""
        self.outstanding += 1
        assert self.transport is not None
        self.producer = DataProducer(source, cast(IConsumer, self.transport))
        return self.producer.start()

    def stopData(self) -> None:
        if self.producer is not None:
            self.producer.stop()

    def readReply(self, timeout: float) -> Deferred[Reply]:
        assert self.waiter is None, "one reader at a time"

        def cancel(d: Deferred[Reply]) -> None:
            self.waiter = None

        d: Deferred[Reply] = Deferred(cancel)
        self.waiter = d
        self._deliver()
        if self.waiter is d:
            d.addTimeout(timeout, self.reactor)
        return d

    def startTLS(self, creator: IOpenSSLClientConnectionCreator) -> Deferred[None]:
        """Start TLS after the 220 (plaintext bytes received since are gone)."""
        self.discarding = False
        self.handshake = Deferred()
        assert self.transport is not None
        self.transport.startTLS(creator)  # type: ignore[attr-defined]
        return self.handshake

    def _deliver(self) -> None:
        if self.waiter is None:
            return
        d = self.waiter
        if self.error is not None:
            self.waiter = None
            d.errback(ReplyError(self.error))
        elif self.replies:
            self.waiter = None
            self.outstanding -= 1
            d.callback(self.replies.popleft())
        elif self.lost is not None:
            self.waiter = None
            d.errback(self.lost)


class _OneProtocolFactory(Factory):
    def __init__(self, protocol: _ClientProtocol) -> None:
        self.protocol_ = protocol

    def buildProtocol(self, addr: IAddress | None) -> _ClientProtocol:
        return self.protocol_


def _describe(reason: Failure | BaseException) -> str:
    value = reason.value if isinstance(reason, Failure) else reason
    text = str(value).strip() or type(value).__name__
    return text.replace("\n", " ")[:300]


class _Dialogue:
    def __init__(
        self,
        proto: _ClientProtocol,
        options: ClientOptions,
        result: TransactionResult,
        tlsCreator: Callable[[str], IOpenSSLClientConnectionCreator] | None,
    ) -> None:
        self.proto = proto
        self.options = options
        self.result = result
        self.tlsCreator = tlsCreator
        self.peer = result.peer
        self.inTLS = False

    async def read(self, timeout: float | None = None) -> Reply:
        try:
            return await self.proto.readReply(timeout or self.options.replyTimeout)
        except (DeferredTimeoutError, CancelledError):
            raise _Abort(f"Connection to {self.peer} timed out. (#4.4.2)", quit=False) from None
        except ReplyError as e:
            raise _Abort(f"Connected to {self.peer} but {e}. (#4.5.0)", quit=False) from None
        except Exception as e:
            raise self._died(e) from None

    def _died(self, e: BaseException) -> _Abort:
        if self.result.messageSent:
            text = f"Connected to {self.peer} but connection died. Possible duplicate! (#4.4.2)"
        else:
            text = f"Connected to {self.peer} but connection died. (#4.4.2)"
        return _Abort(text, quit=False)

    async def command(self, line: str) -> Reply:
        self.proto.send(line)
        return await self.read()

    async def run(self, sender: str, recipients: list[str], message: MessageSource) -> None:
        greeting = self.result.greeting = await self.read()
        if greeting.code != 220:
            raise _Abort(f"Connected to {self.peer} but greeting failed. (#4.4.2)")
        await self.hello()
        if self.options.tls != "none":
            await self.startTLS()
        if self.options.auth is not None:
            await self.authenticate(*self.options.auth)
        await self.transaction(sender, recipients, message)

    async def hello(self) -> None:
        reply = await self.command(f"EHLO {self.options.heloName}")
        extensions: dict[str, str] = {}
        if reply.code // 100 == 5:
            reply = await self.command(f"HELO {self.options.heloName}")
        elif reply.code // 100 == 2:
            for line in reply.lines[1:]:
                keyword, _, parameters = line.strip().partition(" ")
                keyword = keyword.upper()
                if keyword.startswith("AUTH="):  # pre-RFC 2554 servers
                    keyword, parameters = "AUTH", keyword[5:] + " " + parameters
                if keyword == "AUTH" and "AUTH" in extensions:
                    parameters = extensions["AUTH"] + " " + parameters
                extensions[keyword] = parameters.strip()
        self.result.helo = reply
        self.result.extensions = extensions
        if reply.code // 100 != 2:
            raise _Abort(f"Connected to {self.peer} but my name was rejected. (#4.4.2)")

    async def startTLS(self) -> None:
        verify = self.options.tls == "verify"
        if "STARTTLS" not in self.result.extensions:
            if verify:
                raise _Abort(f"TLS required but {self.peer} does not offer STARTTLS. (#4.7.0)")
            return
        self.proto.tlsStarting = True
        reply = await self.command("STARTTLS")
        self.proto.tlsStarting = False
        if reply.code != 220:
            self.proto.discarding = False
            if verify:
                raise _Abort(f"TLS required but {self.peer} refused STARTTLS: {reply} (#4.7.0)")
            log.info(
                "{peer} refused STARTTLS ({code}), going on in plaintext",
                peer=self.peer,
                code=reply.code,
            )
            return
        if self.proto.discarded:
            log.warn(
                "{peer} sent {count} bytes after its 220 to STARTTLS; discarded",
                peer=self.peer,
                count=self.proto.discarded,
            )
        hostname = self.options.tlsHostname or self.peer
        if self.tlsCreator is not None:
            creator = self.tlsCreator(hostname)
        elif verify:
            creator = optionsForClientTLS(hostname, trustRoot=platformTrust())
        else:
            creator = _AnyCertificate(hostname)
        handshake = self.proto.startTLS(creator)
        handshake.addTimeout(self.options.replyTimeout, self.proto.reactor)
        try:
            await handshake
        except (DeferredTimeoutError, CancelledError):
            raise _Abort(
                f"TLS handshake with {self.peer} timed out. (#4.7.0)", quit=False
            ) from None
        except Exception as e:
            what = "TLS required but" if verify else "TLS failed:"
            raise _Abort(
                f"{what} handshake with {self.peer} ({hostname}) failed: {_describe(e)} (#4.7.0)",
                quit=False,
            ) from None
        self.inTLS = True
        handle = self.proto.transport.getHandle()  # type: ignore[union-attr]
        self.result.tls = str(handle.get_protocol_version_name())
        await self.hello()

    async def authenticate(self, user: str, password: str) -> None:
        if not self.inTLS and self.options.tls != "none":
            raise _Abort(f"Not sending a password to {self.peer} without TLS. (#4.7.0)")
        mechanisms = self.result.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = f"\0{user}\0{password}".encode()
            reply = await self.command("AUTH PLAIN " + base64.b64encode(token).decode("ascii"))
        elif "LOGIN" in mechanisms:
            reply = await self.command("AUTH LOGIN")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self.command(base64.b64encode(secret.encode()).decode("ascii"))
        else:
            raise _Abort(f"{self.peer} offers no AUTH PLAIN or LOGIN. (#4.7.0)")
        self.result.auth = reply
        if reply.code != 235:
            raise _Abort(
                f"Connected to {self.peer} but authentication was rejected. "
                f"Remote host said: {reply}",
                permanent=reply.code // 100 == 5,
            )

    async def transaction(self, sender: str, recipients: list[str], message: MessageSource) -> None:
        wireSize = message.info.size
        extensions = self.result.extensions
        parameters = ""
        if "SIZE" in extensions:
            limit = extensions["SIZE"].split()[:1]
            if limit and limit[0].isdigit() and 0 < int(limit[0]) < wireSize - 3:
                raise _Abort(
                    f"Message is too big for the remote host (SIZE {int(limit[0])}). (#5.3.4)",
                    permanent=True,
                )
            parameters += f" SIZE={wireSize - 3}"
        if message.info.eightBit and "8BITMIME" in extensions:
            parameters += " BODY=8BITMIME"
        mail = f"MAIL FROM:<{sender}>{parameters}"
        rcpts = [f"RCPT TO:<{r}>" for r in recipients]
        self.result.recipients = [None] * len(recipients)
        if "PIPELINING" in extensions:
            lines = [mail, *rcpts, "DATA"]
            data = b"".join(line.encode("utf-8") + b"\r\n" for line in lines)
            self.proto.sendRaw(data, len(lines))
            self.result.mail = await self.read()
            for i in range(len(recipients)):
                self.result.recipients[i] = await self.read()
            dataReply = await self.read()
            if not self._accepted():
                if dataReply.code == 354:  # RFC 2920: end the empty message
                    self.proto.send(".")
                    await self.read()
                return
        else:
            self.result.mail = await self.command(mail)
            if self.result.mail.code // 100 != 2:
                return
            for i, line in enumerate(rcpts):
                self.result.recipients[i] = await self.command(line)
            if not self._accepted():
                return
            dataReply = await self.command("DATA")
        if dataReply.code != 354:
            self.result.data = dataReply
            return
        self.result.messageSent = True
        started = self.proto.reactor.seconds()
        await self.sendData(message)
        elapsed = self.proto.reactor.seconds() - started
        self.result.data = await self.read(max(self.options.replyTimeout - elapsed, 0.001))

    async def sendData(self, message: MessageSource) -> None:
        """Stream the message; the whole of it within ``replyTimeout``."""
        sending = self.proto.sendData(message)
        sending.addTimeout(self.options.replyTimeout, self.proto.reactor)
        try:
            await sending
        except (DeferredTimeoutError, CancelledError):
            raise _Abort(f"Connection to {self.peer} timed out. (#4.4.2)", quit=False) from None
        except SourceError as e:
            # The data is incomplete: never end it, drop the connection.
            if self.proto.transport is not None:
                self.proto.transport.abortConnection()  # type: ignore[attr-defined]
            text = getattr(e.reason, "strerror", None) or _describe(e.reason)
            raise _Abort(f"Unable to read message: {text}. (#4.3.0)", quit=False) from None
        except Exception as e:
            if self.proto.error is not None:
                raise _Abort(
                    f"Connected to {self.peer} but {self.proto.error}. (#4.5.0)", quit=False
                ) from None
            raise self._died(e) from None
        finally:
            self.proto.stopData()

    def _accepted(self) -> bool:
        mail = self.result.mail
        return (
            mail is not None
            and mail.code // 100 == 2
            and any(r is not None and r.code // 100 == 2 for r in self.result.recipients)
        )

    async def quit(self) -> None:
        try:
            self.proto.send("QUIT")
            await self.read(min(QUIT_TIMEOUT, self.options.replyTimeout))
        except _Abort as e:
            log.debug("no reply to QUIT from {peer}: {why}", peer=self.peer, why=e.failure)


def _badAddress(address: str) -> bool:
    return any(c in address for c in "\r\n\0<>") or not address.isprintable()


async def sendMessage(
    reactor: Any,
    endpoint: IStreamClientEndpoint,
    options: ClientOptions,
    sender: str,
    recipients: list[str],
    message: bytes | MessageSource,
    tlsCreator: Callable[[str], IOpenSSLClientConnectionCreator] | None = None,
    maxLineLength: int = MAX_LINE_LENGTH,
    maxLines: int = MAX_LINES,
) -> TransactionResult:
    """Try to hand ``message`` to the peer behind ``endpoint`` for
    ``recipients`` (see the module docstring); never raises for the peer's
    doings. ``tlsCreator(hostname)``, when given, makes the TLS client
    connection creator for both "opportunistic" and "verify". ``message``
    is the stored message (LF line ends), or a source to stream it from."""
    source = BytesSource(message) if isinstance(message, bytes) else message
    for address in [sender, *recipients]:
        if _badAddress(address):
            return TransactionResult(
                connected=False,
                recipients=[None] * len(recipients),
                failure=f"Refusing to send the address {address!r}. (#5.1.3)",
                permanent=True,
            )
    proto = _ClientProtocol(reactor, maxLineLength, maxLines)
    connecting = endpoint.connect(_OneProtocolFactory(proto))
    connecting.addTimeout(options.connectTimeout, reactor)
    try:
        await connecting
    except (DeferredTimeoutError, CancelledError):
        return TransactionResult(
            connected=False,
            recipients=[None] * len(recipients),
            failure="Sorry, connection timed out. (#4.4.1)",
        )
    except ConnectError as e:
        why = _describe(e)
        return TransactionResult(
            connected=False,
            recipients=[None] * len(recipients),
            failure=f"Sorry, I wasn't able to establish an SMTP connection ({why}). (#4.4.1)",
        )
    assert proto.transport is not None
    peer = str(getattr(proto.transport.getPeer(), "host", ""))
    result = TransactionResult(connected=True, peer=peer, recipients=[None] * len(recipients))
    dialogue = _Dialogue(proto, options, result, tlsCreator)
    try:
        try:
            await dialogue.run(sender, recipients, source)
        except _Abort as e:
            result.failure, result.permanent = e.failure, e.permanent
            if not e.quit:
                raise
        await dialogue.quit()
    except _Abort:
        pass
    except Exception:
        log.failure("SMTP client dialogue with {peer} crashed", peer=peer)
        result.failure = result.failure or f"Connected to {peer} but the client failed. (#4.3.0)"
    finally:
        await _close(proto, reactor)
    if proto.error is not None and result.failure is None:
        result.failure = f"Connected to {peer} but {proto.error}. (#4.5.0)"
    return result


async def _close(proto: _ClientProtocol, reactor: IReactorTime) -> None:
    if proto.lost is not None:
        return
    transport = proto.transport
    assert transport is not None
    transport.loseConnection()
    closing: Deferred[None] = Deferred()
    proto.closed.chainDeferred(closing)
    closing.addTimeout(CLOSE_TIMEOUT, reactor)
    try:
        await closing
    except (DeferredTimeoutError, CancelledError):
        cast(Any, transport).abortConnection()
        await proto.closed
