"""The ESMTP client against small scripted servers on loopback (and smtp-sink).

``FakeMX`` is a deliberately simple server: it answers each command from
overridable methods, records every byte it got and the message it got after
DATA exactly as sent, and can start TLS with a self-signed certificate.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from qmailtx.address import Address
from qmailtx.delivery.interfaces import Outcome
from qmailtx.delivery.mx import Destination
from qmailtx.delivery.remote import RemoteDeliveryAgent, RemoteSettings
from qmailtx.queue.layout import TODO, QueuedMessage
from qmailtx.smtp import client
from qmailtx.smtp.client import ClientOptions, TransactionResult, sendMessage, wireMessage
from qmailtx.smtp.replies import Reply, ReplyError, ReplyParser
from qmailtx.smtp.source import BytesSource
from qmailtx.testing import makeTestCertificate

reactor: Any = _reactor
SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
)


class FakeMX(Protocol):
    greeting = b"220 mx.test ESMTP\r\n"
    extensions: list[str] = ["PIPELINING", "SIZE 1000000", "8BITMIME"]
    tlsExtensions: list[str] | None = None  # extensions inside TLS (default: same, no STARTTLS)
    afterStartTLS = b""  # plaintext sent right after "220 go ahead"
    waitForData = False  # hold MAIL/RCPT replies until DATA arrives (proves pipelining)

    def __init__(self, factory: FakeMXFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.inData = False
        self.held: list[bytes] = []
        self.tls = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.transport.write(self.greeting)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.lost.append(self)
        for d in self.factory.waiters:
            if not d.called:
                d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.factory.raw += data
        self.buffer += data
        while True:
            if self.inData:
                end = self.buffer.find(b"\r\n.\r\n")
                if self.buffer.startswith(b".\r\n"):
                    end = -2
                if end == -1:
                    return
                message, self.buffer = self.buffer[: end + 5], self.buffer[end + 5 :]
                self.inData = False
                self.factory.messages.append(message)
                self.write(self.endOfData(message))
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            self.factory.commands.append(line.decode())
            if self.tls:
                self.factory.encrypted.append(line.decode())
            if self.handle(line.decode()):
                return

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def ehlo(self) -> bytes:
        extensions = list(self.extensions)
        if self.tls and self.tlsExtensions is not None:
            extensions = list(self.tlsExtensions)
        if not self.tls and self.factory.certificate is not None:
            extensions.append("STARTTLS")
        lines = ["mx.test hello", *extensions]
        return b"".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode()
            for i, text in enumerate(lines)
        )

    def handle(self, line: str) -> bool:
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            self.write(self.ehlo())
        elif verb == "HELO":
            self.write(self.helo())
        elif verb == "STARTTLS":
            assert self.factory.certificate is not None
            self.write(b"220 go ahead\r\n" + self.afterStartTLS)
            self.buffer = b""
            self.tls = True
            self.transport.startTLS(self.factory.certificate.options())  # type: ignore[union-attr]
            return True
        elif verb == "AUTH":
            self.write(self.auth(line))
        elif verb == "MAIL":
            self.reply(b"250 2.1.0 sender ok\r\n")
        elif verb == "RCPT":
            self.reply(self.rcpt(line[len("RCPT TO:") :]))
        elif verb == "DATA":
            for held in self.held:
                self.write(held)
            self.held = []
            reply = self.data()
            if reply.startswith(b"354"):
                self.inData = True
            self.write(reply)
        elif verb == "QUIT":
            self.write(b"221 2.0.0 bye\r\n")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return True
        elif verb == "RSET":
            self.write(b"250 2.0.0 reset\r\n")
        else:
            self.write(b"502 5.5.2 what?\r\n")
        return False

    def reply(self, data: bytes) -> None:
        if self.waitForData:
            self.held.append(data)
        else:
            self.write(data)

    def helo(self) -> bytes:
        return b"250 mx.test\r\n"

    def rcpt(self, path: str) -> bytes:
        return b"250 2.1.5 ok\r\n"

    def data(self) -> bytes:
        return b"354 go on\r\n"

    def endOfData(self, message: bytes) -> bytes:
        return b"250 2.0.0 queued as 42\r\n"

    def auth(self, line: str) -> bytes:
        self.factory.auth.append(line)
        return b"235 2.7.0 ok\r\n"


class FakeMXFactory(Factory):
    def __init__(self, protocol: type[FakeMX], certificate: PrivateCertificate | None) -> None:
        self.protocolClass = protocol
        self.certificate = certificate
        self.raw = b""
        self.commands: list[str] = []
        self.encrypted: list[str] = []  # commands received inside TLS
        self.messages: list[bytes] = []
        self.auth: list[str] = []
        self.connections: list[FakeMX] = []
        self.lost: list[FakeMX] = []
        self.waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> FakeMX:
        return self.protocolClass(self)


class ClientTestCase(TestCase):
    """Starts a FakeMX on a loopback port and runs the client against it."""

    certificatePaths: tuple[str, str] | None = None

    def certificate(self) -> PrivateCertificate:
        if self.certificatePaths is None:
            self.certificatePaths = makeTestCertificate(self.mktemp(), "mx.test")
        cert, key = self.certificatePaths
        with open(cert, "rb") as c, open(key, "rb") as k:
            certificate: PrivateCertificate = PrivateCertificate.loadPEM(c.read() + k.read())
        return certificate

    async def serve(self, protocol: type[FakeMX] = FakeMX, tls: bool = False) -> FakeMXFactory:
        factory = FakeMXFactory(protocol, self.certificate() if tls else None)
        port: IListeningPort = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(self._closeAll, factory)
        self.port = port.getHost().port  # type: ignore[attr-defined]
        return factory

    async def _closeAll(self, factory: FakeMXFactory) -> None:
        for connection in factory.connections:
            if connection not in factory.lost:
                d: Deferred[None] = Deferred()
                factory.waiters.append(d)
                connection.transport.abortConnection()  # type: ignore[union-attr]
                await d

    async def send(
        self,
        message: bytes = b"Subject: hi\n\nhello\n",
        recipients: list[str] | None = None,
        port: int | None = None,
        **options: Any,
    ) -> TransactionResult:
        tlsCreator = options.pop("tlsCreator", None)
        settings = ClientOptions(heloName="client.test", **options)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.port)
        return await sendMessage(
            reactor,
            endpoint,
            settings,
            "sender@client.test",
            recipients if recipients is not None else ["rcpt@mx.test"],
            message,
            tlsCreator=tlsCreator,
        )


def codes(replies: list[Reply | None]) -> list[int | None]:
    return [r.code if r is not None else None for r in replies]


class DialogueTests(ClientTestCase):
    async def test_pipelinedHappyPath(self) -> None:
        class Pipelining(FakeMX):
            waitForData = True  # a client waiting for the MAIL reply would time out

        server = await self.serve(Pipelining)
        result = await self.send(recipients=["a@mx.test", "b@mx.test"], replyTimeout=5)
        self.assertIsNone(result.failure)
        self.assertEqual(result.peer, "127.0.0.1")
        self.assertEqual(result.greeting, Reply(220, ("mx.test ESMTP",)))
        self.assertEqual(codes(result.recipients), [250, 250])
        self.assertEqual(result.data, Reply(250, ("2.0.0 queued as 42",)))
        self.assertIsNone(result.tls)
        self.assertEqual(
            server.commands,
            [
                "EHLO client.test",
                "MAIL FROM:<sender@client.test> SIZE=22",
                "RCPT TO:<a@mx.test>",
                "RCPT TO:<b@mx.test>",
                "DATA",
                "QUIT",
            ],
        )
        self.assertEqual(server.messages, [b"Subject: hi\r\n\r\nhello\r\n.\r\n"])

    async def test_withoutPipelining(self) -> None:
        class Plain(FakeMX):
            extensions: list[str] = []

            def handle(self, line: str) -> bool:
                self.factory.pending.append(len(self.buffer))
                return super().handle(line)

        server = await self.serve(Plain)
        server.pending = []  # type: ignore[attr-defined]
        result = await self.send(recipients=["a@mx.test", "b@mx.test"])
        self.assertIsNone(result.failure)
        self.assertEqual(codes(result.recipients), [250, 250])
        self.assertEqual(result.data.code if result.data else None, 250)
        self.assertEqual(server.commands[1], "MAIL FROM:<sender@client.test>")
        # one command at a time: nothing was ever buffered behind a command
        self.assertEqual(server.pending, [0] * len(server.commands))  # type: ignore[attr-defined]

    async def test_perRecipientResults(self) -> None:
        class Mixed(FakeMX):
            def rcpt(self, path: str) -> bytes:
                if path.startswith("<temp"):
                    return b"450 4.2.1 try later\r\n"
                if path.startswith("<gone"):
                    return b"550 5.1.1 no such user\r\n"
                return b"250 2.1.5 ok\r\n"

        for pipelining in (True, False):
            Mixed.extensions = ["PIPELINING"] if pipelining else []
            server = await self.serve(Mixed)
            result = await self.send(recipients=["ok@mx.test", "temp@mx.test", "gone@mx.test"])
            self.assertIsNone(result.failure)
            self.assertEqual(codes(result.recipients), [250, 450, 550])
            self.assertEqual(result.recipients[2], Reply(550, ("5.1.1 no such user",)))
            self.assertEqual(result.data, Reply(250, ("2.0.0 queued as 42",)))
            self.assertEqual(len(server.messages), 1)

    async def test_noRecipientAccepted(self) -> None:
        class Refusing(FakeMX):
            def rcpt(self, path: str) -> bytes:
                return b"550 5.1.1 no\r\n"

            def data(self) -> bytes:
                return b"554 5.5.1 no valid recipients\r\n"

        for pipelining in (True, False):
            Refusing.extensions = ["PIPELINING"] if pipelining else []
            server = await self.serve(Refusing)
            result = await self.send(recipients=["a@mx.test", "b@mx.test"])
            self.assertIsNone(result.failure)
            self.assertEqual(codes(result.recipients), [550, 550])
            self.assertIsNone(result.data)
            self.assertEqual(server.messages, [])
            self.assertEqual(server.commands[-1], "QUIT")
            self.assertEqual("DATA" in server.commands, pipelining)

    async def test_pipelinedDataAcceptedWithoutRecipients(self) -> None:
        """RFC 2920: a 354 after all RCPTs failed gets a lone dot, no message."""

        class Sloppy(FakeMX):
            def rcpt(self, path: str) -> bytes:
                return b"550 5.1.1 no\r\n"

        server = await self.serve(Sloppy)
        result = await self.send()
        self.assertIsNone(result.failure)
        self.assertIsNone(result.data)
        self.assertEqual(server.messages, [b".\r\n"])

    async def test_senderRejected(self) -> None:
        class NoSender(FakeMX):
            extensions: list[str] = []

            def handle(self, line: str) -> bool:
                if line.startswith("MAIL"):
                    self.write(b"553 5.1.8 bad sender\r\n")
                    return False
                return super().handle(line)

        server = await self.serve(NoSender)
        result = await self.send()
        self.assertIsNone(result.failure)
        self.assertEqual(result.mail, Reply(553, ("5.1.8 bad sender",)))
        self.assertEqual(result.recipients, [None])
        self.assertNotIn("DATA", server.commands)

    async def test_greeting554(self) -> None:
        class Busy(FakeMX):
            greeting = b"554 mx.test no service here\r\n"

        server = await self.serve(Busy)
        result = await self.send()
        self.assertTrue(result.connected)
        self.assertEqual(result.greeting, Reply(554, ("mx.test no service here",)))
        self.assertIn("greeting failed", result.failure or "")
        self.assertFalse(result.permanent)
        self.assertEqual(server.commands, ["QUIT"])

    async def test_ehloRefusedFallsBackToHelo(self) -> None:
        class Old(FakeMX):
            def ehlo(self) -> bytes:
                return b"502 5.5.2 what is EHLO?\r\n"

        server = await self.serve(Old)
        result = await self.send()
        self.assertIsNone(result.failure)
        self.assertEqual(
            server.commands[:3],
            ["EHLO client.test", "HELO client.test", "MAIL FROM:<sender@client.test>"],
        )
        self.assertEqual(result.helo, Reply(250, ("mx.test",)))
        self.assertEqual(result.extensions, {})

    async def test_heloRefused(self) -> None:
        class Picky(FakeMX):
            def ehlo(self) -> bytes:
                return b"500 no\r\n"

            def helo(self) -> bytes:
                return b"550 who are you\r\n"

        server = await self.serve(Picky)
        result = await self.send()
        self.assertIn("my name was rejected", result.failure or "")
        self.assertEqual(server.messages, [])

    async def test_sizeTooBig(self) -> None:
        class Small(FakeMX):
            extensions = ["PIPELINING", "SIZE 100"]

        server = await self.serve(Small)
        result = await self.send(message=b"x" * 200 + b"\n")
        self.assertTrue(result.permanent)
        self.assertEqual(
            result.failure, "Message is too big for the remote host (SIZE 100). (#5.3.4)"
        )
        self.assertIsNone(result.mail)
        self.assertEqual(server.commands, ["EHLO client.test", "QUIT"])

    async def test_eightBitMime(self) -> None:
        server = await self.serve()
        result = await self.send(message="Subject: é\n\nünïcode\n".encode())
        self.assertIsNone(result.failure)
        self.assertIn(" BODY=8BITMIME", server.commands[1])

        class Seven(FakeMX):
            extensions: list[str] = []

        server = await self.serve(Seven)
        result = await self.send(message="Subject: é\n\nünïcode\n".encode())
        self.assertIsNone(result.failure)
        self.assertEqual(server.commands[1], "MAIL FROM:<sender@client.test>")
        self.assertEqual(len(server.messages), 1)  # sent anyway, as qmail does

    async def test_dotStuffingAndCRLF(self) -> None:
        server = await self.serve()
        message = b".leading\nmid\n..two\n.\nbare\rcr\r\nalready crlf\n\nlast without newline"
        result = await self.send(message=message)
        self.assertIsNone(result.failure)
        self.assertEqual(
            server.messages,
            [
                b"..leading\r\nmid\r\n...two\r\n..\r\nbarecr\r\nalready crlf\r\n\r\n"
                b"last without newline\r\n.\r\n"
            ],
        )
        sent = server.raw[server.raw.index(b"DATA\r\n") + 6 :]
        sent = sent[: sent.index(b"QUIT")]
        self.assertEqual(sent.count(b"\n"), sent.count(b"\r\n"))
        self.assertEqual(sent.count(b"\r"), sent.count(b"\r\n"))
        self.assertTrue(sent.endswith(b"\r\n.\r\n"))
        self.assertEqual(sent.count(b"\r\n.\r\n"), 1)

    async def test_multiLineReplies(self) -> None:
        class Wordy(FakeMX):
            greeting = b"220-mx.test first\r\n220-second\r\n220 third\r\n"

            def endOfData(self, message: bytes) -> bytes:
                return b"250-2.0.0 queued\r\n250 2.0.0 as 42\r\n"

        await self.serve(Wordy)
        result = await self.send()
        self.assertIsNone(result.failure)
        self.assertEqual(result.greeting, Reply(220, ("mx.test first", "second", "third")))
        self.assertEqual(result.data.text if result.data else None, "2.0.0 queued 2.0.0 as 42")
        self.assertEqual(result.extensions["SIZE"], "1000000")

    async def test_replyTimeout(self) -> None:
        class Silent(FakeMX):
            def endOfData(self, message: bytes) -> bytes:
                return b""

        await self.serve(Silent)
        result = await self.send(replyTimeout=0.3)
        self.assertEqual(result.failure, "Connection to 127.0.0.1 timed out. (#4.4.2)")
        self.assertIsNone(result.data)
        self.assertTrue(result.messageSent)

    async def test_connectionDiesAfterMessage(self) -> None:
        class Dying(FakeMX):
            def endOfData(self, message: bytes) -> bytes:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return b""

        await self.serve(Dying)
        result = await self.send()
        self.assertEqual(
            result.failure,
            "Connected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)",
        )

    async def test_connectionRefused(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        result = await self.send(port=port)
        self.assertFalse(result.connected)
        self.assertIn("(#4.4.1)", result.failure or "")

    async def test_addressInjectionRefused(self) -> None:
        server = await self.serve()
        result = await self.send(recipients=["a@mx.test>\r\nRCPT TO:<b@mx.test"])
        self.assertTrue(result.permanent)
        self.assertFalse(result.connected)
        self.assertEqual(server.commands, [])


class HostileReplyTests(ClientTestCase):
    async def hostile(self, greeting: bytes) -> TransactionResult:
        class Hostile(FakeMX):
            pass

        Hostile.greeting = greeting
        server = await self.serve(Hostile)
        result = await self.send(replyTimeout=5)
        self.assertTrue(result.connected)
        self.assertFalse(result.permanent)
        self.assertIsNone(result.mail)
        self.assertEqual(server.messages, [])
        return result

    async def test_overlongLine(self) -> None:
        result = await self.hostile(b"220 " + b"x" * 1_000_000)
        self.assertEqual(
            result.failure, "Connected to 127.0.0.1 but remote reply line too long. (#4.5.0)"
        )
        self.assertIsNone(result.greeting)

    async def test_tooManyLines(self) -> None:
        result = await self.hostile(b"220-x\r\n" * 10_000 + b"220 end\r\n")
        self.assertIn("too many lines", result.failure or "")

    async def test_codeChangesWithinReply(self) -> None:
        result = await self.hostile(b"220-mx.test\r\n250 smuggled\r\n")
        self.assertIn("code changed", result.failure or "")

    async def test_garbage(self) -> None:
        for garbage in (b"hello there\r\n", b"22\r\n", b"\x00\xff\r\n", b"2201 x\r\n"):
            result = await self.hostile(garbage)
            self.assertIn("syntax error", result.failure or "")

    async def test_unsolicitedReplies(self) -> None:
        result = await self.hostile(b"220 hi\r\n" + b"250 extra\r\n" * 1000)
        self.assertIn("nobody asked for", result.failure or "")


class RecordingParser(ReplyParser):
    """The client's own parser, noting how much it ever held: ``peak`` is the
    buffer right after bytes were added (at most one read past the line
    limit), ``kept`` what stayed buffered between reads, ``lines`` the
    longest unfinished reply."""

    made: list[RecordingParser] = []

    def __init__(self, maxLineLength: int, maxLines: int) -> None:
        super().__init__(maxLineLength, maxLines)
        self.peak = self.kept = self.lines = 0
        RecordingParser.made.append(self)

    def add(self, data: bytes) -> None:
        super().add(data)
        self.peak = max(self.peak, len(self._buffer))

    def next(self) -> Reply | None:
        try:
            reply = super().next()
        finally:
            self.lines = max(self.lines, len(self._lines))
        if reply is None:
            self.kept = max(self.kept, len(self._buffer))
        return reply


HOSTILE_REPLIES = {
    "a 1 MB line": (b"250 " + b"x" * 1_000_000 + b"\r\n", "remote reply line too long"),
    "10,000 lines": (b"250-x\r\n" * 10_000 + b"250 end\r\n", "remote reply has too many lines"),
    "a code change": (b"250-fine\r\n550 smuggled\r\n", "remote reply code changed"),
    "garbage": (b"\x00\xffhello there\r\n", "remote reply syntax error"),
}


class HostileStageReplyTests(ClientTestCase):
    """R1 beyond the greeting: each hostile reply as the answer to EHLO, to
    MAIL, to RCPT and to the final dot, through the remote delivery agent
    with the real client: a temporary failure, the client's buffers within
    their limits, the connection closed, and nothing counted as delivered."""

    async def attempt(self, stage: str, hostile: bytes) -> tuple[Any, TransactionResult, Any]:
        class Hostile(FakeMX):
            def handle(self, line: str) -> bool:
                if line.split(" ", 1)[0].upper() == stage:
                    self.write(hostile)
                    return False
                return super().handle(line)

            def endOfData(self, message: bytes) -> bytes:
                return hostile if stage == "." else super().endOfData(message)

        server = await self.serve(Hostile)
        RecordingParser.made = []
        self.patch(client, "ReplyParser", RecordingParser)
        seen: list[TransactionResult] = []

        async def recordingSend(*args: Any, **kwargs: Any) -> TransactionResult:
            result = await sendMessage(*args, **kwargs)
            seen.append(result)
            return result

        destination = Destination("mx.test", "127.0.0.1", self.port, 10)
        agent = RemoteDeliveryAgent(
            reactor,
            lambda m: succeed(BytesSource(b"Subject: hi\n\nhello\n")),
            lambda f, *a: succeed(f(*a)),
            lambda domain, route=None: succeed([destination]),
            RemoteSettings(heloName="client.test", tls="none", replyTimeout=5),
            send=lambda *a, **k: Deferred.fromCoroutine(recordingSend(*a, **k)),
        )
        queued = QueuedMessage(
            msgid="m1",
            path="/nonexistent",
            birth=0.0,
            sender=Address.fromStored("sender@client.test"),
            recipients=[Address.fromStored("rcpt@mx.test")],
            states=[TODO],
            stateOffsets=[0],
            messageOffset=0,
            messageLength=10,
        )
        [outcome] = await agent.deliver(queued, queued.recipients)
        for connection in server.connections:
            if connection not in server.lost:
                lost: Deferred[None] = Deferred()
                server.waiters.append(lost)
                await lost
        [result] = seen
        [parser] = RecordingParser.made
        self.assertLessEqual(parser.kept, parser.maxLineLength)
        self.assertLessEqual(parser.peak, parser.maxLineLength + 65536)  # one read at most
        self.assertLessEqual(parser.lines, parser.maxLines)
        self.assertEqual(len(server.connections), 1)
        self.assertEqual(server.lost, server.connections)
        return outcome, result, server

    async def check(self, stage: str) -> None:
        for name, (hostile, why) in HOSTILE_REPLIES.items():
            outcome, result, server = await self.attempt(stage, hostile)
            self.assertEqual(outcome.outcome, Outcome.TEMPORARY, f"{name} to {stage}")
            self.assertFalse(result.permanent, name)
            self.assertIn(why, result.failure or "", name)
            self.assertIn(why, outcome.text, name)
            if stage == ".":
                self.assertTrue(result.messageSent, name)
                self.assertEqual(len(server.messages), 1, name)  # it did arrive, yet
                self.assertIsNone(result.data, name)  # no reply said it was taken
            else:
                self.assertEqual(server.messages, [], name)

    async def test_hostileReplyToEHLO(self) -> None:
        await self.check("EHLO")

    async def test_hostileReplyToMAIL(self) -> None:
        await self.check("MAIL")

    async def test_hostileReplyToRCPT(self) -> None:
        await self.check("RCPT")

    async def test_hostileReplyToTheFinalDot(self) -> None:
        await self.check(".")


class TLSTests(ClientTestCase):
    def trusting(self) -> Any:
        cert, _ = self.certificatePaths or ("", "")
        with open(cert, "rb") as f:
            root = Certificate.loadPEM(f.read())
        return lambda hostname: optionsForClientTLS(hostname, trustRoot=root)

    async def test_opportunisticAcceptsSelfSigned(self) -> None:
        server = await self.serve(tls=True)
        result = await self.send()
        self.assertIsNone(result.failure)
        self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(server.commands[:3], ["EHLO client.test", "STARTTLS", "EHLO client.test"])
        self.assertEqual(len(server.messages), 1)
        self.assertIn("MAIL FROM:<sender@client.test> SIZE=22", server.encrypted)

    async def test_opportunisticWithoutStartTLSIsPlaintext(self) -> None:
        server = await self.serve(tls=False)
        result = await self.send()
        self.assertIsNone(result.failure)
        self.assertIsNone(result.tls)
        self.assertNotIn("STARTTLS", server.commands)
        self.assertIn(b"MAIL FROM", server.raw)

    async def test_noneNeverStartsTLS(self) -> None:
        server = await self.serve(tls=True)
        result = await self.send(tls="none")
        self.assertIsNone(result.failure)
        self.assertIsNone(result.tls)
        self.assertNotIn("STARTTLS", server.commands)

    async def test_verifyRefusesSelfSigned(self) -> None:
        server = await self.serve(tls=True)
        result = await self.send(tls="verify", tlsHostname="mx.test")
        self.assertIn("TLS required", result.failure or "")
        self.assertIn("(#4.7.0)", result.failure or "")
        self.assertFalse(result.permanent)
        self.assertEqual(server.messages, [])

    async def test_verifyWrongName(self) -> None:
        server = await self.serve(tls=True)
        self.certificate()
        result = await self.send(tls="verify", tlsHostname="other.test", tlsCreator=self.trusting())
        self.assertIn("TLS required", result.failure or "")
        self.assertEqual(server.messages, [])

    async def test_verifyWithTrustedCertificate(self) -> None:
        server = await self.serve(tls=True)
        result = await self.send(tls="verify", tlsHostname="mx.test", tlsCreator=self.trusting())
        self.assertIsNone(result.failure)
        self.assertIsNotNone(result.tls)
        self.assertEqual(len(server.messages), 1)

    async def test_verifyWithoutStartTLS(self) -> None:
        server = await self.serve(tls=False)
        result = await self.send(tls="verify", tlsHostname="mx.test")
        self.assertEqual(
            result.failure, "TLS required but 127.0.0.1 does not offer STARTTLS. (#4.7.0)"
        )
        self.assertEqual(server.commands, ["EHLO client.test", "QUIT"])

    async def test_bytesAfterStartTLSReplyDiscarded(self) -> None:
        class Injecting(FakeMX):
            afterStartTLS = b"250 injected\r\n"

        server = await self.serve(Injecting, tls=True)
        with capturedLogs() as events:
            result = await self.send()
        self.assertIsNone(result.failure)
        self.assertIsNotNone(result.tls)
        logged = [formatEvent(e) for e in events]
        self.assertIn("127.0.0.1 sent 14 bytes after its 220 to STARTTLS; discarded", logged)
        # had "250 injected" been taken as the EHLO reply, every later reply
        # would be one step behind
        self.assertEqual(
            result.helo, Reply(250, ("mx.test hello", "PIPELINING", "SIZE 1000000", "8BITMIME"))
        )
        self.assertEqual(result.mail, Reply(250, ("2.1.0 sender ok",)))
        self.assertEqual(result.data, Reply(250, ("2.0.0 queued as 42",)))
        self.assertEqual(len(server.messages), 1)

    async def test_authPlainInsideTLS(self) -> None:
        class Smarthost(FakeMX):
            extensions = ["PIPELINING"]
            tlsExtensions = ["PIPELINING", "AUTH LOGIN PLAIN"]

        server = await self.serve(Smarthost, tls=True)
        result = await self.send(auth=("user@client.test", "s3cret"))
        self.assertIsNone(result.failure)
        self.assertEqual(result.auth, Reply(235, ("2.7.0 ok",)))
        token = base64.b64encode(b"\0user@client.test\0s3cret").decode()
        self.assertEqual(server.auth, [f"AUTH PLAIN {token}"])
        self.assertIn(f"AUTH PLAIN {token}", server.encrypted)
        self.assertEqual(len(server.messages), 1)

    async def test_authLogin(self) -> None:
        class LoginOnly(FakeMX):
            extensions = ["AUTH LOGIN"]

            def handle(self, line: str) -> bool:
                step = getattr(self, "step", None)
                if step is not None:
                    self.factory.auth.append(line)
                    self.step = step + 1 if step < 1 else None
                    self.write(b"334 UGFzc3dvcmQ6\r\n" if step == 0 else b"235 ok\r\n")
                    return False
                if line == "AUTH LOGIN":
                    self.step = 0
                    self.write(b"334 VXNlcm5hbWU6\r\n")
                    return False
                return super().handle(line)

        server = await self.serve(LoginOnly)
        result = await self.send(tls="none", auth=("u", "p"))
        self.assertIsNone(result.failure)
        self.assertEqual(server.auth, ["dQ==", "cA=="])

    async def test_authRefusedOutsideTLS(self) -> None:
        class PlainAuth(FakeMX):
            extensions = ["AUTH PLAIN"]

        server = await self.serve(PlainAuth)
        result = await self.send(auth=("u", "p"))
        self.assertIn("without TLS", result.failure or "")
        self.assertEqual(server.auth, [])
        self.assertEqual(server.messages, [])

    async def test_authRejected(self) -> None:
        class Refusing(FakeMX):
            extensions = ["AUTH PLAIN"]

            def auth(self, line: str) -> bytes:
                return b"535 5.7.8 bad credentials\r\n"

        server = await self.serve(Refusing)
        result = await self.send(tls="none", auth=("u", "p"))
        self.assertEqual(result.auth, Reply(535, ("5.7.8 bad credentials",)))
        self.assertTrue(result.permanent)
        self.assertIn("authentication was rejected", result.failure or "")
        self.assertEqual(server.messages, [])


class _SinkProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class SMTPSinkTests(ClientTestCase):
    async def test_deliversToSMTPSink(self) -> None:
        if SMTP_SINK is None:
            self.fail("smtp-sink (Debian package postfix) is not installed; .ci/run installs it")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        sink = _SinkProcess()
        user = ["-u", "nobody"] if os.getuid() == 0 else []
        process = reactor.spawnProcess(
            sink, SMTP_SINK, [SMTP_SINK, *user, "-c", f"127.0.0.1:{port}", "100"], env=os.environ
        )

        async def stop() -> None:
            if not sink.ended.called:
                process.signalProcess("TERM")
            await sink.ended

        self.addCleanup(stop)
        for _ in range(100):  # until it listens
            result = await self.send(port=port, recipients=["a@sink.test", "b@sink.test"])
            if result.connected:
                break
            d: Deferred[None] = Deferred()
            reactor.callLater(0.05, d.callback, None)
            await d
        self.assertIsNone(result.failure, sink.output)
        self.assertEqual(codes(result.recipients), [250, 250])
        self.assertEqual(result.data.code if result.data else None, 250)
        self.assertIn("PIPELINING", result.extensions)


class ReplyParserTests(SynchronousTestCase):
    def test_splitAcrossFeeds(self) -> None:
        parser = ReplyParser()
        self.assertEqual(parser.feed(b"250-a\r\n25"), [])
        self.assertEqual(
            parser.feed(b"0 b\r\n220 c\n"), [Reply(250, ("a", "b")), Reply(220, ("c",))]
        )

    def test_bareCode(self) -> None:
        self.assertEqual(ReplyParser().feed(b"250\r\n"), [Reply(250, ("",))])

    def test_controlCharactersReplaced(self) -> None:
        self.assertEqual(ReplyParser().feed(b"550 a\x1b[31mb\r\n"), [Reply(550, ("a?[31mb",))])

    def test_bounds(self) -> None:
        parser = ReplyParser(maxLineLength=10, maxLines=2)
        self.assertEqual(parser.feed(b"250 abcd\r\n"), [Reply(250, ("abcd",))])
        self.assertRaises(ReplyError, parser.feed, b"250 abcde\r\n")
        parser = ReplyParser(maxLineLength=10, maxLines=2)
        self.assertRaises(ReplyError, parser.feed, b"250-a\r\n250-b\r\n250 c\r\n")

    def test_wireMessage(self) -> None:
        self.assertEqual(wireMessage(b""), b".\r\n")
        self.assertEqual(wireMessage(b"."), b"..\r\n.\r\n")
        self.assertEqual(wireMessage(b"a\r\rb\n"), b"ab\r\n.\r\n")
