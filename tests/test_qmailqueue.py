"""End to end: QMAILQUEUE filters in the running service, with smtplib on loopback."""

from __future__ import annotations

import email
import email.policy
import os
import shlex
import smtplib
import subprocess
import sys

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

import qmailtx
from qmailtx.testing import makeTestConfig
from tests.test_service import LISTEN, RunningServer

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(qmailtx.__file__)))
INJECT = (
    f"PYTHONPATH={shlex.quote(WORKTREE)} exec {shlex.quote(sys.executable)} -m qmailtx.queue.inject"
)
# Adds a header to every message, then hands it to qmailtx-queue with the same envelope.
HEADER_FILTER = f"{{ printf 'X-Filtered: yes\\n'; cat; }} | {INJECT}"


def transact(port: int, sender: str, recipients: list[str], message: bytes) -> tuple[int, bytes]:
    """One message; the reply to its end of data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail(sender)
        for rcpt in recipients:
            client.rcpt(rcpt)
        return client.data(message)


class QmailQueueTests(TestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.record = os.path.join(self.folder, "record")  # for filters that record

    async def startServer(self, filterBody: str) -> tuple[RunningServer, int]:
        folder = self.folder
        script = os.path.join(folder, "filter")
        with open(script, "w") as f:
            f.write("#!/bin/sh\n" + filterBody + "\n")
        os.chmod(script, 0o700)
        toml = LISTEN + f'[queue]\nqmailqueue = ["{script}"]\n'
        server = RunningServer(makeTestConfig(folder, toml))
        port = await server.start()
        self.addCleanup(server.stop)
        return server, port

    def queueFiles(self, server: RunningServer) -> list[str]:
        mess = os.path.join(server.config.paths.data, "queue", "mess")
        return [name for _, _, names in os.walk(mess) for name in names]

    async def test_filterRewritesTheMessage(self) -> None:
        server, port = await self.startServer(HEADER_FILTER)
        code, text = await deferToThread(
            transact,
            port,
            "sender@example.org",
            ["postmaster@localhost"],
            b"Subject: scanned\r\n\r\nHello.\r\n",
        )
        self.assertEqual(code, 250, text)
        self.assertTrue(text.startswith(b"2.0.0 ok "), text)
        [delivered] = await server.waitForMail("postmaster")
        parsed = email.message_from_bytes(delivered, policy=email.policy.default)
        self.assertEqual(parsed["X-Filtered"], "yes")
        self.assertEqual(parsed["Subject"], "scanned")
        self.assertTrue(delivered.startswith(b"Return-Path: <sender@example.org>\n"))
        self.assertTrue(delivered.endswith(b"\nHello.\n"))
        self.assertIn(b"Received: from ", delivered)  # ours, before the filter saw it

    async def test_permanentRefusal(self) -> None:
        """P10 test 1: the filter records what it got and exits 31."""
        server, port = await self.startServer(
            f"cat >{self.record}.message; cat <&1 >{self.record}.envelope; exit 31"
        )
        code, text = await deferToThread(
            transact,
            port,
            "sender@example.org",
            ["postmaster@localhost", "other@localhost"],
            b"Subject: refused\r\n\r\nx\r\n",
        )
        self.assertEqual((code, text), (554, b"5.3.0 mail server permanently rejected message"))
        with open(self.record + ".envelope", "rb") as f:
            envelope = f.read()
        self.assertEqual(
            envelope, b"Fsender@example.org\0Tpostmaster@localhost\0Tother@localhost\0\0"
        )
        with open(self.record + ".message", "rb") as f:
            self.assertIn(b"Subject: refused\n\nx\n", f.read())
        self.assertEqual(self.queueFiles(server), [])

    async def test_temporaryRefusal(self) -> None:
        """P10 test 2."""
        server, port = await self.startServer("exit 71")
        code, text = await deferToThread(
            transact, port, "sender@example.org", ["postmaster@localhost"], b"x\r\n"
        )
        self.assertEqual((code, text), (451, b"4.3.0 mail server temporarily rejected message"))
        self.assertEqual(self.queueFiles(server), [])

    async def test_bouncesPassThroughTheFilter(self) -> None:
        server, port = await self.startServer(HEADER_FILTER)
        code, _ = await deferToThread(
            transact,
            port,
            "postmaster@localhost",
            ["nobody@localhost"],
            b"Subject: lost\r\n\r\nx\r\n",
        )
        self.assertEqual(code, 250)
        [bounce] = await server.waitForMail("postmaster")
        parsed = email.message_from_bytes(bounce, policy=email.policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed["Return-Path"], "<>")
        self.assertEqual(parsed["X-Filtered"], "yes")  # the bounce's own header
        self.assertIn(b"Subject: lost", bounce)

    async def test_injectedWhileRunningIsDelivered(self) -> None:
        """A local program queues with qmailtx-queue; the trigger wakes the manager."""
        server, port = await self.startServer("exit 71")
        folder = self.folder
        with open(os.path.join(folder, "message"), "wb") as f:
            f.write(b"Subject: from cron\n\nhello\n")
        with open(os.path.join(folder, "envelope"), "wb") as f:
            f.write(b"Fcron@localhost\0Tpostmaster@localhost\0\0")

        def inject() -> subprocess.CompletedProcess[bytes]:
            with (
                open(os.path.join(folder, "message"), "rb") as message,
                open(os.path.join(folder, "envelope"), "rb") as envelope,
            ):
                return subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "qmailtx.queue.inject",
                        "--queue",
                        os.path.join(server.config.paths.data, "queue"),
                    ],
                    stdin=message,
                    stdout=envelope,
                    stderr=subprocess.PIPE,
                    env=dict(os.environ, PYTHONPATH=WORKTREE),
                    timeout=60,
                )

        done = await deferToThread(inject)
        self.assertEqual(done.returncode, 0, done.stderr)
        [delivered] = await server.waitForMail("postmaster")
        self.assertTrue(delivered.startswith(b"Return-Path: <cron@localhost>\n"))
        self.assertTrue(delivered.endswith(b"Subject: from cron\n\nhello\n"))
