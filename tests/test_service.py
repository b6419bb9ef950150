"""End to end on loopback: the embedded service with smtplib and swaks."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import time
from typing import Any, cast

from twisted.application.service import Application, IService, MultiService, Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import TestCase

from qmailtx import loadConfig, makeMailService
from qmailtx.config import Config
from qmailtx.tap import Options
from qmailtx.testing import makeTestConfig

LISTEN = '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
SWAKS = shutil.which("swaks")


class RunningServer:
    """A started makeMailService inside an Application, with its SMTP port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.application = Application("test")
        self.mail = makeMailService(reactor, config)
        self.mail.setServiceParent(IService(self.application))
        self.other = Service()
        self.other.setName("mine")
        self.other.setServiceParent(IService(self.application))

    async def start(self) -> int:
        IService(self.application).startService()
        smtp = cast(MultiService, self.mail.getServiceNamed("smtp"))
        listener = list(smtp)[0]
        port: IListeningPort = await listener._waitingForPort
        return cast(int, port.getHost().port)  # type: ignore[attr-defined]

    async def stop(self) -> None:
        await cast(Deferred[None], IService(self.application).stopService())

    def maildir(self, user: str, domain: str = "localhost") -> str:
        return os.path.join(self.config.paths.data, "domains", domain, user, "Maildir")

    async def waitForMail(
        self, user: str, count: int = 1, domain: str = "localhost"
    ) -> list[bytes]:
        new = os.path.join(self.maildir(user, domain), "new")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = sorted(os.listdir(new)) if os.path.isdir(new) else []
            if len(names) >= count:
                out = []
                for name in names:
                    with open(os.path.join(new, name), "rb") as f:
                        out.append(f.read())
                return out
            await deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"no mail for {user}@{domain} after 10 s")


def send(port: int, sender: str, recipients: list[str], message: bytes) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return cast(dict[str, Any], client.sendmail(sender, recipients, message))


