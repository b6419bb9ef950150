"""Duplicate recipients end to end (threats.md D10): smtplib, the queue, Maildirs.

The same address given twice in one transaction is one envelope recipient,
so one copy. An address in an alias domain is a different envelope
recipient even when it reaches the same mailbox: qmail-send keeps both
(vaddaliasdomain only adds a virtualdomains entry pointing at the same
domain folder, and qmail-local delivers once per envelope recipient), so
the mailbox gets two copies. qmailtx does the same.
"""

from __future__ import annotations

import os
import time
from typing import cast

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from qmailtx.testing import makeTestConfig
from qmailtx.vdomain.hosted import HostedDomains
from qmailtx.vdomain.records import Domain, User
from qmailtx.vdomain.sqlite import SQLiteUserStore
from tests.test_service import LISTEN, RunningServer, send

MESSAGE = b"From: bob@remote.test\r\nSubject: twice?\r\n\r\nHello.\r\n"


def queuedFiles(data: str) -> list[str]:
    """The committed messages still in the queue."""
    mess = os.path.join(data, "queue", "mess")
    return [name for split in sorted(os.listdir(mess)) for name in os.listdir(f"{mess}/{split}")]


async def waitForHosted(server: RunningServer, *names: str) -> None:
    """Until the queue's routing sees ``names`` as hosted domains."""
    hosted = cast(HostedDomains, server.mail.getServiceNamed("domains"))
    deadline = time.monotonic() + 10
    while not all(hosted.contains(name) for name in names):
        if time.monotonic() > deadline:
            raise AssertionError(f"hosted domains never loaded: {names}")
        await deferLater(reactor, 0.02, lambda: None)


class DuplicateRecipientTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        config = makeTestConfig(self.mktemp(), LISTEN)
        # Hosted before the start: the queue routes by the server's in-memory
        # list of hosted domains (refreshed each second), so wait for it too.
        os.makedirs(config.paths.data)
        store = SQLiteUserStore(config.users.database)
        store.addDomain(Domain("example.com"))
        store.addAliasDomain("example.net", "example.com")
        store.addUser(User("alice", "example.com"))
        store.close()
        self.server = RunningServer(config)
        self.port = await self.server.start()
        self.addCleanup(self.server.stop)
        await waitForHosted(self.server, "example.com", "example.net")

    async def deliveredToAlice(self, recipients: list[str]) -> list[bytes]:
        """Send one message to ``recipients``; once the queue is empty, alice's mail."""
        refused = await deferToThread(send, self.port, "bob@remote.test", recipients, MESSAGE)
        self.assertEqual(refused, {})
        deadline = time.monotonic() + 10
        while queuedFiles(self.server.config.paths.data):
            self.assertLess(time.monotonic(), deadline, "the queue never emptied")
            await deferLater(reactor, 0.02, lambda: None)
        new = os.path.join(self.server.maildir("alice", "example.com"), "new")
        mails = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                mails.append(f.read())
        return mails

    async def test_sameAddressTwiceIsOneCopy(self) -> None:
        mails = await self.deliveredToAlice(["alice@example.com", "Alice@Example.COM"])
        self.assertEqual(len(mails), 1)
        self.assertIn(b"Delivered-To: alice@example.com\n", mails[0])

    async def test_aliasDomainAddressIsASecondCopy(self) -> None:
        mails = await self.deliveredToAlice(["alice@example.com", "alice@example.net"])
        self.assertEqual(len(mails), 2)
        for mail in mails:
            # Both copies name the mailbox's real address, and both are whole.
            self.assertTrue(
                mail.startswith(
                    b"Return-Path: <bob@remote.test>\nDelivered-To: alice@example.com\n"
                ),
                mail[:100],
            )
            self.assertTrue(mail.endswith(b"Subject: twice?\n\nHello.\n"), mail[-100:])
