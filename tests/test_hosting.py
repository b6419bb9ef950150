"""End to end: qmailctl manages a running server; smtplib mail lands, or bounces over quota."""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import sys

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from qmailtx import loadConfig
from qmailtx.vdomain.passwords import verifyPassword
from qmailtx.vdomain.records import Domain, User
from qmailtx.vdomain.sqlite import SQLiteUserStore
from tests.test_service import LISTEN, RunningServer, send

QMAILCTL = os.path.join(os.path.dirname(sys.executable), "qmailctl")


class HostingTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.configPath = os.path.join(folder, "qmailtx.toml")
        with open(self.configPath, "w") as f:
            # Nobody may relay: example.com is accepted only because it is hosted.
            f.write(
                '[paths]\ndata = "var"\n' + LISTEN + "relay_clients = []\n"
                "[delivery]\nquota_warning_percent = 0\n"
                '[control]\nme = "mx.test"\n'
            )
        self.server = RunningServer(loadConfig(self.configPath))
        self.port = await self.server.start()
        self.addCleanup(self.server.stop)

    async def qmailctl(self, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(
            "/bin/sh",
            [
                "-c",
                'printf "%s" "$INPUT" | "$@"',
                "sh",
                QMAILCTL,
                "--config",
                self.configPath,
                *args,
            ],
            env={**os.environ, "INPUT": stdin.decode()},
        )
        return code, out.decode(), err.decode()

    def attempt(self, sender: str, rcpt: str) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.ehlo("client.example")
            client.mail(sender)
            return client.rcpt(rcpt)

    async def test_hostAFirstDomain(self) -> None:
        # Before qmailctl knows the domain, the server refuses it (no relaying).
        code, _ = await deferToThread(self.attempt, "bob@remote.test", "alice@example.com")
        self.assertEqual(code, 553)

        self.assertEqual((await self.qmailctl("domain", "add", "example.com"))[0], 0)
        code, out, err = await self.qmailctl(
            "user",
            "add",
            "alice@example.com",
            "--password-stdin",
            "--quota",
            "3000",
            stdin=b"s3cret pass\n",
        )
        self.assertEqual(code, 0, err)
        store = SQLiteUserStore(self.server.config.users.database)
        self.addCleanup(store.close)
        alice = store.user("alice", "example.com")
        assert alice is not None
        self.assertTrue(verifyPassword("s3cret pass", alice.passwordHash))

        # The running server takes mail for the new mailbox at once.
        message = b"From: bob@remote.test\r\nSubject: hello\r\n\r\nHi Alice.\r\n"
        refused = await deferToThread(
            send, self.port, "postmaster@localhost", ["alice@example.com"], message
        )
        self.assertEqual(refused, {})
        [mail] = await self.server.waitForMail("alice", domain="example.com")
        self.assertTrue(
            mail.startswith(
                b"Return-Path: <postmaster@localhost>\nDelivered-To: alice@example.com\n"
            )
        )
        self.assertTrue(mail.endswith(b"Subject: hello\n\nHi Alice.\n"))

        # Too big for what is left of the quota: the sender gets a bounce saying why.
        big = b"Subject: big\r\n\r\n" + b"x" * 4000 + b"\r\n"
        await deferToThread(send, self.port, "postmaster@localhost", ["alice@example.com"], big)
        [bounce] = await self.server.waitForMail("postmaster")
        report = email.message_from_bytes(bounce, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertIn(
            b"<alice@example.com>:\n"
            b"Sorry, the mailbox of alice@example.com is over quota. (#5.2.2)",
            bounce,
        )
        self.assertIn(b"Status: 5.2.2", bounce)
        self.assertEqual(len(await self.server.waitForMail("alice", domain="example.com")), 1)

    async def test_deletedDomainIsRefusedAgain(self) -> None:
        await self.qmailctl("domain", "add", "example.com")
        await self.qmailctl("user", "add", "x@example.com")
        code, _ = await deferToThread(self.attempt, "bob@remote.test", "x@example.com")
        self.assertEqual(code, 250)
        # rcptcheck: an unknown user of a hosted domain is refused at RCPT.
        code, _ = await deferToThread(self.attempt, "bob@remote.test", "y@example.com")
        self.assertEqual(code, 550)
        self.assertEqual((await self.qmailctl("domain", "del", "example.com"))[0], 0)
        hosted = self.server.mail.getServiceNamed("domains")
        # The cache notices within its interval (1 s).
        for _ in range(50):
            if not hosted.contains("example.com"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        code, _ = await deferToThread(self.attempt, "bob@remote.test", "x@example.com")
        self.assertEqual(code, 553)


class FreshDomainFromARelayClientTests(TestCase):
    """A relay client's RCPT needs no lookup, so nothing at RCPT time tells
    the server that a domain is hosted: the queue asks the database itself
    before mail goes remote (the in-memory list lags by up to a second)."""

    async def test_mailForADomainAddedAMomentAgoIsDeliveredLocally(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        configPath = os.path.join(folder, "qmailtx.toml")
        with open(configPath, "w") as f:
            f.write(
                '[paths]\ndata = "var"\n' + LISTEN + 'relay_clients = ["127.0.0.1/32"]\n'
                '[control]\nme = "mx.test"\n'
            )
        server = RunningServer(loadConfig(configPath))
        port = await server.start()
        self.addCleanup(server.stop)
        hosted = server.mail.getServiceNamed("domains")
        while getattr(hosted, "_version", None) is None:  # its first load is done
            await deferLater(reactor, 0.02, lambda: None)

        store = SQLiteUserStore(server.config.users.database)
        self.addCleanup(store.close)
        store.addDomain(Domain("fresh.example"))
        store.addUser(User("alice", "fresh.example", "x"))
        message = b"Subject: straight away\r\n\r\nHi.\r\n"
        refused = await deferToThread(
            send, port, "postmaster@localhost", ["alice@fresh.example"], message
        )
        self.assertEqual(refused, {})
        [mail] = await server.waitForMail("alice", domain="fresh.example")
        self.assertTrue(mail.endswith(b"Subject: straight away\n\nHi.\n"))
        bounces = os.path.join(server.maildir("postmaster"), "new")
        self.assertEqual(os.listdir(bounces) if os.path.isdir(bounces) else [], [])