class EmbeddedServiceTests(TestCase):
    async def startServer(self, toml: str = LISTEN) -> tuple[RunningServer, int]:
        server = RunningServer(makeTestConfig(self.mktemp(), toml))
        port = await server.start()
        self.addCleanup(server.stop)
        return server, port

    async def test_minimalConfigDeliversToPostmaster(self) -> None:
        """A config file holding only [paths] and [smtp] is enough."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "qmailtx.toml")
        with open(path, "w") as f:
            f.write('[paths]\ndata = "var"\n' + LISTEN)
        server = RunningServer(loadConfig(path))
        port = await server.start()
        self.addCleanup(server.stop)
        self.assertEqual(server.config.paths.data, os.path.join(folder, "var"))
        self.assertEqual(server.mail.getServiceNamed("queue").name, "queue")
        self.assertTrue(server.other.running)
        message = b"Subject: first\r\n\r\nHello, postmaster.\r\n.leading dot\r\n"
        refused = await deferToThread(
            send, port, "sender@example.org", ["postmaster@localhost"], message
        )
        self.assertEqual(refused, {})
        [delivered] = await server.waitForMail("postmaster")
        lines = delivered.split(b"\n")
        self.assertEqual(lines[0], b"Return-Path: <sender@example.org>")
        self.assertEqual(lines[1], b"Delivered-To: postmaster@localhost")
        self.assertTrue(lines[2].startswith(b"Received: from unknown (HELO "))
        self.assertTrue(delivered.endswith(b"Subject: first\n\nHello, postmaster.\n.leading dot\n"))

    async def test_unknownLocalUserBouncesToTheSender(self) -> None:
        server, port = await self.startServer()
        await deferToThread(
            send, port, "postmaster@localhost", ["nobody@localhost"], b"Subject: lost\r\n\r\nx\r\n"
        )
        [bounce] = await server.waitForMail("postmaster")
        parsed = email.message_from_bytes(bounce, policy=email.policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertIn(b"Return-Path: <>", bounce)
        self.assertIn(b"<nobody@localhost>:\nSorry, no mailbox here by that name. (#5.1.1)", bounce)
        self.assertIn(b"Subject: lost", bounce)

    async def test_relayRefusedForClientsNotListed(self) -> None:
        server, port = await self.startServer(LISTEN + "relay_clients = []\n")

        def attempt() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("client.example")
                client.mail("postmaster@localhost")
                return client.rcpt("victim@elsewhere.example")

        code, text = await deferToThread(attempt)
        self.assertEqual(code, 553)
        self.assertEqual(text, b"5.7.1 sorry, that domain isn't in my list of allowed rcpthosts")

    async def test_stopAndRestartKeepsQueuedMail(self) -> None:
        config = makeTestConfig(self.mktemp(), LISTEN)
        first = RunningServer(config)
        port = await first.start()
        await deferToThread(send, port, "a@example.org", ["someone@remote.example"], b"x\r\n")
        await first.stop()
        mess = os.path.join(config.paths.data, "queue", "mess")
        queued = [f for _, _, files in os.walk(mess) for f in files]
        self.assertEqual(len(queued), 1)
        second = RunningServer(config)
        await second.start()
        self.addCleanup(second.stop)
        manager = second.mail.getServiceNamed("queue")
        await manager.recovered
        self.assertEqual(list(manager.messages), queued)

    async def test_swaksDelivers(self) -> None:
        if SWAKS is None:
            raise AssertionError("swaks is not installed (apt-get install swaks)")
        server, port = await self.startServer()
        out, err, code = await getProcessOutputAndValue(
            SWAKS,
            [
                "--server",
                f"127.0.0.1:{port}",
                "--from",
                "swaks@example.org",
                "--to",
                "postmaster@localhost",
                "--header",
                "Subject: via swaks",
                "--body",
                "hello from swaks",
            ],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"<-  250 2.0.0 ok ", out)
        [delivered] = await server.waitForMail("postmaster")
        self.assertIn(b"Subject: via swaks", delivered)
        self.assertIn(b"hello from swaks", delivered)

    async def test_swaksRelayRefused(self) -> None:
        if SWAKS is None:
            raise AssertionError("swaks is not installed (apt-get install swaks)")
        server, port = await self.startServer(LISTEN + "relay_clients = []\n")
        for rcpt in ["x@elsewhere.example", "@localhost:x@elsewhere.example", "x@[192.0.2.9]"]:
            out, err, code = await getProcessOutputAndValue(
                SWAKS,
                ["--server", f"127.0.0.1:{port}", "--from", "postmaster@localhost", "--to", rcpt],
                env=os.environ,
            )
            self.assertNotEqual(code, 0, rcpt)
            self.assertIn(
                b"<** 553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts", out
            )
        mess = os.path.join(server.config.paths.data, "queue", "mess")
        self.assertEqual([f for _, _, files in os.walk(mess) for f in files], [])


OURS = 'me = "ours.test"\nlocals = ["ours.test", "localhost"]\n'
REFUSAL = (553, b"5.7.1 sorry, that domain isn't in my list of allowed rcpthosts")


def rcptFrom(source: str, port: int, sender: str, recipient: str) -> tuple[int, bytes]:
    """One RCPT over smtplib from ``source`` (a loopback address), raw."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        code, text = client.docmd(f"MAIL FROM:<{sender}>")
        assert code == 250, (code, text)
        return client.docmd(f"RCPT TO:<{recipient}>")


