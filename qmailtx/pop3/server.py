"""The POP3 server protocol (RFC 1939, CAPA RFC 2449, AUTH RFC 5034, STLS RFC 2595).

Framing follows the SMTP server: input is taken in bulk, lines end at LF
(a CR before it is dropped), a command line may be ``COMMAND_LIMIT``
octets (RFC 2449 says 255; a margin for long user names), an AUTH
continuation line RFC 4954's 12288; a longer line is answered with one
-ERR when it ends and is never split into commands. Pipelined commands
(RFC 2449 PIPELINING) are answered strictly in order: while a command
waits (a login, the mailbox scan, a RETR being streamed, the UPDATE at
QUIT) later input stays buffered, and reading pauses once that is full.

States are RFC 1939's: AUTHORIZATION (USER/PASS, APOP, AUTH, STLS, CAPA,
QUIT), TRANSACTION (STAT, LIST, UIDL, TOP, RETR, DELE, RSET, NOOP, CAPA,
QUIT) and UPDATE (QUIT in TRANSACTION: ``mailbox.commit`` in a worker
thread; the deleted messages, renamed into tmp/ by then, are unlinked
after the reply). A dropped connection or an idle timeout never reaches
UPDATE.

USER/PASS and AUTH PLAIN/LOGIN carry the password itself: they are offered
only inside TLS, to a loopback client, or with ``[pop3] auth_before_tls``;
otherwise they answer ``-ERR [AUTH]``. APOP (the greeting's
``<pid.random.time@host>`` is its timestamp) and CRAM-MD5 appear only when
the portal can check them. A refused login answers
``-ERR [AUTH] authentication failed`` after the client address's throttle
delay, whether the user exists or not; passwords and AUTH lines are never
logged.

STLS answers +OK, throws away whatever the client pipelined after it
(CVE-2011-0411), forgets a pending USER and starts TLS.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from itertools import count
from typing import TYPE_CHECKING, Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.mail.pop3 import APOPCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from qmailtx.lineserver import LineServer
from qmailtx.logging import logsafe
from qmailtx.pop3.mailbox import (
    SMALL_MESSAGE,
    Message,
    MessageStream,
    UpdateResult,
    commit,
    convertAll,
    openMessage,
    purge,
    readSmall,
    scanMaildir,
    sweepTrash,
)
from qmailtx.sasl import Refused, SASLSession
from qmailtx.smtp.auth import (
    AUTH_LINE_LIMIT,
    AuthInputError,
    AuthRefused,
    Challenge,
    Credentials,
    Step,
)
from qmailtx.smtp.tls import describeConnection
from qmailtx.smtp.writethrough import writeNow
from qmailtx.vdomain.interfaces import DatabaseUnavailable
from qmailtx.vdomain.realm import IMailAccount

if TYPE_CHECKING:
    from qmailtx.pop3.factory import POP3ServerFactory

log = Logger()

COMMAND_LIMIT = 512  # octets of a command line, CRLF included (RFC 2449: 255)

_AUTHORIZATION, _TRANSACTION, _UPDATE, _CLOSED = "authorization", "transaction", "update", "closed"

_sessionIds = count(1)

E_SYNTAX = b"-ERR syntax error"
E_UNKNOWN = b"-ERR unimplemented"
E_AUTH_FIRST = b"-ERR authorization first"
E_NOT_NOW = b"-ERR command not valid in this state"
E_NO_MESSAGE = b"-ERR no such message"
E_DELETED = b"-ERR message already deleted"
E_VANISHED = b"-ERR [SYS/TEMP] unable to open that message (deleted by another session?)"
E_AUTH_FAILED = b"-ERR [AUTH] authentication failed"
E_PLAINTEXT = b"-ERR [AUTH] plaintext authentication disallowed without TLS; use STLS"
E_TEMPORARY = b"-ERR [SYS/TEMP] temporary failure, try again later"
E_MAILBOX = b"-ERR [SYS/TEMP] unable to open the mailbox"
E_TOO_LONG = b"-ERR line too long"
E_TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] too many connections"


class _Bad(Exception):
    """A command refused: counts toward the bad-command limit."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply)
        self.reply = reply


Reply = bytes | None
Answer = Reply | Deferred[Reply]


