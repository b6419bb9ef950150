"""Remote delivery end to end: makeMailService on loopback, a fake DNS
server (twisted.names) and small SMTP servers written here, and Postfix's
smtp-sink when installed."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.names import dns, server
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from qmailtx import makeMailService
from qmailtx.config import ConfigError
from qmailtx.queue.manager import QueueManager
from qmailtx.testing import MemoryZone, makeTestCertificate, makeTestConfig, startTestDNSServer
from tests.test_service import RunningServer

reactor: Any = _reactor
SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
)


class Watcher(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class SinkState:
    """What one in-test SMTP server saw, shared by its connections."""

    def __init__(self) -> None:
        self.greeting = b"220 sink.test ESMTP"
        self.rcptReplies: list[bytes] = []  # used in turn, then 250
        self.dataReply = b"250 2.0.0 ok"
        self.hold: float = 0.0  # seconds to wait before greeting
        self.tls: Any = None  # a server context factory: offer STARTTLS
        self.current = 0
        self.peak = 0
        self.connections = 0
        self.peers: list[str] = []
        self.messages: list[dict[str, Any]] = []


class ScriptedSMTP(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.inData = False
        self.lines: list[bytes] = []
        self.envelope: dict[str, Any] = {}
        self.secure = False

    def connectionMade(self) -> None:
        s = self.state
        s.connections += 1
        s.current += 1
        s.peak = max(s.peak, s.current)
        s.peers.append(self.transport.getPeer().host)  # type: ignore[union-attr]
        self.later = reactor.callLater(s.hold, self.sendLine, s.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        self.state.current -= 1
        if self.later.active():
            self.later.cancel()

    def lineReceived(self, line: bytes) -> None:
        s = self.state
        if self.inData:
            if line == b".":
                self.inData = False
                self.envelope["data"] = b"\r\n".join(self.lines) + b"\r\n"
                self.envelope["tls"] = self.secure
                s.messages.append(self.envelope)
                self.sendLine(s.dataReply)
            else:
                self.lines.append(line)
            return
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            extensions = [b"250-sink.test", b"250-PIPELINING", b"250-8BITMIME"]
            if s.tls is not None and not self.secure:
                extensions.append(b"250-STARTTLS")
            for ext in extensions:
                self.sendLine(ext)
            self.sendLine(b"250 SIZE 10000000")
        elif line.upper() == b"STARTTLS" and s.tls is not None:
            self.sendLine(b"220 go ahead")
            self.transport.startTLS(s.tls)  # type: ignore[union-attr]
            self.secure = True
        elif verb == b"MAIL":
            self.envelope = {"from": line[10:].decode(), "to": []}
            self.sendLine(b"250 ok")
        elif verb == b"RCPT":
            answer = s.rcptReplies.pop(0) if s.rcptReplies else b"250 ok"
            if answer.startswith(b"2"):
                self.envelope["to"].append(line[8:].decode())
            self.sendLine(answer)
        elif verb == b"DATA" and not self.envelope.get("to"):
            self.sendLine(b"554 5.5.1 no valid recipients")
        elif verb == b"DATA":
            self.inData = True
            self.lines = []
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"250 ok")


class SinkFactory(Factory):
    def __init__(self, state: SinkState) -> None:
        self.state = state

    def buildProtocol(self, addr: Any) -> ScriptedSMTP:
        return ScriptedSMTP(self.state)


@implementer(ILogObserver)
class Deliveries:
    """The queue manager's "delivery N: outcome: text" events."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if "outcome" in event and "delivery" in event:
            self.events.append(event)

    def outcomes(self) -> list[tuple[str, str]]:
        return [(e["outcome"], e["text"]) for e in self.events]


ZONE = {
    b"mx.example.test": [
        dns.Record_MX(10, b"mx1.example.test"),
        dns.Record_MX(20, b"mx2.example.test"),
    ],
    b"mx1.example.test": [dns.Record_A("127.0.0.3")],
    b"mx2.example.test": [dns.Record_A("127.0.0.4")],
    b"zero.example.test": [dns.Record_MX(10, b"zero-mx.example.test")],
    b"zero-mx.example.test": [dns.Record_A("0.0.0.0")],
}


def send(port: int, sender: str, recipients: list[str], body: bytes, count: int = 1) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for _ in range(count):
            client.sendmail(sender, recipients, body)