def sendFrom(source: str, port: int, sender: str, recipient: str) -> tuple[int, bytes]:
    """A whole message to one raw recipient over smtplib; the reply to the dot."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        client.docmd(f"MAIL FROM:<{sender}>")
        code, text = client.docmd(f"RCPT TO:<{recipient}>")
        assert code == 250, (recipient, code, text)
        return client.data(b"Subject: tricky\r\n\r\nx\r\n")


class OpenRelayTests(TestCase):
    """S6 end to end: a client outside relay_clients (127.0.0.2) over smtplib.
    ours.test and localhost are ours; mx.test and other.example are not."""

    async def startServer(self) -> tuple[RunningServer, int, list[Any]]:
        toml = LISTEN + 'relay_clients = ["127.0.0.1/32"]\n[control]\n' + OURS
        server = RunningServer(makeTestConfig(self.mktemp(), toml))
        self.assertNotIn("127.0.0.2", [str(n) for n in server.config.smtp.relay_clients])
        port = await server.start()
        self.addCleanup(server.stop)
        remote: Any = cast(Any, server.mail.getServiceNamed("queue")).agents["remote"]
        handed: list[Any] = []
        passOn = remote.deliver

        def recordingDeliver(message: Any, recipients: Any, *args: Any) -> Any:
            handed.extend(str(r) for r in recipients)
            return passOn(message, recipients, *args)

        self.patch(remote, "deliver", recordingDeliver)
        return server, port, handed

    async def test_disguisedForeignRecipientsAreRefused(self) -> None:
        server, port, handed = await self.startServer()
        for rcpt in [
            "user@other.example",
            "@ours.test:user@other.example",
            "@mx.test:user@other.example",
            "user@other.example.",
            "user@[192.0.2.1]",
            '"user@other.example"@mx.test',
            "user%ours.test@other.example",
            "ours.test!user@other.example",
            "user@ours.test.other.example",
        ]:
            for sender in ["postmaster@ours.test", "postmaster@localhost"]:
                reply = await deferToThread(rcptFrom, "127.0.0.2", port, sender, rcpt)
                self.assertEqual(reply, REFUSAL, (rcpt, sender))
        # the refusal is the client's doing: a relay client may send there
        allowed = await deferToThread(
            rcptFrom, "127.0.0.1", port, "postmaster@ours.test", "user@other.example"
        )
        self.assertEqual(allowed[0], 250)
        mess = os.path.join(server.config.paths.data, "queue", "mess")
        self.assertEqual([f for _, _, files in os.walk(mess) for f in files], [])
        self.assertEqual(handed, [])

    async def test_trickyLocalFormsStayLocal(self) -> None:
        """%-hack, ! paths and a quoted @ at a domain of ours are local parts of
        ours: accepted, handed to local delivery (no such user: a bounce), and
        never to the remote channel."""
        server, port, handed = await self.startServer()
        tricky = [
            "user%other.example@ours.test",
            "other.example!user@ours.test",
            '"user@other.example"@ours.test',
        ]
        for rcpt in tricky:
            code, text = await deferToThread(
                sendFrom, "127.0.0.2", port, "postmaster@localhost", rcpt
            )
            self.assertEqual(code, 250, (rcpt, text))
        bounces = await server.waitForMail("postmaster", count=len(tricky))
        said = b"".join(bounces)
        for rcpt in tricky:  # (the queue keeps addresses unquoted, as qmail does)
            stored = rcpt.replace('"', "")
            self.assertIn(
                f"<{stored}>:\nSorry, no mailbox here by that name. (#5.1.1)".encode(), said
            )
        self.assertEqual(handed, [])


class TwistdPluginTests(TestCase):
    def test_pluginIsFound(self) -> None:
        from twisted.application.service import IServiceMaker

        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("qmailtx", names)

    def test_badConfigIsAUsageError(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[smtp]\nlisen = []\n")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config", path])
        self.assertIn("unknown key [smtp] lisen", str(caught.exception))

    def test_missingConfigIsAUsageError(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config", "/nonexistent.toml"])
        self.assertIn("/nonexistent.toml", str(caught.exception))


class OrderedStopTests(TestCase):
    def test_childrenStopOneAfterAnother(self) -> None:
        from qmailtx.service import OrderedMultiService

        stops: list[str] = []
        slow: Deferred[None] = Deferred()

        class Recorder(Service):
            def __init__(self, name: str, result: Deferred[None] | None = None) -> None:
                self.setName(name)
                self.result = result

            def stopService(self) -> Deferred[None] | None:
                super().stopService()
                stops.append(str(self.name))
                return self.result

        top = OrderedMultiService()
        Recorder("workers").setServiceParent(top)
        Recorder("queue", slow).setServiceParent(top)
        Recorder("smtp").setServiceParent(top)
        top.startService()
        done: list[None] = []
        top.stopService().addCallback(done.append)
        self.assertEqual(stops, ["smtp", "queue"])  # workers wait for the queue
        slow.callback(None)
        self.assertEqual(stops, ["smtp", "queue", "workers"])
        self.assertEqual(done, [None])


class UserDatabaseWiringTests(TestCase):
    def test_deliveryReadsThroughTheCacheAndLoginsDoNot(self) -> None:
        """Local delivery (and rcptcheck) get a CachedUserStore; the hosted-domain
        list, and with it everything else, keeps the SQLite store itself."""
        from qmailtx.vdomain.cache import CachedUserStore
        from qmailtx.vdomain.sqlite import SQLiteUserStore

        mail = makeMailService(reactor, makeTestConfig(self.mktemp(), LISTEN))
        queue: Any = mail.getServiceNamed("queue")
        hosted: Any = mail.getServiceNamed("domains")
        local = queue.agents["local"]
        self.assertIsInstance(local.store, CachedUserStore)
        self.assertIsInstance(hosted.store, SQLiteUserStore)
        self.assertIs(local.store.store, hosted.store)