@implementer(IHandshakeListener)
class POP3Server(LineServer[bytes]):
    def __init__(self, factory: POP3ServerFactory) -> None:
        super().__init__(factory.clock, factory.settings.timeout, factory.settings.maxBadCommands)
        self.factory = factory
        self.settings = factory.settings
        self.sessionId = next(_sessionIds)
        self.peerHost = "unknown"
        self.secure = self.settings.implicitTLS
        self.timestamp = b""
        self._state = _AUTHORIZATION
        self._sasl = SASLSession(factory.clock, factory.throttle)
        self._user: bytes | None = None  # from USER, for PASS
        self._address = ""
        self._maildir = ""
        self._messages: list[Message] = []
        self._stream: MessageStream | None = None
        self._admitted: str | None = None  # the host the limiter counted us for

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peerHost = getattr(peer, "host", "unknown")
        if not self.factory.limiter.acquire(self.peerHost):
            # Over a connection cap (S13): say so and hang up, reading nothing.
            self._write(E_TOO_MANY_CONNECTIONS)
            self._state = _CLOSED
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._admitted = self.peerHost
        self.startServing()
        greeting = f"+OK {self.settings.me} qmailtx POP3 server ready"
        if self.factory.offersAPOP:
            now = int(self.factory.clock.seconds())
            self.timestamp = (
                f"<{os.getpid()}.{secrets.randbits(32)}.{now}@{self.settings.me}>"
            ).encode("ascii", "replace")
            greeting += " " + self.timestamp.decode("ascii")
        self._write(greeting.encode("ascii", "replace"))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if self._state == _TRANSACTION:
            log.info(
                "POP3 {user} from {peer} disconnected without QUIT: nothing deleted",
                user=self._address,
                peer=self.peerHost,
            )
        self._state = _CLOSED
        self._stopTimer()
        self._closeStream()
        self._sasl.close()
        admitted, self._admitted = self._admitted, None
        if admitted is not None:
            self.factory.limiter.release(admitted)

    def handshakeCompleted(self) -> None:
        log.info(
            "POP3 TLS with {peer}: {tls}",
            peer=self.peerHost,
            tls=describeConnection(self.transport) or "?",
        )

    def _closeStream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    def closing(self) -> None:
        self._state = _CLOSED
        self._closeStream()

    # -- line server hooks ----------------------------------------------------

    def timedOut(self) -> None:
        log.info("POP3 timeout: closing {peer} ({user})", peer=self.peerHost, user=self._address)
        self._write(b"-ERR autologout: idle for too long")

    def outputResumed(self) -> None:
        if self._stream is not None:
            self._pump()

    def stopProducing(self) -> None:
        self._closeStream()

    def lineLimit(self, buf: bytes) -> int:
        waiting = self._sasl.waiting
        return AUTH_LINE_LIMIT if waiting or buf[:5].upper() == b"AUTH " else COMMAND_LIMIT

    def lineOverflowed(self) -> None:
        self._write(b"-ERR line too long, closing connection")

    def lineReceived(self, line: bytes) -> None:
        if self._sasl.waiting:
            self._answer(self._authResponse(line))
        else:
            self._handleLine(line)

    def lineTooLong(self) -> None:
        self._sasl.abandon()
        self._badCommand(E_TOO_LONG)

    def _handleLine(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        name = verb.decode("ascii", "replace").upper()
        if self._state == _AUTHORIZATION:
            handler = self._authorizationHandlers.get(name)
            fallback = E_AUTH_FIRST if name in self._transactionHandlers else E_UNKNOWN
        else:
            handler = self._transactionHandlers.get(name)
            fallback = E_NOT_NOW if name in self._authorizationHandlers else E_UNKNOWN
        if handler is None:
            self._badCommand(fallback)
            return
        try:
            result = handler(self, argument)
        except _Bad as e:
            self._badCommand(e.reply)
            return
        except _NoSuchMessage as e:
            self._write(e.reply)
            return
        self._answer(result)

    def internalError(self, failure: Failure) -> bytes:
        log.failure("POP3 internal error with {peer}", failure, peer=self.peerHost)
        return E_TEMPORARY

    def tooManyBadCommands(self) -> None:
        log.info("POP3: too many bad commands from {peer}", peer=self.peerHost)
        self._write(b"-ERR too many bad commands, closing connection")

    def _write(self, reply: bytes) -> None:
        if self.transport is not None and self._state != _CLOSED:
            writeNow(self.transport, reply + b"\r\n")

    def _writeRaw(self, data: bytes) -> None:
        if self.transport is not None and self._state != _CLOSED:
            writeNow(self.transport, data)

    # -- AUTHORIZATION ---------------------------------------------------------

    @property
    def plaintextAllowed(self) -> bool:
        return bool(self.factory.plaintextAllowed(self.peerHost, self.secure))

    def do_CAPA(self, argument: bytes) -> Reply:
        lines = [b"+OK capability list follows", b"TOP", b"UIDL"]
        if self._state == _AUTHORIZATION:
            if self.plaintextAllowed and self.factory.offersUSER:
                lines.append(b"USER")
            mechanisms = self.factory.mechanisms(self.plaintextAllowed)
            if mechanisms:
                lines.append(("SASL " + " ".join(mechanisms)).encode("ascii"))
            if self.factory.tls is not None and not self.secure:
                lines.append(b"STLS")
        lines += [
            b"RESP-CODES",
            b"AUTH-RESP-CODE",
            b"PIPELINING",
            b"IMPLEMENTATION qmailtx",
            b".",
        ]
        return b"\r\n".join(lines)

    def do_NOOP(self, argument: bytes) -> Reply:
        return b"+OK"

    def do_QUIT(self, argument: bytes) -> Answer:
        if self._state == _TRANSACTION:
            return Deferred.fromCoroutine(self._update())
        self._write(b"+OK " + self.settings.me.encode("ascii", "replace") + b" bye")
        self._close()
        return None

    def do_STLS(self, argument: bytes) -> Reply:
        tls = self.factory.tls
        if tls is None:
            raise _Bad(E_UNKNOWN)
        if self.secure:
            raise _Bad(b"-ERR already using TLS")
        if argument:
            raise _Bad(E_SYNTAX)
        startTLS = getattr(self.transport, "startTLS", None)
        if startTLS is None:
            return b"-ERR [SYS/TEMP] TLS not available"
        self._write(b"+OK begin TLS negotiation")
        # CVE-2011-0411: nothing sent in plaintext after STLS may count as
        # said inside TLS.
        discarded = self._discardPipelined()
        if discarded:
            log.info(
                "POP3: discarded {count} bytes pipelined after STLS from {peer}",
                count=discarded,
                peer=self.peerHost,
            )
        self._user = None
        self.secure = True
        startTLS(tls)
        return None

    def do_USER(self, argument: bytes) -> Reply:
        if not self.factory.offersUSER:
            raise _Bad(E_UNKNOWN)
        if not self.plaintextAllowed:
            raise _Bad(E_PLAINTEXT)
        if not argument.strip():
            raise _Bad(E_SYNTAX)
        self._user = argument.strip()
        return b"+OK"

    def do_PASS(self, argument: bytes) -> Answer:
        if self._user is None:
            raise _Bad(b"-ERR USER first")
        if not self.plaintextAllowed:  # STLS in between forgets USER, so only a config change
            raise _Bad(E_PLAINTEXT)
        user, self._user = self._user, None
        if not argument:
            raise _Bad(E_SYNTAX)
        return Deferred.fromCoroutine(self._login("USER", UsernamePassword(user, argument)))

    def do_APOP(self, argument: bytes) -> Answer:
        if not self.factory.offersAPOP:
            raise _Bad(E_UNKNOWN)
        name, _, digest = argument.strip().rpartition(b" ")
        if not name or len(digest) != 32:
            raise _Bad(E_SYNTAX)
        self._user = None
        credentials = APOPCredentials(self.timestamp, name, digest.lower())
        return Deferred.fromCoroutine(self._login("APOP", credentials))

    def do_AUTH(self, argument: bytes) -> Answer:
        words = argument.decode("ascii", "replace").split(" ") if argument else []
        if not words:  # the pre-RFC 5034 listing some clients still ask for
            names = self.factory.mechanisms(self.plaintextAllowed)
            return b"\r\n".join([b"+OK", *(n.encode("ascii") for n in names), b"."])
        if len(words) > 2:
            raise _Bad(E_SYNTAX)
        name = words[0].upper()
        if name not in self.factory.mechanisms(True):
            raise _Bad(b"-ERR unrecognized authentication type")
        if name not in self.factory.mechanisms(self.plaintextAllowed):
            raise _Bad(E_PLAINTEXT)
        self._user = None
        initial = words[1] if len(words) == 2 else None
        try:
            step = self._sasl.start(self.factory.exchange(name), initial)
        except AuthInputError as e:
            raise _Bad(b"-ERR " + e.reply.text.encode("ascii")) from None
        return self._authStep(step)

    def _authResponse(self, line: bytes) -> Answer:
        try:
            step = self._sasl.respond(line)
        except AuthInputError as e:
            self._badCommand(b"-ERR " + e.reply.text.encode("ascii"))
            return None
        return self._authStep(step)

    def _authStep(self, step: Step | Refused) -> Answer:
        if isinstance(step, Refused):
            return Deferred.fromCoroutine(self._penalise(self._sasl.mechanism))
        if isinstance(step, Challenge):
            self._writeRaw(b"+ " + base64.b64encode(step.data) + b"\r\n")
            return None
        return Deferred.fromCoroutine(self._login(self._sasl.mechanism, step))

    async def _login(self, mechanism: str, credentials: Credentials | APOPCredentials) -> Reply:
        try:
            result = await self.factory.portal.login(credentials, None, IMailAccount)
        except (UnauthorizedLogin, AuthRefused):
            return await self._penalise(mechanism)
        except DatabaseUnavailable as e:
            log.warn(
                "POP3 {mechanism} from {peer}: user database unavailable: {error}",
                mechanism=mechanism,
                peer=self.peerHost,
                error=str(e),
            )
            return E_TEMPORARY
        _, avatar, logout = result
        account = IMailAccount(avatar)
        if self._state != _AUTHORIZATION:
            logout()
            return None
        try:
            messages: list[Message] = await self.factory.runner(
                scanMaildir, account.maildir, self.factory.sizes
            )
        except OSError as e:
            logout()
            log.warn(
                "POP3 {user}: cannot read the Maildir {maildir}: {error}",
                user=account.address,
                maildir=account.maildir,
                error=e.strerror,
            )
            return E_MAILBOX
        if self._state != _AUTHORIZATION:
            logout()
            return None
        self._sasl.succeeded(self.peerHost, logout, account.address)
        self._state = _TRANSACTION
        self._address = account.address
        self._maildir = account.maildir
        self._messages = messages
        self._background(
            "sweep of tmp/",
            sweepTrash,
            account.maildir,
            self.factory.clock.seconds(),
            self.factory.tmpSweeper,
        )
        total = sum(m.size for m in messages)
        log.info(
            "POP3 {mechanism} login {user} from {peer}: {count} messages, {octets} octets",
            mechanism=mechanism,
            user=account.address,
            peer=self.peerHost,
            count=len(messages),
            octets=total,
        )
        return f"+OK maildrop has {len(messages)} messages ({total} octets)".encode("ascii")

    async def _penalise(self, mechanism: str) -> Reply:
        delay = self._sasl.failed(self.peerHost)
        log.info(
            "POP3 {mechanism} refused from {peer}; answering in {delay} s",
            mechanism=mechanism,
            peer=self.peerHost,
            delay=delay,
        )
        if self._state != _CLOSED and await self._sasl.wait(delay):
            self._badCommand(E_AUTH_FAILED)
        return None

    # -- TRANSACTION -------------------------------------------------------------

    def _message(self, argument: bytes) -> Message:
        """The message a (1-based) number names; deleted ones are refused."""
        return self._numbered(argument)[1]

    def _numbered(self, argument: bytes) -> tuple[int, Message]:
        """(number, message) for a message number; deleted ones are refused."""
        try:
            text = argument.decode("ascii")
            if not text.isdigit():
                raise ValueError(text)
            number = int(text)
        except (UnicodeDecodeError, ValueError):
            raise _Bad(E_SYNTAX) from None
        if not 1 <= number <= len(self._messages):
            raise _NoSuchMessage(E_NO_MESSAGE)
        message = self._messages[number - 1]
        if message.deleted:
            raise _NoSuchMessage(E_DELETED)
        return number, message

    def do_STAT(self, argument: bytes) -> Reply:
        live = [m for m in self._messages if not m.deleted]
        return f"+OK {len(live)} {sum(m.size for m in live)}".encode("ascii")

    def _listing(self, argument: bytes, field: Callable[[Message], str], what: str) -> Reply:
        if argument:
            number, message = self._numbered(argument.strip())
            return f"+OK {number} {field(message)}".encode("ascii")
        lines = [f"+OK {what}"]
        lines += [f"{i} {field(m)}" for i, m in enumerate(self._messages, 1) if not m.deleted]
        lines.append(".")
        return "\r\n".join(lines).encode("ascii")

    def do_LIST(self, argument: bytes) -> Reply:
        return self._listing(argument, lambda m: str(m.size), "scan listing follows")

    def do_UIDL(self, argument: bytes) -> Reply:
        return self._listing(argument, lambda m: m.uid, "unique-id listing follows")

    def do_DELE(self, argument: bytes) -> Reply:
        message = self._message(argument.strip())
        message.deleted = True
        return b"+OK message deleted"

    def do_RSET(self, argument: bytes) -> Reply:
        for message in self._messages:
            message.deleted = False
        live = len(self._messages)
        return f"+OK maildrop has {live} messages".encode("ascii")

    def do_RETR(self, argument: bytes) -> Reply:
        message = self._message(argument.strip())
        return self._send(message, None, f"+OK {message.size} octets")

    def do_TOP(self, argument: bytes) -> Reply:
        words = argument.split()
        if len(words) != 2 or not words[1].isdigit():
            raise _Bad(E_SYNTAX)
        message = self._message(words[0])
        return self._send(message, int(words[1]), "+OK top of message follows")

    def _send(self, message: Message, lines: int | None, status: str) -> Reply:
        if lines is None and message.size <= SMALL_MESSAGE:
            data = readSmall(self._maildir, message, SMALL_MESSAGE)
            if data is None:
                return self._vanished(message)
            message.retrieved = True
            if len(data) <= SMALL_MESSAGE:
                self._writeRaw(status.encode("ascii") + b"\r\n" + convertAll(data))
                return None
            # It grew: stream it after all.
        f = openMessage(self._maildir, message)
        if f is None:
            return self._vanished(message)
        if lines is None:
            message.retrieved = True
        self._writeRaw(status.encode("ascii") + b"\r\n")
        self._stream = MessageStream(f, lines)
        self._busy = True
        self._pump()
        return None

    def _vanished(self, message: Message) -> Reply:
        log.info(
            "POP3 {user}: message {uid} vanished (another session?)",
            user=self._address,
            uid=logsafe(message.uid),
        )
        return E_VANISHED

    def _pump(self) -> None:
        """Send the message being retrieved until the transport has enough."""
        while self._stream is not None and not self._outputBlocked:
            stream = self._stream
            try:
                chunk = stream.read()
            except OSError as e:
                # Headers already went out: the only honest end is a hang-up.
                log.warn(
                    "POP3 {user}: read error in RETR: {error}",
                    user=self._address,
                    error=e.strerror,
                )
                self._close()
                return
            if chunk:
                self._writeRaw(chunk)
            if stream.done:
                self._stream = None
                self._busy = False
                self._resetTimer()
                self._process()
                return
        if self._stream is not None:
            self._resetTimer()  # the client is reading: not idle

    # -- UPDATE ------------------------------------------------------------------

    async def _update(self) -> Reply:
        self._state = _UPDATE
        deleted = sum(1 for m in self._messages if m.deleted)
        quotaLimit = self.factory.quotaLimitFor(self._address)
        try:
            result: UpdateResult = await self.factory.runner(
                commit, self._maildir, self._messages, quotaLimit
            )
        except Exception:
            log.failure("POP3 {user}: UPDATE failed", user=self._address)
            reply = b"-ERR [SYS/TEMP] unable to update the mailbox"
            result = UpdateResult()
        else:
            log.info(
                "POP3 {user} from {peer} quit: {deleted} deleted ({octets} octets),"
                " {vanished} already gone, {seen} marked seen",
                user=self._address,
                peer=self.peerHost,
                deleted=result.deleted,
                octets=result.deletedBytes,
                vanished=result.vanished,
                seen=result.seen,
            )
            if result.failed:
                reply = b"-ERR [SYS/TEMP] some deleted messages not removed"
            else:
                reply = f"+OK {self.settings.me} bye ({deleted} deleted)".encode("ascii", "replace")
        self._write(reply)
        self._close()
        if result.trash:
            self._background("purge", purge, result.trash)
        return None

    def _background(self, what: str, f: Callable[..., int], *args: Any) -> None:
        """Disk work the client does not wait for (removing deleted messages)."""
        d: Deferred[int] = self.factory.runner(f, *args)
        d.addErrback(
            lambda failure: log.failure(
                "POP3 {user}: {what} failed", failure, user=self._address, what=what
            )
        )

    _authorizationHandlers: dict[str, Callable[[POP3Server, bytes], Any]] = {
        "CAPA": do_CAPA,
        "USER": do_USER,
        "PASS": do_PASS,
        "APOP": do_APOP,
        "AUTH": do_AUTH,
        "STLS": do_STLS,
        "NOOP": do_NOOP,
        "QUIT": do_QUIT,
    }
    _transactionHandlers: dict[str, Callable[[POP3Server, bytes], Any]] = {
        "CAPA": do_CAPA,
        "STAT": do_STAT,
        "LIST": do_LIST,
        "UIDL": do_UIDL,
        "TOP": do_TOP,
        "RETR": do_RETR,
        "DELE": do_DELE,
        "RSET": do_RSET,
        "NOOP": do_NOOP,
        "QUIT": do_QUIT,
    }


class _NoSuchMessage(Exception):
    """A message number out of range or deleted: -ERR, not a bad command."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply)
        self.reply = reply