class RemoteDeliveryTests(TestCase):
    def setUp(self) -> None:
        self.deliveries = Deliveries()
        globalLogPublisher.addObserver(self.deliveries)
        self.addCleanup(globalLogPublisher.removeObserver, self.deliveries)

    def sink(
        self, interface: str = "127.0.0.1", port: int = 0, state: SinkState | None = None
    ) -> tuple[SinkState, int]:
        state = state or SinkState()
        listening: IListeningPort = reactor.listenTCP(port, SinkFactory(state), interface=interface)
        self.addCleanup(listening.stopListening)
        return state, cast(int, listening.getHost().port)  # type: ignore[attr-defined]

    def dnsServer(self) -> int:
        factory = server.DNSServerFactory(authorities=[MemoryZone(ZONE, b"broken.example.test")])
        return startTestDNSServer(self, factory, reactor)[1]

    async def start(self, toml: str) -> tuple[RunningServer, int]:
        toml = '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n' + toml
        running = RunningServer(makeTestConfig(self.mktemp(), toml))
        port = await running.start()
        self.addCleanup(running.stop)
        return running, port

    def manager(self, running: RunningServer) -> QueueManager:
        return cast(QueueManager, running.mail.getServiceNamed("queue"))

    async def until(self, condition: Callable[[], object], seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting; deliveries: {self.deliveries.outcomes()}")
            await deferLater(reactor, 0.02, lambda: None)

    async def inject(
        self, port: int, recipients: list[str], count: int = 1, body: bytes | None = None
    ) -> None:
        body = body or b"Subject: remote\r\n\r\nHello.\r\n.leading dot\r\n"
        await deferToThread(send, port, "postmaster@localhost", recipients, body, count)

    async def test_smtproutesDelivery(self) -> None:
        sink, sinkPort = self.sink()
        _, port = await self.start(
            f'[control]\nsmtproutes = ["example.org:127.0.0.1:{sinkPort}"]\n'
        )
        await self.inject(port, ["Bob@example.org", "carol@Example.ORG"])
        await self.until(lambda: len(self.deliveries.events) == 2)
        [message] = sink.messages  # one transaction for the domain
        self.assertEqual(message["to"], ["<Bob@example.org>", "<carol@example.org>"])
        self.assertIn(b"\r\n..leading dot\r\n", b"\r\n" + message["data"])  # dot-stuffed
        self.assertNotIn(b"\n", message["data"].replace(b"\r\n", b""))
        for outcome, text in self.deliveries.outcomes():
            self.assertEqual(outcome, "success")
            self.assertTrue(
                text.startswith("127.0.0.1_accepted_message._Remote_host_said:_250"), text
            )

    async def test_mxOrder554GreetingThenNextMX(self) -> None:
        first, sinkPort = self.sink("127.0.0.3")
        first.greeting = b"554 no SMTP service here"
        second, _ = self.sink("127.0.0.4", sinkPort)
        dnsPort = self.dnsServer()
        _, port = await self.start(
            f'[dns]\nservers = ["127.0.0.1:{dnsPort}"]\n[remote]\nport = {sinkPort}\n'
        )
        await self.inject(port, ["u@mx.example.test"])
        await self.until(lambda: self.deliveries.events)
        [(outcome, text)] = self.deliveries.outcomes()
        self.assertEqual((outcome, text[:9]), ("success", "127.0.0.4"))
        self.assertEqual(first.connections, 1)
        self.assertEqual(len(second.messages), 1)

    async def test_mxAtZeroIsRefused(self) -> None:
        dnsPort = self.dnsServer()
        _, port = await self.start(f'[dns]\nservers = ["127.0.0.1:{dnsPort}"]\n')
        await self.inject(port, ["u@zero.example.test"])
        await self.until(lambda: self.deliveries.events)
        [(outcome, text), *rest] = self.deliveries.outcomes()
        self.assertEqual(outcome, "failure", rest)
        self.assertIn("best-preference_MX", text)
        self.assertIn("(#5.4.6)", text)

    async def test_temporaryThenSuccessIsRetriedNotBounced(self) -> None:
        sink, sinkPort = self.sink()
        sink.rcptReplies = [b"451 4.3.0 try later"]
        running, port = await self.start(f'[control]\nsmtproutes = [":127.0.0.1:{sinkPort}"]\n')
        await self.inject(port, ["u@example.org"])
        await self.until(lambda: self.deliveries.events)
        self.assertEqual(self.deliveries.outcomes()[0][0], "deferral")
        self.assertIn("451_4.3.0_try_later", self.deliveries.outcomes()[0][1])
        # The deferral is logged before it is recorded and rescheduled: wait
        # for that, or retryNow finds nothing to retry yet.
        await self.manager(running).whenIdle()
        self.manager(running).retryNow()
        await self.until(lambda: len(self.deliveries.events) == 2)
        self.assertEqual(self.deliveries.outcomes()[1][0], "success")
        self.assertEqual(len(sink.messages), 1)
        self.assertFalse(
            os.path.isdir(os.path.join(running.maildir("postmaster"), "new"))
            and os.listdir(os.path.join(running.maildir("postmaster"), "new"))
        )

    async def test_permanentFailureBouncesOnceWithTheRemoteReply(self) -> None:
        sink, sinkPort = self.sink()
        sink.rcptReplies = [b"550 5.1.1 no such user"]
        running, port = await self.start(
            f'[control]\nsmtproutes = ["example.org:127.0.0.1:{sinkPort}"]\n'
        )
        await self.inject(port, ["nobody@example.org"])
        [bounce] = await running.waitForMail("postmaster")
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(os.listdir(os.path.join(running.maildir("postmaster"), "new"))), 1)
        parsed = email.message_from_bytes(bounce, policy=email.policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed.get_param("report-type"), "delivery-status")
        parts = list(parsed.iter_parts())
        human = parts[0].get_content()
        self.assertIn("<nobody@example.org>:", human)
        self.assertIn("Remote host said: 550 5.1.1 no such user", human)
        self.assertEqual(parts[1].get_content_type(), "message/delivery-status")
        status = bytes(parts[1])
        self.assertIn(b"5.1.1", status)
        self.assertEqual(sink.messages, [])

    async def test_startTLSOpportunisticDeliversVerifyDefers(self) -> None:
        certificate, key = makeTestCertificate(self.mktemp(), "sink.test")
        with open(certificate) as c, open(key) as k:
            context = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
        sink, sinkPort = self.sink()
        sink.tls = context
        _, port = await self.start(
            '[remote]\ntls_policy = { "strict.example" = "verify" }\n'
            f'[control]\nsmtproutes = [":127.0.0.1:{sinkPort}"]\n'
        )
        await self.inject(port, ["u@open.example"])
        await self.until(lambda: self.deliveries.events)
        self.assertEqual(self.deliveries.outcomes()[0][0], "success")
        self.assertTrue(sink.messages[0]["tls"])
        await self.inject(port, ["u@strict.example"])
        await self.until(lambda: len(self.deliveries.events) == 2)
        outcome, text = self.deliveries.outcomes()[1]
        self.assertEqual(outcome, "deferral", text)
        self.assertEqual(len(sink.messages), 1)

    async def test_outgoingIPIsTheClientAddress(self) -> None:
        sink, sinkPort = self.sink()
        _, port = await self.start(
            f'[control]\nsmtproutes = ["example.org:127.0.0.1:{sinkPort}"]\n'
            'outgoingip = ["127.0.0.2"]\n'
        )
        await self.inject(port, ["u@example.org"])
        await self.until(lambda: self.deliveries.events)
        self.assertEqual(sink.peers, ["127.0.0.2"])

    async def test_concurrencyNeverAboveTheLimits(self) -> None:
        sink, sinkPort = self.sink()
        sink.hold = 0.3
        _, port = await self.start(
            "[remote]\nconcurrency_per_domain = 2\n"
            f'[control]\nconcurrencyremote = 4\nsmtproutes = [":127.0.0.1:{sinkPort}"]\n'
        )
        # 12 messages for 6 domains: at most 4 at once overall ...
        await self.inject(port, [f"u@d{i}.example" for i in range(6)], count=2)
        await self.until(lambda: len(self.deliveries.events) == 12, 20)
        self.assertEqual(sink.peak, 4)
        # ... and at most 2 at once to one domain.
        sink.peak = 0
        await self.inject(port, ["u@one.example"], count=6)
        await self.until(lambda: len(self.deliveries.events) == 18, 20)
        self.assertEqual(sink.peak, 2)
        self.assertEqual({o for o, _ in self.deliveries.outcomes()}, {"success"})

    async def test_smtpSinkBurst(self) -> None:
        if SMTP_SINK is None:
            self.fail("smtp-sink is not installed (Debian package postfix; .ci/run installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            sinkPort = s.getsockname()[1]
        argv = [SMTP_SINK, "-c", f"127.0.0.1:{sinkPort}", "100"]
        if os.getuid() == 0:
            argv[1:1] = ["-u", "nobody"]  # it refuses to run as root
        watcher = Watcher()
        process = reactor.spawnProcess(watcher, SMTP_SINK, argv)

        async def stop() -> None:
            try:
                process.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
            await watcher.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", sinkPort), 0.1).close()
                break
            except OSError:
                await deferLater(reactor, 0.05, lambda: None)
        running, port = await self.start(
            f'[control]\nconcurrencyremote = 10\nsmtproutes = [":127.0.0.1:{sinkPort}"]\n'
        )
        await self.inject(port, [f"u@d{i}.example" for i in range(5)], count=20)
        await self.until(lambda: len(self.deliveries.events) == 100, 30)
        outcomes = self.deliveries.outcomes()
        self.assertEqual({o for o, _ in outcomes}, {"success"}, outcomes[:3])
        await self.until(lambda: not self.manager(running).messages)


class StartupTests(TestCase):
    def test_badRoutesStopStartup(self) -> None:
        for toml, expected in (
            (
                '[control]\nsmtproutes = ["no colon here"]\n',
                "smtproutes: line 1",
            ),
            ('[control]\noutgoingip = ["banana"]\n', "outgoingip: line 1"),
        ):
            config = makeTestConfig(self.mktemp(), toml)
            with self.assertRaises(ConfigError) as caught:
                makeMailService(reactor, config)
            self.assertIn(expected, str(caught.exception))
