"""The ESMTP server protocol: framing, the command state machine, replies in order.

Input is taken in bulk. In command mode lines end at LF (a CR before it is
dropped, as qmail and Postfix do); a line longer than the limit is answered
with one 500 when it ends and is never split into commands. In DATA mode the
bytes go through ``DataParser`` (strict CRLF) straight into a queue spool.

Replies leave in command order: while a command waits for something (a
check answering later, the queue's fsync, a login), or while the client is
not reading our replies, later pipelined input stays buffered and
unprocessed; reading from the socket is paused once that buffer is full. (It
is not paused at once when the transport pauses us: a TLS transport does so
while its handshake is unfinished, and the handshake needs reading.)

AUTH (``qmailtx.smtp.auth``) reads its continuation lines in the same line
mode, up to RFC 4954's 12288 octets; they are never taken as commands, and
never logged. A failed login is answered after the throttle's delay.

Time limits: the idle timer (``timeoutsmtpd``) restarts with every read,
so one message's DATA also has a total deadline (``[smtp] data_timeout``):
past it the client gets ``451 4.4.2 timeout``, the spool is discarded and
the connection closed (threats.md S12). Past the factory's connection caps
a new client gets 421 and is closed before anything it sends is read (S13).

STARTTLS (RFC 3207) answers 220, throws away whatever the client sent after
the STARTTLS line (CVE-2011-0411: nothing pipelined in plaintext may run
inside TLS), forgets the session (HELO, transaction, AUTH) and starts TLS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.connlimit import Admission
from qmailtx.lineserver import LineServer
from qmailtx.policy.chain import runChecks
from qmailtx.policy.interfaces import IDataCheck
from qmailtx.policy.verdict import Verdict, VerdictKind
from qmailtx.queue.disk import isDiskFull
from qmailtx.queue.filter import QueueRefused
from qmailtx.queue.store import Spool
from qmailtx.reply import SMTPRejection, SMTPReply
from qmailtx.sasl import Refused, SASLSession
from qmailtx.smtp.auth import (
    AUTH_LINE_LIMIT,
    R_AUTH_AGAIN,
    R_AUTH_ENCRYPT,
    R_AUTH_FAILED,
    R_AUTH_IN_MAIL,
    R_AUTH_OK,
    R_AUTH_REQUIRED,
    R_AUTH_SYNTAX,
    R_AUTH_TEMPORARY,
    R_AUTH_TOO_LONG,
    R_AUTH_UNAVAILABLE,
    R_AUTH_UNKNOWN,
    AuthInputError,
    AuthRefused,
    Challenge,
    Credentials,
    Login,
    Step,
)
from qmailtx.smtp.commands import parseCommand, parsePathCommand
from qmailtx.smtp.data import BareLineEnding, DataParser
from qmailtx.smtp.received import protocolName, receivedLine
from qmailtx.smtp.session import SMTPSession
from qmailtx.smtp.tls import describeConnection
from qmailtx.smtp.writethrough import writeNow
from qmailtx.vdomain.interfaces import DatabaseUnavailable

if TYPE_CHECKING:
    from qmailtx.smtp.factory import SMTPServerFactory

log = Logger()

_COMMAND, _DATA, _CLOSED = "command", "data", "closed"

R_OK = SMTPReply(250, "2.0.0", "ok")
R_MAIL_OK = SMTPReply(250, "2.1.0", "ok")
R_RCPT_OK = SMTPReply(250, "2.1.5", "ok")
R_FLUSHED = SMTPReply(250, "2.0.0", "flushed")
R_GO_AHEAD = SMTPReply(354, "", "go ahead")
R_VRFY = SMTPReply(252, "2.0.0", "send some mail, i'll try my best")
R_HELP = SMTPReply(214, "2.0.0", "qmail home page: http://pobox.com/~djb/qmail.html")
R_UNIMPLEMENTED = SMTPReply(502, "5.5.1", "unimplemented")
R_ARGUMENT = SMTPReply(501, "5.5.4", "syntax error")
R_MAIL_FIRST = SMTPReply(503, "5.5.1", "MAIL first")
R_RCPT_FIRST = SMTPReply(503, "5.5.1", "RCPT first")
R_NESTED_MAIL = SMTPReply(503, "5.5.1", "only one MAIL command allowed")
R_TOO_LONG = SMTPReply(500, "5.5.2", "line too long")
R_TOO_MANY_RCPTS = SMTPReply(452, "4.5.3", "too many recipients")
R_TOO_BIG = SMTPReply(552, "5.3.4", "sorry, that message size exceeds my databytes limit")
R_HOPS = SMTPReply(554, "5.4.6", "too many hops, this message is looping")
R_BARE_LF = SMTPReply(451, "4.6.0", "See http://pobox.com/~djb/docs/smtplf.html.")
R_TIMEOUT = SMTPReply(451, "4.4.2", "timeout")
R_DISK_FULL = SMTPReply(452, "4.3.1", "qq write error or disk full")
R_QUEUE_ERROR = SMTPReply(451, "4.3.0", "qq write error or disk full")
R_BAD_PARAMETER = SMTPReply(555, "5.5.4", "unsupported parameter")
R_INTERNAL = SMTPReply(451, "4.3.0", "internal error, try again later")
R_TLS_READY = SMTPReply(220, "2.0.0", "ready for tls")
R_TLS_PARAMETERS = SMTPReply(501, "5.5.4", "syntax error (no parameters allowed)")
R_TLS_UNAVAILABLE = SMTPReply(454, "4.3.0", "TLS not available")


@implementer(IHandshakeListener)
class ESMTPServer(LineServer[SMTPReply]):
    def __init__(self, factory: SMTPServerFactory) -> None:
        super().__init__(factory.clock, factory.settings.timeout, factory.settings.maxBadCommands)
        self.factory = factory
        self.settings = factory.settings
        self.session = SMTPSession("unknown", 0, listener=self.settings.listener)
        self._mode = _COMMAND
        self._data: DataParser | None = None
        self._spool: Spool | None = None
        self._checks: list[IDataCheck] = []
        self._sasl = SASLSession(factory.clock, factory.throttle)
        self._admitted: str | None = None  # the host the limiter counted us for
        self._dataDeadline: IDelayedCall | None = None

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", "unknown")
        self.session = SMTPSession(
            host,
            getattr(peer, "port", 0),
            listener=self.settings.listener,
            clientRelay=self.settings.isRelayClient(host),
            secure=self.settings.implicitTLS,
        )
        admission = self.factory.limiter.acquire(host)
        if not admission:
            self._refuseConnection(admission)
            return
        self._admitted = host
        self.startServing()
        self._write(SMTPReply(220, "", f"{self.settings.greeting} ESMTP"))

    def _refuseConnection(self, admission: Admission) -> None:
        """Over a connection cap: 421 and hang up, reading nothing (S13)."""
        me = self.settings.me
        if admission is Admission.TOO_MANY_IN_TOTAL:
            reply = SMTPReply(421, "4.3.2", f"{me} too many connections, try again later")
        else:
            reply = SMTPReply(
                421, "4.7.0", f"{me} too many connections from your address, try again later"
            )
        self._write(reply)
        self._mode = _CLOSED
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._mode = _CLOSED
        self._stopTimer()
        self._abortData()
        self._sasl.close()
        admitted, self._admitted = self._admitted, None
        if admitted is not None:
            self.factory.limiter.release(admitted)

    def handshakeCompleted(self) -> None:
        log.info(
            "TLS with {peer} session {session}: {tls}",
            peer=self.session.peerHost,
            session=self.session.sessionId,
            tls=describeConnection(self.transport) or "?",
        )

    @property
    def closed(self) -> bool:
        return self._mode == _CLOSED

    def closing(self) -> None:
        self._mode = _CLOSED
        self._abortData()

    def _abortData(self) -> None:
        self._stopDataDeadline()
        if self._spool is not None:
            self._spool.abort()
        self._spool = None
        self._data = None
        self._checks = []

    # -- DATA deadline ------------------------------------------------------------

    def _startDataDeadline(self) -> None:
        """Bound one message's DATA in total, however the bytes trickle in
        (S12: the idle timer alone restarts with every byte)."""
        self._stopDataDeadline()
        if self.settings.dataTimeout > 0:
            self._dataDeadline = self.factory.clock.callLater(
                self.settings.dataTimeout, self._dataTimedOut
            )

    def _stopDataDeadline(self) -> None:
        deadline, self._dataDeadline = self._dataDeadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _dataTimedOut(self) -> None:
        self._dataDeadline = None
        if self._mode != _DATA:
            return
        log.info(
            "DATA from {peer} session {session} not done after {seconds} s: closing,"
            " nothing queued",
            peer=self.session.peerHost,
            session=self.session.sessionId,
            seconds=self.settings.dataTimeout,
        )
        self._write(R_TIMEOUT)
        self._close()

    # -- line server hooks ----------------------------------------------------

    def timedOut(self) -> None:
        log.info(
            "timeout: closing session {session} from {peer}",
            session=self.session.sessionId,
            peer=self.session.peerHost,
        )
        self._write(R_TIMEOUT)

    def nextInput(self) -> bool:
        if self._mode == _DATA:
            chunk, self._buffer = self._buffer, b""
            self._dataChunk(chunk)
            return True
        return self._nextLine()

    def lineLimit(self, buf: bytes) -> int:
        """Longest line accepted: AUTH lines (the command and the exchange's
        responses) may be longer than commands (RFC 4954)."""
        limit = self.settings.maxCommandLine
        if self._sasl.waiting or buf[:5].upper() == b"AUTH ":
            return max(limit, AUTH_LINE_LIMIT)
        return limit

    def lineTooLong(self) -> None:
        if self._sasl.waiting:
            self._sasl.abandon()
            self._badCommand(R_AUTH_TOO_LONG)
        else:
            self._badCommand(R_TOO_LONG)

    def lineOverflowed(self) -> None:
        self._write(SMTPReply(421, "4.7.0", "line too long, closing connection"))

    def lineReceived(self, line: bytes) -> None:
        if self._sasl.waiting:
            self._answer(self._authResponse(line))
        else:
            self._handleLine(line)

    def _handleLine(self, line: bytes) -> None:
        try:
            command = parseCommand(line)
            handler = self._handlers.get(command.verb)
            if handler is None:
                self._badCommand(R_UNIMPLEMENTED)
                return
            result = handler(self, command.argument)
        except SMTPRejection as e:
            self._badCommand(e.reply)
            return
        self._answer(result)

    def internalError(self, failure: Failure) -> SMTPReply:
        log.failure("internal error in session {session}", failure, session=self.session.sessionId)
        return R_INTERNAL

    def tooManyBadCommands(self) -> None:
        log.info(
            "too many bad commands from {peer} session {session}",
            peer=self.session.peerHost,
            session=self.session.sessionId,
        )
        self._write(SMTPReply(421, "4.7.0", f"{self.settings.me} too many errors"))

    def _write(self, reply: SMTPReply) -> None:
        if self.transport is not None and self._mode != _CLOSED:
            writeNow(self.transport, reply.toBytes())

    # -- verdicts ----------------------------------------------------------------

    def _judge(
        self, verdict: Verdict | Deferred[Verdict], accept: Callable[[], SMTPReply]
    ) -> SMTPReply | Deferred[SMTPReply]:
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._verdictReply, accept)
        return self._verdictReply(verdict, accept)

    def _verdictReply(self, verdict: Verdict, accept: Callable[[], SMTPReply]) -> SMTPReply:
        if verdict.kind in (VerdictKind.CONTINUE, VerdictKind.ACCEPT):
            return accept()
        assert verdict.reply is not None
        if verdict.kind is VerdictKind.DISCONNECT:
            # Written now; the closed connection drops the second write.
            self._write(verdict.reply)
            self._close()
        return verdict.reply

    # -- commands ----------------------------------------------------------------

    def _qualify(self, address: Address) -> Address:
        if address.domain or address.isNull:
            return address
        return address.withDomain(self.settings.envnoathost)

    def smtp_HELO(self, argument: str) -> SMTPReply:
        if not argument:
            raise SMTPRejection(SMTPReply(501, "5.5.4", "HELO requires a domain"))
        self.session.resetTransaction()
        self.session.helo = argument
        self.session.esmtp = False
        return SMTPReply(250, "", self.settings.greeting)

    def smtp_EHLO(self, argument: str) -> SMTPReply:
        if not argument:
            raise SMTPRejection(SMTPReply(501, "5.5.4", "EHLO requires a domain"))
        self.session.resetTransaction()
        self.session.helo = argument
        self.session.esmtp = True
        lines = [self.settings.greeting, *self.factory.extensions(self.session)]
        return SMTPReply(250, "", "\n".join(lines))

    def smtp_MAIL(self, argument: str) -> SMTPReply | Deferred[SMTPReply]:
        if self.settings.requireAuth and self.session.authenticatedAs is None:
            raise SMTPRejection(R_AUTH_REQUIRED)
        if self.session.sender is not None:
            raise SMTPRejection(R_NESTED_MAIL)
        command = parsePathCommand(argument, "FROM", allowNull=True)
        params = command.parameters
        for key in params:
            if key not in ("SIZE", "BODY", "AUTH"):
                raise SMTPRejection(R_BAD_PARAMETER)
        if "AUTH" in params and not _validAuthParameter(params["AUTH"]):
            raise SMTPRejection(R_ARGUMENT)
        body = params.get("BODY")
        if "BODY" in params and (body is None or body.upper() not in ("7BIT", "8BITMIME")):
            raise SMTPRejection(R_ARGUMENT)
        if "SIZE" in params:
            size = params["SIZE"]
            if size is None or not size.isdigit() or len(size) > 20:
                raise SMTPRejection(R_ARGUMENT)
            if self.settings.databytes and int(size) > self.settings.databytes:
                return R_TOO_BIG
        sender = self._qualify(command.address)
        session = self.session

        def accept() -> SMTPReply:
            session.sender = sender
            session.recipients = []
            session.bodyType = body.upper() if body else None
            return R_MAIL_OK

        verdict = runChecks(
            self.factory.senderChecks, lambda c: c.checkSender(session, sender, params)
        )
        return self._judge(verdict, accept)

    def smtp_RCPT(self, argument: str) -> SMTPReply | Deferred[SMTPReply]:
        session = self.session
        if session.sender is None:
            raise SMTPRejection(R_MAIL_FIRST)
        command = parsePathCommand(argument, "TO", allowNull=False)
        if command.parameters:
            raise SMTPRejection(R_BAD_PARAMETER)
        recipient = self._qualify(command.address)
        if len(session.recipients) >= self.settings.maxRecipients:
            return R_TOO_MANY_RCPTS

        def accept() -> SMTPReply:
            lowered = recipient.lowered()
            if session.sender is not None and all(
                r.lowered() != lowered for r in session.recipients
            ):
                session.recipients.append(recipient)
            return R_RCPT_OK

        verdict = runChecks(
            self.factory.recipientChecks, lambda c: c.checkRecipient(session, recipient)
        )
        return self._judge(verdict, accept)

    def smtp_DATA(self, argument: str) -> SMTPReply:
        session = self.session
        if argument:
            raise SMTPRejection(R_ARGUMENT)
        if session.sender is None:
            raise SMTPRejection(R_MAIL_FIRST)
        if not session.recipients:
            raise SMTPRejection(R_RCPT_FIRST)
        now = self.factory.clock.seconds()
        info = {"c": session.peerHost, "s": session.sessionId}
        if session.relayAllowed:
            info["r"] = "1"  # a QMAILQUEUE filter sees RELAYCLIENT, as in qmail
        if session.authenticatedAs is not None:
            info["u"] = session.authenticatedAs  # ... and TCPREMOTEINFO
        self._spool = self.factory.store.openSpool(
            now, session.sender, list(session.recipients), info
        )
        authenticated = session.authenticatedAs is not None
        self._spool.write(
            receivedLine(
                session.helo,
                session.peerHost,
                self.settings.me,
                protocolName(session.esmtp, session.secure, authenticated),
                now,
                remoteInfo=session.authenticatedAs,
                tls=describeConnection(self.transport) if session.secure else None,
                timezone=self.settings.timezone,
            )
        )
        self._data = DataParser(self.settings.databytes)
        self._checks = [makeCheck(session) for _, makeCheck in self.factory.dataChecks]
        self._mode = _DATA
        self._startDataDeadline()
        return R_GO_AHEAD

    def smtp_RSET(self, argument: str) -> SMTPReply:
        self.session.resetTransaction()
        return R_FLUSHED

    def smtp_NOOP(self, argument: str) -> SMTPReply:
        return R_OK

    def smtp_VRFY(self, argument: str) -> SMTPReply:
        return R_VRFY

    def smtp_HELP(self, argument: str) -> SMTPReply:
        return R_HELP

    def smtp_QUIT(self, argument: str) -> None:
        self._write(SMTPReply(221, "2.0.0", self.settings.greeting))
        self._close()

    # -- STARTTLS ------------------------------------------------------------------

    def smtp_STARTTLS(self, argument: str) -> SMTPReply | None:
        tls = self.factory.tls
        if tls is None or self.session.secure:
            raise SMTPRejection(R_UNIMPLEMENTED)
        if argument:
            raise SMTPRejection(R_TLS_PARAMETERS)
        startTLS = getattr(self.transport, "startTLS", None)
        if startTLS is None:
            return R_TLS_UNAVAILABLE
        self._write(R_TLS_READY)
        # CVE-2011-0411: what the client sent after STARTTLS was sent in
        # plaintext; none of it may be taken as said inside TLS.
        discarded = self._discardPipelined()
        if discarded:
            log.info(
                "discarded {count} bytes pipelined after STARTTLS from {peer} session {session}",
                count=discarded,
                peer=self.session.peerHost,
                session=self.session.sessionId,
            )
        self._forgetSession(secure=True)
        startTLS(tls)
        return None

    def _forgetSession(self, secure: bool) -> None:
        """RFC 3207 4.2: forget what the client told us (HELO, transaction, AUTH)."""
        old = self.session
        self._sasl.endLogin()
        self._sasl.abandon()
        self.session = SMTPSession(
            old.peerHost,
            old.peerPort,
            listener=old.listener,
            sessionId=old.sessionId,
            clientRelay=old.clientRelay,
            secure=secure,
        )

    # -- AUTH ----------------------------------------------------------------------

    def smtp_AUTH(self, argument: str) -> SMTPReply | Deferred[SMTPReply | None] | None:
        auth = self.factory.auth
        session = self.session
        if auth is None:
            raise SMTPRejection(R_AUTH_UNAVAILABLE)
        if session.authenticatedAs is not None:
            raise SMTPRejection(R_AUTH_AGAIN)
        if session.sender is not None:
            raise SMTPRejection(R_AUTH_IN_MAIL)
        words = argument.split(" ")
        if len(words) > 2:
            raise SMTPRejection(R_AUTH_SYNTAX)
        name = words[0].upper()
        if name not in auth.mechanisms:
            raise SMTPRejection(R_AUTH_UNKNOWN)
        if name not in self.factory.authMechanisms(session):
            raise SMTPRejection(R_AUTH_ENCRYPT)
        exchange = auth.exchange(name, self.factory.clock.seconds())
        try:
            step = self._sasl.start(exchange, words[1] if len(words) == 2 else None)
        except AuthInputError as e:
            raise SMTPRejection(e.reply) from None
        return self._authStep(step)

    def _authResponse(self, line: bytes) -> SMTPReply | Deferred[SMTPReply | None] | None:
        """One client line of the AUTH exchange (never a command)."""
        try:
            step = self._sasl.respond(line)
        except AuthInputError as e:
            self._badCommand(e.reply)
            return None
        return self._authStep(step)

    def _authStep(self, step: Step | Refused) -> SMTPReply | Deferred[SMTPReply | None] | None:
        if isinstance(step, Refused):
            return Deferred.fromCoroutine(self._penalise(self.session))
        if isinstance(step, Challenge):
            if self.transport is not None:
                writeNow(self.transport, step.toBytes())
            return None
        return Deferred.fromCoroutine(self._login(step))

    async def _login(self, credentials: Credentials) -> SMTPReply | None:
        auth = self.factory.auth
        assert auth is not None
        session = self.session
        mechanism = self._sasl.mechanism
        try:
            login: Login = await auth.login(credentials)
        except (UnauthorizedLogin, AuthRefused):
            return await self._penalise(session)
        except DatabaseUnavailable as e:
            log.warn(
                "AUTH {mechanism} from {peer} session {session}: user database unavailable:"
                " {error}",
                mechanism=mechanism,
                peer=session.peerHost,
                session=session.sessionId,
                error=str(e),
            )
            return R_AUTH_TEMPORARY
        except Exception:
            log.failure(
                "AUTH {mechanism} from {peer} session {session} failed",
                mechanism=mechanism,
                peer=session.peerHost,
                session=session.sessionId,
            )
            return R_AUTH_TEMPORARY
        if self._mode == _CLOSED or self.session is not session:
            login.logout()
            return None
        session.authenticatedAs = login.address
        self._sasl.succeeded(session.peerHost, login.logout, login.address)
        log.info(
            "AUTH {mechanism} as {user} from {peer} session {session}",
            mechanism=mechanism,
            user=login.address,
            peer=session.peerHost,
            session=session.sessionId,
        )
        return R_AUTH_OK

    async def _penalise(self, session: SMTPSession) -> SMTPReply | None:
        """A refused login: 535 after the client address's penalty delay."""
        delay = self._sasl.failed(session.peerHost)
        log.info(
            "AUTH {mechanism} refused from {peer} session {session}; answering in {delay} s",
            mechanism=self._sasl.mechanism,
            peer=session.peerHost,
            session=session.sessionId,
            delay=delay,
        )
        if self._mode != _CLOSED and await self._sasl.wait(delay):
            self._badCommand(R_AUTH_FAILED)
        return None

    _handlers: dict[str, Callable[[ESMTPServer, str], Any]] = {
        "HELO": smtp_HELO,
        "EHLO": smtp_EHLO,
        "MAIL": smtp_MAIL,
        "RCPT": smtp_RCPT,
        "DATA": smtp_DATA,
        "RSET": smtp_RSET,
        "NOOP": smtp_NOOP,
        "VRFY": smtp_VRFY,
        "HELP": smtp_HELP,
        "QUIT": smtp_QUIT,
        "STARTTLS": smtp_STARTTLS,
        "AUTH": smtp_AUTH,
    }

    # -- DATA ------------------------------------------------------------------

    def _dataChunk(self, chunk: bytes) -> None:
        assert self._data is not None and self._spool is not None
        try:
            result = self._data.feed(chunk)
        except BareLineEnding:
            log.info(
                "bare CR or LF in DATA from {peer} session {session}: refused, closing",
                peer=self.session.peerHost,
                session=self.session.sessionId,
            )
            self._write(R_BARE_LF)
            self._close()
            return
        if result.output:
            self._spool.write(result.output)
            for check in self._checks:
                check.dataReceived(result.output)
        if result.done:
            self._stopDataDeadline()
            self._buffer = result.rest + self._buffer
            self._mode = _COMMAND
            self._answer(self._endOfData())
        elif self._spool.needsDrain():
            self._answer(self._spool.whenDrained().addCallback(_noReply))

    def _endOfData(self) -> SMTPReply | Deferred[SMTPReply]:
        parser, spool = self._data, self._spool
        assert parser is not None and spool is not None
        self._data = self._spool = None
        session = self.session
        if parser.overflow or parser.hops > self.settings.maxHops:
            spool.abort()
            session.resetTransaction()
            if parser.overflow:
                log.info(
                    "message from {peer} too big ({size} bytes): refused",
                    peer=session.peerHost,
                    size=parser.size,
                )
                return R_TOO_BIG
            log.info(
                "message from {peer} looping ({hops} hops): refused",
                peer=session.peerHost,
                hops=parser.hops,
            )
            return R_HOPS
        checks, self._checks = self._checks, []
        sender, recipients = session.sender, list(session.recipients)
        session.resetTransaction()
        verdict = runChecks(checks, lambda c: c.endOfData())

        def judged(verdict: Verdict) -> SMTPReply | Deferred[SMTPReply]:
            if verdict.kind in (VerdictKind.CONTINUE, VerdictKind.ACCEPT):
                return self._commit(spool)
            spool.abort()
            log.info(
                "message from {sender} to {rcpt} refused at end of data: {code} {text}",
                sender=str(sender),
                rcpt=",".join(str(r) for r in recipients),
                peer=session.peerHost,
                session=session.sessionId,
                code=verdict.reply.code if verdict.reply else 0,
                text=verdict.reply.text if verdict.reply else "",
            )
            return self._verdictReply(verdict, lambda: R_OK)

        if isinstance(verdict, Deferred):
            return verdict.addCallback(judged)
        return judged(verdict)

    def _commit(self, spool: Spool) -> Deferred[SMTPReply]:
        session = self.session
        now = int(self.factory.clock.seconds())

        def queued(message: Any) -> SMTPReply:
            return SMTPReply(250, "2.0.0", f"ok {now} qp {message.msgid}")

        def failed(failure: Failure) -> SMTPReply:
            if isinstance(failure.value, QueueRefused):
                return failure.value.reply  # the QMAILQUEUE filter's answer (logged)
            log.failure(
                "could not queue message from {peer} session {session}",
                failure,
                peer=session.peerHost,
                session=session.sessionId,
            )
            return R_DISK_FULL if isDiskFull(failure.value) else R_QUEUE_ERROR

        return spool.commit().addCallbacks(queued, failed)


def _noReply(_: None) -> SMTPReply | None:
    return None


def _validAuthParameter(value: str | None) -> bool:
    """``AUTH=<>`` or an xtext mailbox (RFC 4954 5) whose decoding holds no
    control characters. The value is checked, then ignored: the server
    trusts no client's claim about who submitted a message."""
    if value is None:
        return False
    if value == "<>":
        return True
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            code = value[i + 1 : i + 3]
            if len(code) != 2 or any(h not in "0123456789ABCDEF" for h in code):
                return False
            if not 0x21 <= int(code, 16) <= 0x7E:
                return False
            i += 3
        else:
            i += 1
    return True
