"""Local delivery: recipient resolution, dot-qmail lines, quotas, loops, auto-replies."""

from __future__ import annotations

import dataclasses
import email
import email.utils
import errno
import itertools
import os
import threading
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from qmailtx.address import Address, parseMailbox
from qmailtx.control import buildControl
from qmailtx.delivery.identity import resolveProgramUser
from qmailtx.delivery.interfaces import DeliveryResult, IDeliveryAgent, Outcome
from qmailtx.delivery.local import NO_PROGRAM_USER, LocalDeliveryAgent, LocalSettings
from qmailtx.delivery.maildir import MaildirWriter, makeMaildir
from qmailtx.domains import DomainTable
from qmailtx.fs import FileSystem
from qmailtx.queue.bounce import BounceSettings
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import TODO, QueuedMessage
from qmailtx.queue.manager import QueueManager, QueueSettings
from qmailtx.queue.store import QueueStore, Runner, synchronousRunner
from qmailtx.testing import ManualRunner, RecordingFileSystem
from qmailtx.vdomain.cache import CachedUserStore
from qmailtx.vdomain.layout import userFolder
from qmailtx.vdomain.records import (
    Alias,
    CatchAll,
    CatchAllAction,
    Domain,
    QuotaLimit,
    User,
    UserFlags,
    Vacation,
)
from qmailtx.vdomain.sqlite import SQLiteUserStore
from qmailtx.vdomain.userlock import holdFolder, retireFolder

reactor: Any = _reactor

NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"
NOBODY = resolveProgramUser("nobody")
MESSAGE = b"From: Bob <bob@remote.test>\nTo: alice@example.com\nSubject: hi\n\nbody\n"


class _Fixture:
    """A data folder with example.com (alias example.net), alice and bob (1000-byte quota)."""

    def setUpFixture(self, mktemp: Any, **settings: Any) -> None:
        self.data = os.path.abspath(mktemp())
        os.makedirs(self.data)
        self.store = SQLiteUserStore(os.path.join(self.data, "users.sqlite3"))
        self.store.addDomain(Domain("example.com", aliases=("example.net",)))
        for user in (
            User("alice", "example.com"),
            User("bob", "example.com", quota=QuotaLimit(1000)),
        ):
            self.store.addUser(user)
            makeMaildir(FileSystem(), self.maildir(user.name))
        self.disk = QueueDisk(os.path.join(self.data, "queue"))
        self.disk.create()
        self.queue = QueueStore(self.disk, synchronousRunner)
        self.injected: list[QueuedMessage] = []
        self.queue.addListener(self.injected.append)
        control = buildControl({"me": "mx.test", "locals": ["localhost"]}, {}, "test")
        self.settings = LocalSettings(
            data=self.data, domains=DomainTable.fromControl(control), me="mx.test", **settings
        )

    def agent(
        self, runner: Runner = synchronousRunner, fs: FileSystem | None = None, **kw: Any
    ) -> LocalDeliveryAgent:
        return LocalDeliveryAgent(
            runner,
            self.settings,
            CachedUserStore(self.store),  # as the server has it; tests change self.store
            self.queue,
            kw.pop("reactor", None),
            MaildirWriter(fs) if fs else None,
            fs,
            **kw,
        )

    def maildir(self, user: str, domain: str = "example.com") -> str:
        return os.path.join(userFolder(self.data, user, domain).path, "Maildir")

    def delivered(self, user: str, domain: str = "example.com") -> list[bytes]:
        new = os.path.join(self.maildir(user, domain), "new")
        found = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                found.append(f.read())
        return found

    def queued(
        self, recipient: str, content: bytes = MESSAGE, sender: str = "bob@remote.test"
    ) -> QueuedMessage:
        return self.disk.inject(
            1000.0, Address.fromStored(sender), [Address.fromStored(recipient)], content, {}
        )

    def writeFile(self, path: str, text: str, mode: int = 0o600) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)

    def injectedMessages(self) -> list[tuple[str, list[str], bytes]]:
        found = []
        for message in self.injected:
            found.append(
                (
                    str(message.sender),
                    [str(r) for r in message.recipients],
                    self.disk.readMessage(message, 1 << 20),
                )
            )
        return found


class ResolutionTests(_Fixture, SynchronousTestCase):
    def setUp(self) -> None:
        self.setUpFixture(self.mktemp)

    def deliver(
        self,
        recipient: str,
        content: bytes = MESSAGE,
        agent: LocalDeliveryAgent | None = None,
        sender: str = "bob@remote.test",
    ) -> DeliveryResult:
        agent = agent or self.agent()
        d = agent.deliver(self.queued(recipient, content, sender), [Address.fromStored(recipient)])
        [result] = self.successResultOf(d)
        return result

    def test_userMaildir(self) -> None:
        verifyObject(IDeliveryAgent, self.agent())
        self.assertIsNone(self.agent().batchLimit(Address("alice", "example.com")))
        result = self.deliver("Alice@Example.COM")
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        self.assertEqual(
            self.delivered("alice"),
            [b"Return-Path: <bob@remote.test>\nDelivered-To: alice@example.com\n" + MESSAGE],
        )

    def test_aliasDomainDeliversToTheSameUser(self) -> None:
        self.assertEqual(self.deliver("alice@example.net").outcome, Outcome.DELIVERED)
        [mail] = self.delivered("alice")
        self.assertIn(b"Delivered-To: alice@example.com\n", mail)

    def test_unknownUserBouncesByDefault(self) -> None:
        result = self.deliver("nobody@example.com")
        self.assertEqual((result.outcome, result.text), (Outcome.PERMANENT, NO_MAILBOX))

    def test_unknownDomainBounces(self) -> None:
        result = self.deliver("alice@elsewhere.test")
        self.assertEqual((result.outcome, result.text), (Outcome.PERMANENT, NO_MAILBOX))

    def test_catchAllDelete(self) -> None:
        self.store.setCatchAll("example.com", CatchAll(CatchAllAction.DELETE))
        result = self.deliver("nobody@example.com")
        self.assertEqual(result.outcome, Outcome.DELIVERED)
        self.assertEqual(self.delivered("alice") + self.delivered("bob"), [])
        self.assertEqual(self.injected, [])

    def test_catchAllForward(self) -> None:
        self.store.setCatchAll("example.com", CatchAll(CatchAllAction.FORWARD, "boss@remote.test"))
        result = self.deliver("nobody@example.com")
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        [(sender, rcpts, content)] = self.injectedMessages()
        self.assertEqual((sender, rcpts), ("bob@remote.test", ["boss@remote.test"]))
        self.assertEqual(content, b"Delivered-To: nobody@example.com\n" + MESSAGE)

    def test_catchAllMailbox(self) -> None:
        self.store.setCatchAll("example.com", CatchAll(CatchAllAction.MAILBOX, "alice"))
        self.assertEqual(self.deliver("nobody@example.com").outcome, Outcome.DELIVERED)
        [mail] = self.delivered("alice")
        self.assertIn(b"Delivered-To: nobody@example.com\n", mail)

    def test_catchAllMailboxMissingIsTemporary(self) -> None:
        self.store.setCatchAll("example.com", CatchAll(CatchAllAction.MAILBOX, "carol"))
        self.assertEqual(self.deliver("nobody@example.com").outcome, Outcome.TEMPORARY)

    def test_extensionFallsBackToTheUsersMaildir(self) -> None:
        self.assertEqual(self.deliver("alice-lists@example.com").outcome, Outcome.DELIVERED)
        [mail] = self.delivered("alice")
        self.assertIn(b"Delivered-To: alice-lists@example.com\n", mail)

    def test_configuredDelimiter(self) -> None:
        self.setUpFixture(self.mktemp, delimiters="+-")
        self.assertEqual(self.deliver("alice+tag@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.delivered("alice")), 1)

    def test_extensionDotQmail(self) -> None:
        home = userFolder(self.data, "alice", "example.com").path
        self.writeFile(os.path.join(home, ".qmail-lists"), "&lists@remote.test\n")
        self.writeFile(os.path.join(home, ".qmail-shop-default"), "./Maildir/\n")
        result = self.deliver("alice-lists@example.com")
        self.assertEqual((result.outcome, result.text), (Outcome.DELIVERED, "did 0+1+0/"))
        self.assertEqual(self.delivered("alice"), [])
        [(_, rcpts, _)] = self.injectedMessages()
        self.assertEqual(rcpts, ["lists@remote.test"])
        self.assertEqual(self.deliver("alice-shop-books@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.delivered("alice")), 1)

    def test_ownerFileSetsTheForwardingSender(self) -> None:
        domain = os.path.join(self.data, "domains", "example.com")
        self.writeFile(os.path.join(domain, ".qmail-list"), "&a@remote.test\n")
        self.writeFile(os.path.join(domain, ".qmail-list-owner"), "&boss@remote.test\n")
        self.assertEqual(self.deliver("list@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(self.deliver("list@example.com", sender="").outcome, Outcome.DELIVERED)
        senders = [sender for sender, _, _ in self.injectedMessages()]
        self.assertEqual(senders, ["list-owner@example.com", ""])

    def test_usersDotQmail(self) -> None:
        home = userFolder(self.data, "alice", "example.com").path
        self.writeFile(
            os.path.join(home, ".qmail"), "# keep a copy\n./Maildir/\t\t\n&copy@remote.test \t\n"
        )
        result = self.deliver("alice@example.com")
        self.assertEqual((result.outcome, result.text), (Outcome.DELIVERED, "did 1+1+0/"))
        self.assertEqual(len(self.delivered("alice")), 1)
        [(_, rcpts, _)] = self.injectedMessages()
        self.assertEqual(rcpts, ["copy@remote.test"])

    def test_blankFirstLineIsTemporary(self) -> None:
        home = userFolder(self.data, "alice", "example.com").path
        self.writeFile(os.path.join(home, ".qmail"), "\t\t\n./Maildir/\n")
        result = self.deliver("alice@example.com")
        self.assertEqual(
            (result.outcome, result.text),
            (Outcome.TEMPORARY, "Uh-oh: first line of .qmail file is blank. (#4.2.1)"),
        )
        self.assertEqual(self.delivered("alice"), [])

    def test_domainFolderDotQmail(self) -> None:
        domain = os.path.join(self.data, "domains", "example.com")
        self.writeFile(
            os.path.join(domain, ".qmail-info"), "&alice@example.com\n&bob@example.com\n"
        )
        self.writeFile(
            os.path.join(domain, ".qmail-default"), "| /nonexistent/vdelivermail '' delete\n"
        )
        self.assertEqual(self.deliver("info@example.com").text, "did 0+2+0/")
        [(_, rcpts, _)] = self.injectedMessages()
        self.assertEqual(rcpts, ["alice@example.com", "bob@example.com"])
        # .qmail-default is vpopmail's vdelivermail line: the catch-all replaces it.
        self.assertEqual(self.deliver("nobody@example.com").text, NO_MAILBOX)

    def test_valias(self) -> None:
        self.store.addAlias(
            Alias(
                "sales",
                "example.com",
                ("&a@remote.test", "b@remote.test", self.maildir("alice") + "/"),
            )
        )
        result = self.deliver("sales@example.com")
        self.assertEqual((result.outcome, result.text), (Outcome.DELIVERED, "did 1+2+0/"))
        [(_, rcpts, content)] = self.injectedMessages()
        self.assertEqual(rcpts, ["a@remote.test", "b@remote.test"])
        self.assertTrue(content.startswith(b"Delivered-To: sales@example.com\n"))
        [mail] = self.delivered("alice")
        self.assertIn(b"Delivered-To: sales@example.com\n", mail)

    def test_valiasDefault(self) -> None:
        self.store.addAlias(Alias("list-default", "example.com", ("&owner@remote.test",)))
        self.assertEqual(self.deliver("list-subscribe-x@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.injected), 1)

    def test_loopBounces(self) -> None:
        looping = b"Delivered-To: other@example.org\nDelivered-To: ALICE@example.com\n" + MESSAGE
        result = self.deliver("alice@example.com", looping)
        self.assertEqual(
            (result.outcome, result.text),
            (
                Outcome.PERMANENT,
                "This message is looping: it already has my Delivered-To line. (#5.4.6)",
            ),
        )
        self.assertEqual(self.delivered("alice"), [])
        # A Delivered-To line in the body is not a loop.
        self.assertEqual(
            self.deliver(
                "alice@example.com", MESSAGE + b"Delivered-To: alice@example.com\n"
            ).outcome,
            Outcome.DELIVERED,
        )

    def test_forwardLoopEndsInABounce(self) -> None:
        self.store.addAlias(Alias("a", "example.com", ("&b@example.com",)))
        self.store.addAlias(Alias("b", "example.com", ("&a@example.com",)))
        self.assertEqual(self.deliver("a@example.com").outcome, Outcome.DELIVERED)
        results = []
        for _ in range(3):
            forwarded = self.injected.pop(0)
            [rcpt] = forwarded.recipients
            [result] = self.successResultOf(self.agent().deliver(forwarded, [rcpt]))
            results.append(result.outcome)
            if result.outcome is not Outcome.DELIVERED:
                break
        self.assertEqual(results, [Outcome.DELIVERED, Outcome.PERMANENT])

    def test_lockedAccountBounces(self) -> None:
        self.store.setFlags("alice", "example.com", UserFlags.BOUNCE_MAIL)
        result = self.deliver("alice@example.com")
        self.assertEqual(result.outcome, Outcome.PERMANENT)
        self.assertIn("locked", result.text)

    def test_missingUserFolderIsCreated(self) -> None:
        self.store.addUser(User("carol", "example.com"))
        self.assertEqual(self.deliver("carol@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.delivered("carol")), 1)

    def test_namesThatCannotBeFoldersBounce(self) -> None:
        for local in ("..", ".qmail", "a/b", "../../etc"):
            result = self.deliver(f'"{local}"@example.com')
            self.assertEqual(result.outcome, Outcome.PERMANENT, local)

    def test_controlFileLocalDomainUsesFolders(self) -> None:
        makeMaildir(
            FileSystem(), os.path.join(self.data, "domains", "localhost", "postmaster", "Maildir")
        )
        self.assertEqual(self.deliver("postmaster@localhost").outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.delivered("postmaster", "localhost")), 1)
        self.assertEqual(self.deliver("joe@localhost").text, NO_MAILBOX)

    def test_databaseDownIsTemporary(self) -> None:
        broken = os.path.join(self.data, "broken.sqlite3")
        with open(broken, "wb") as f:
            f.write(b"garbage" * 1000)
        agent = self.agent()
        agent.store = SQLiteUserStore(broken)
        result = self.deliver("alice@example.com", agent=agent)
        self.assertEqual(result.outcome, Outcome.TEMPORARY)
        self.assertIn("database", result.text)

    def test_diskErrorsAreTemporary(self) -> None:
        for code in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
            fs = RecordingFileSystem()
            fs.failOn["fsync"] = code
            result = self.deliver("bob@example.com", agent=self.agent(fs=fs))
            self.assertEqual(result.outcome, Outcome.TEMPORARY, result.text)
            self.assertIn(os.strerror(code), result.text)
            self.assertTrue(result.text.endswith("(#4.3.0)"), result.text)
        self.assertEqual(self.delivered("bob"), [])

    def test_deletedUserFolderIsTemporaryThenBounces(self) -> None:
        folder = userFolder(self.data, "alice", "example.com").path
        agent = self.agent()
        message = self.queued("alice@example.com")
        # The user is deleted between resolution and writing.
        original = agent._plan

        def deleteAfterPlanning(*args: Any) -> bool:
            planned = original(*args)
            self.store.deleteUser("alice", "example.com")
            retireFolder(folder, os.path.join(self.data, "deleted"))
            return planned

        agent._plan = deleteAfterPlanning  # type: ignore[method-assign,assignment]
        [result] = self.successResultOf(agent.deliver(message, [Address("alice", "example.com")]))
        self.assertEqual(result.outcome, Outcome.TEMPORARY, result.text)
        self.assertFalse(os.path.exists(folder))  # not made again for a deleted user
        [result] = self.successResultOf(
            self.agent().deliver(message, [Address("alice", "example.com")])
        )
        self.assertEqual((result.outcome, result.text), (Outcome.PERMANENT, NO_MAILBOX))


class CachedStoreTests(_Fixture, SynchronousTestCase):
    """One agent, one CachedUserStore, several deliveries; changes come from
    another store object on the same file, as qmailctl's would."""

    def setUp(self) -> None:
        self.setUpFixture(self.mktemp)
        self.other = SQLiteUserStore(self.store.path)
        self.addCleanup(self.other.close)
        self.addCleanup(self.store.close)
        self.one = self.agent()

    def deliver(self, recipient: str) -> DeliveryResult:
        message = self.queued(recipient)
        d = self.one.deliver(message, [Address.fromStored(recipient)])
        [result] = self.successResultOf(d)
        return result

    def test_secondDeliveryAsksOnlyTheVersion(self) -> None:
        for recipient in ("alice@example.com", "alice@example.net", "nobody@example.com"):
            self.deliver(recipient)
            statements: list[str] = []
            connection = self.store._connect()  # the worker is this thread
            connection.set_trace_callback(statements.append)
            try:
                self.deliver(recipient)
            finally:
                connection.set_trace_callback(None)
            self.assertEqual(
                statements, ["SELECT value FROM meta WHERE key = 'generation'"], recipient
            )
        self.assertEqual(len(self.delivered("alice")), 4)

    def test_userAddedBetweenDeliveries(self) -> None:
        result = self.deliver("dave@example.com")
        self.assertEqual((result.outcome, result.text), (Outcome.PERMANENT, NO_MAILBOX))
        self.other.addUser(User("dave", "example.com"))
        self.assertEqual(self.deliver("dave@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.delivered("dave")), 1)

    def test_userDeletedBetweenDeliveries(self) -> None:
        self.assertEqual(self.deliver("alice@example.com").outcome, Outcome.DELIVERED)
        self.other.deleteUser("alice", "example.com")
        result = self.deliver("alice@example.com")
        self.assertEqual((result.outcome, result.text), (Outcome.PERMANENT, NO_MAILBOX))

    def test_aliasAddedBetweenDeliveries(self) -> None:
        self.assertEqual(self.deliver("info@example.com").outcome, Outcome.PERMANENT)
        self.other.addAlias(Alias("info", "example.com", ("./alice/Maildir/",)))
        self.assertEqual(self.deliver("info@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.delivered("alice")), 1)

    def test_quotaSetBetweenDeliveries(self) -> None:
        self.assertEqual(self.deliver("alice@example.com").outcome, Outcome.DELIVERED)
        self.other.setQuota("alice", "example.com", QuotaLimit(10))
        result = self.deliver("alice@example.com")
        self.assertNotEqual(result.outcome, Outcome.DELIVERED)
        self.assertEqual(len(self.delivered("alice")), 1)

    def test_vacationSetBetweenDeliveries(self) -> None:
        self.assertEqual(self.deliver("alice@example.com").outcome, Outcome.DELIVERED)
        self.assertEqual(self.injected, [])
        self.other.setVacation("alice", "example.com", Vacation("away", "back soon", 3600))
        self.assertEqual(self.deliver("alice@example.com").outcome, Outcome.DELIVERED)
        [(sender, recipients, _)] = self.injectedMessages()
        self.assertEqual((sender, recipients), ("", ["bob@remote.test"]))

    def test_aliasDomainAddedBetweenDeliveries(self) -> None:
        self.assertEqual(self.deliver("alice@example.org").outcome, Outcome.PERMANENT)
        self.other.addAliasDomain("example.org", "example.com")
        self.assertEqual(self.deliver("alice@example.org").outcome, Outcome.DELIVERED)


class QuotaTests(_Fixture, SynchronousTestCase):
    def setUp(self) -> None:
        self.setUpFixture(self.mktemp, warnPercent=0)

    def deliver(self, recipient: str, size: int) -> DeliveryResult:
        body = b"x" * size
        d = self.agent().deliver(self.queued(recipient, body), [Address.fromStored(recipient)])
        [result] = self.successResultOf(d)
        return result

    def maildirsize(self, user: str = "bob") -> list[str]:
        with open(os.path.join(self.maildir(user), "maildirsize")) as f:
            return f.read().splitlines()

    def test_underQuotaDeliversAndCounts(self) -> None:
        result = self.deliver("bob@example.com", 100)
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        [mail] = self.delivered("bob")
        lines = self.maildirsize()
        self.assertEqual(lines[0], "1000S")
        self.assertEqual(sum(int(line.split()[0]) for line in lines[1:]), len(mail))
        [name] = os.listdir(os.path.join(self.maildir("bob"), "new"))
        self.assertTrue(name.endswith(f",S={len(mail)}"))

    def test_overQuotaBouncesByDefault(self) -> None:
        result = self.deliver("bob@example.com", 2000)
        self.assertEqual(
            (result.outcome, result.text),
            (Outcome.PERMANENT, "Sorry, the mailbox of bob@example.com is over quota. (#5.2.2)"),
        )
        self.assertEqual(self.delivered("bob"), [])

    def test_overQuotaDefersWhenConfigured(self) -> None:
        self.setUpFixture(self.mktemp, overQuota="defer", warnPercent=0)
        result = self.deliver("bob@example.com", 2000)
        self.assertEqual(
            (result.outcome, result.text),
            (Outcome.TEMPORARY, "The mailbox of bob@example.com is over quota. (#4.2.2)"),
        )

    def test_fillingUpThenFull(self) -> None:
        sizes = [self.deliver("bob@example.com", 300).outcome for _ in range(4)]
        self.assertEqual(sizes[:2], [Outcome.DELIVERED, Outcome.DELIVERED])
        self.assertEqual(sizes[-1], Outcome.PERMANENT)

    def test_quotaChangeInTheDatabaseRewritesMaildirsize(self) -> None:
        self.deliver("bob@example.com", 100)
        self.store.setQuota("bob", "example.com", QuotaLimit(5000, 10))
        self.assertEqual(self.deliver("bob@example.com", 1500).outcome, Outcome.DELIVERED)
        self.assertEqual(self.maildirsize()[0], "5000S,10C")

    def test_unlimitedUserGetsNoMaildirsize(self) -> None:
        self.assertEqual(self.deliver("alice@example.com", 5000).outcome, Outcome.DELIVERED)
        self.assertFalse(os.path.exists(os.path.join(self.maildir("alice"), "maildirsize")))

    def test_staleMaildirsizeOfAUserWithoutQuotaIsIgnored(self) -> None:
        self.writeFile(os.path.join(self.maildir("alice"), "maildirsize"), "100S\n0 0\n")
        self.assertEqual(self.deliver("alice@example.com", 500).outcome, Outcome.DELIVERED)

    def test_maildirLineHonoursAnExistingMaildirsize(self) -> None:
        shared = os.path.join(self.data, "shared", "Maildir")
        makeMaildir(FileSystem(), shared)
        self.writeFile(os.path.join(shared, "maildirsize"), "500S\n0 0\n")
        self.store.addAlias(Alias("team", "example.com", (shared + "/",)))
        self.assertEqual(self.deliver("team@example.com", 100).outcome, Outcome.DELIVERED)
        self.assertEqual(self.deliver("team@example.com", 600).outcome, Outcome.PERMANENT)

    def onDisk(self, user: str = "bob") -> tuple[int, int]:
        """Bytes and count of the messages in new/ and cur/."""
        sizes = [
            os.path.getsize(os.path.join(self.maildir(user), sub, name))
            for sub in ("new", "cur")
            for name in os.listdir(os.path.join(self.maildir(user), sub))
        ]
        return sum(sizes), len(sizes)

    def counted(self, user: str = "bob") -> tuple[int, int]:
        """What the delta lines of maildirsize add up to."""
        lines = [line.split() for line in self.maildirsize(user)[1:]]
        return sum(int(b) for b, _ in lines), sum(int(c) for _, c in lines)

    def test_failedDirectoryFsyncLeavesNoUsageLine(self) -> None:
        """Q2: a delivery that fails after its maildirsize line is written
        takes the line back, so the usage does not drift upwards."""
        self.assertEqual(self.deliver("bob@example.com", 100).outcome, Outcome.DELIVERED)
        fs = RecordingFileSystem()
        fs.failOn["fsyncdir"] = errno.EIO  # the fsync of new/ after the link
        message = self.queued("bob@example.com", b"x" * 200)
        d = self.agent(fs=fs).deliver(message, [Address("bob", "example.com")])
        [result] = self.successResultOf(d)
        self.assertEqual(result.outcome, Outcome.TEMPORARY, result.text)
        self.assertIn(
            ("link", os.path.join(self.maildir("bob"), "new")),
            [(op, os.path.dirname(path)) for op, path in fs.events],
        )
        self.assertEqual(len(self.delivered("bob")), 1)
        self.assertEqual(os.listdir(os.path.join(self.maildir("bob"), "tmp")), [])
        self.assertEqual(self.counted(), self.onDisk())

    def test_warningOncePerCrossing(self) -> None:
        self.setUpFixture(self.mktemp, warnPercent=50)
        self.deliver("bob@example.com", 200)
        self.assertEqual(len(self.delivered("bob")), 1)
        self.deliver("bob@example.com", 300)  # crosses 500 bytes: message + warning
        mails = self.delivered("bob")
        self.assertEqual(len(mails), 3)
        warnings = [m for m in mails if b"Subject: Your mailbox is 50% full" in m]
        self.assertEqual(len(warnings), 1)
        self.deliver("bob@example.com", 10)  # above already: no second warning
        self.assertEqual(len(self.delivered("bob")), 4)


FAULTABLE = ("open", "write", "fsync", "link", "rename", "fsyncdir")
TRANSIENT = (errno.EIO, errno.ENOSPC, errno.EAGAIN)


class TransientErrorTests(_Fixture, SynchronousTestCase):
    """D7: an I/O error at any step of a Maildir delivery defers it, leaves
    nothing in the Maildir, and the retry delivers exactly one message."""

    # (user, maildirsize before the delivery): no quota; a quota with a
    # maildirsize; a quota without one (the delivery recounts and writes it).
    MAILBOXES = (("alice", None), ("bob", "1000S\n0 0\n"), ("bob", ""))

    def setUp(self) -> None:
        self.setUpFixture(self.mktemp, warnPercent=0)

    def reset(self, user: str, maildirsize: str | None) -> None:
        maildir = self.maildir(user)
        for sub in ("tmp", "new", "cur"):
            for name in os.listdir(os.path.join(maildir, sub)):
                os.unlink(os.path.join(maildir, sub, name))
        path = os.path.join(maildir, "maildirsize")
        if os.path.exists(path):
            os.unlink(path)
        if maildirsize:
            self.writeFile(path, maildirsize)

    def attempt(self, agent: LocalDeliveryAgent, message: QueuedMessage) -> DeliveryResult:
        [result] = self.successResultOf(
            agent.deliver(message, [Address.fromStored(message.recipients[0].lowered())])
        )
        return result

    def files(self, user: str) -> dict[str, list[str]]:
        return {
            sub: os.listdir(os.path.join(self.maildir(user), sub)) for sub in ("tmp", "new", "cur")
        }

    def assertCountedRight(self, user: str, case: object) -> None:
        """maildirsize (when there is one) sums to what new/ holds."""
        path = os.path.join(self.maildir(user), "maildirsize")
        if not os.path.exists(path):
            return
        with open(path) as f:
            deltas = [line.split() for line in f.read().splitlines()[1:]]
        new = os.path.join(self.maildir(user), "new")
        sizes = [os.path.getsize(os.path.join(new, name)) for name in os.listdir(new)]
        counted = (sum(int(b) for b, _ in deltas), sum(int(c) for _, c in deltas))
        self.assertEqual(counted, (sum(sizes), len(sizes)), case)

    def steps(self, user: str, maildirsize: str | None, anonymous: bool) -> list[tuple[str, int]]:
        """The faultable operations of a clean delivery, as (op, n-th call of op)."""
        self.reset(user, maildirsize)
        fs = RecordingFileSystem(anonymous=anonymous)
        result = self.attempt(self.agent(fs=fs), self.queued(f"{user}@example.com"))
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        seen: dict[str, int] = {}
        steps = []
        for op, _ in fs.events:
            if op in FAULTABLE:
                steps.append((op, seen.get(op, 0)))
                seen[op] = seen.get(op, 0) + 1
        return steps

    def test_everyStepAndErrnoDefersAndTheRetryDeliversOnce(self) -> None:
        tried = set()
        for (user, maildirsize), anonymous in itertools.product(self.MAILBOXES, (True, False)):
            for (op, nth), code in itertools.product(
                self.steps(user, maildirsize, anonymous), TRANSIENT
            ):
                case = (user, maildirsize, anonymous, op, nth, errno.errorcode[code])
                tried.add(op)
                self.reset(user, maildirsize)
                fs = RecordingFileSystem(anonymous=anonymous)
                fs.failOn[op] = code
                fs.failAfter[op] = nth
                agent = self.agent(fs=fs)
                message = self.queued(f"{user}@example.com")
                result = self.attempt(agent, message)
                self.assertNotIn(op, fs.failOn, case)  # the fault did happen
                self.assertEqual(result.outcome, Outcome.TEMPORARY, (case, result.text))
                self.assertIn(os.strerror(code), result.text, case)
                self.assertEqual(self.files(user), {"tmp": [], "new": [], "cur": []}, case)
                self.assertCountedRight(user, case)
                # The fault is gone: the retry delivers the message once.
                result = self.attempt(agent, message)
                self.assertEqual(result.outcome, Outcome.DELIVERED, (case, result.text))
                files = self.files(user)
                self.assertEqual((files["tmp"], len(files["new"]), files["cur"]), ([], 1, []), case)
                self.assertCountedRight(user, case)
        self.assertEqual(tried, set(FAULTABLE))
        self.assertEqual(self.injected, [])  # no bounce, no auto-reply, nothing

    def test_queueManagerDefersWithoutABounceAndRetries(self) -> None:
        """The same through the queue manager: EAGAIN at the fsync of new/
        reschedules the message (no bounce); the retry delivers it once."""
        self.reset("bob", "1000S\n0 0\n")
        clock = MemoryReactorClock()
        clock.advance(int(time.time()))  # queue files carry real mtimes
        fs = RecordingFileSystem()
        fs.failOn["fsyncdir"] = errno.EAGAIN
        runner = ManualRunner()
        agent = self.agent(runner=runner, fs=fs, clock=clock.seconds)
        control = buildControl({"me": "mx.test"}, {}, "test")
        manager = QueueManager(
            clock,
            self.queue,
            {"local": agent},
            lambda r: "local",
            QueueSettings({"local": 2}, 604800, BounceSettings.fromControl(control)),
        )
        manager.startService()
        self.addCleanup(manager.stopService)
        self.queue.inject(
            clock.seconds(),
            Address("a", "remote.test"),
            [Address("bob", "example.com")],
            MESSAGE,
            {},
        )
        runner.runAll()
        self.assertNotIn("fsyncdir", fs.failOn)
        [message] = self.disk.scan().messages
        self.assertEqual((message.states, message.info.get("b")), ([TODO], None))
        self.assertEqual(self.files("bob"), {"tmp": [], "new": [], "cur": []})
        self.assertCountedRight("bob", "first attempt")
        self.assertEqual(runner.pending, [])
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        runner.runAll()
        self.assertEqual(self.disk.scan().messages, [])
        self.assertEqual(len(self.delivered("bob")), 1)
        self.assertCountedRight("bob", "retry")
        self.assertEqual(len(self.injected), 1)  # the message itself; no bounce


class StaleTmpTests(_Fixture, SynchronousTestCase):
    def setUp(self) -> None:
        self.setUpFixture(self.mktemp)

    def test_deliverySweepsStaleTmpOnceAnHour(self) -> None:
        """D4: a delivery removes files older than 36 hours from the Maildir's
        tmp/, at most once an hour; fresh ones and new/ are left alone."""
        now = [time.time() + 10 * 86400]  # the delivered messages are 10 days old then
        agent = self.agent(clock=lambda: now[0])
        tmp = os.path.join(self.maildir("alice"), "tmp")

        def put(name: str, age: float) -> None:
            path = os.path.join(tmp, name)
            self.writeFile(path, "x")
            os.utime(path, (now[0] - age, now[0] - age))

        def deliver() -> None:
            message = self.queued("alice@example.com")
            [result] = self.successResultOf(
                agent.deliver(message, [Address("alice", "example.com")])
            )
            self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)

        put("1.old", 37 * 3600)
        put("2.fresh", 3600)
        deliver()
        self.assertEqual(sorted(os.listdir(tmp)), ["2.fresh"])
        put("3.old", 37 * 3600)
        now[0] += 1800
        deliver()
        self.assertEqual(sorted(os.listdir(tmp)), ["2.fresh", "3.old"])
        now[0] += 1800
        deliver()
        self.assertEqual(sorted(os.listdir(tmp)), ["2.fresh"])
        self.assertEqual(len(self.delivered("alice")), 3)


class ConcurrentQuotaTests(_Fixture, TestCase):
    def setUp(self) -> None:
        self.setUpFixture(self.mktemp, warnPercent=0)

    async def test_twoDeliveriesNearTheLimit(self) -> None:
        """Two deliveries that each fit alone but not together: exactly one lands."""

        def threaded(f: Any, *args: Any) -> Deferred[Any]:
            return deferToThread(f, *args)

        results = []
        for _ in range(5):
            for name in os.listdir(os.path.join(self.maildir("bob"), "new")):
                os.unlink(os.path.join(self.maildir("bob"), "new", name))
            sizePath = os.path.join(self.maildir("bob"), "maildirsize")
            if os.path.exists(sizePath):
                os.unlink(sizePath)
            messages = [self.queued("bob@example.com", b"x" * 550) for _ in range(2)]
            agent = self.agent(runner=threaded)
            outcomes = await gatherResults(
                [agent.deliver(m, [Address("bob", "example.com")]) for m in messages]
            )
            results.append(sorted(r[0].outcome.value for r in outcomes))
            self.assertEqual(len(self.delivered("bob")), 1)
        self.assertEqual(results, [["failure", "success"]] * 5)


class FirstDeliveryRaceTests(_Fixture, TestCase):
    def setUp(self) -> None:
        self.setUpFixture(self.mktemp, warnPercent=0)

    async def test_concurrentFirstDeliveriesAllLand(self) -> None:
        """A user whose folder does not exist yet (added to the database
        directly) gets several messages at once: every delivery lands; none
        finds the folder half made (it used to defer with ENOENT)."""

        def threaded(f: Any, *args: Any) -> Deferred[Any]:
            return deferToThread(f, *args)

        class SlowMaking(FileSystem):
            """Making a Maildir takes a while (a busy disk): the race is wide open."""

            def makedirs(self, path: str) -> None:
                super().makedirs(path)
                if path.endswith("tmp"):
                    time.sleep(0.05)

        for round in range(3):
            name = f"carol{round}"
            self.store.addUser(User(name, "example.com"))
            agent = self.agent(runner=threaded, fs=SlowMaking())
            messages = [self.queued(f"{name}@example.com") for _ in range(8)]
            outcomes = await gatherResults(
                [agent.deliver(m, [Address(name, "example.com")]) for m in messages]
            )
            self.assertEqual(
                [r[0].outcome.value for r in outcomes], ["success"] * 8, [r[0] for r in outcomes]
            )
            self.assertEqual(len(self.delivered(name)), 8)
        domainFolder = os.path.dirname(os.path.dirname(self.maildir("carol0")))
        leftovers = [n for n in os.listdir(domainFolder) if n.startswith(".new-")]
        self.assertEqual(leftovers, [])


class UserLockTests(SynchronousTestCase):
    def test_retireWaitsForDeliveriesInProgress(self) -> None:
        folder = os.path.join(self.mktemp(), "alice")
        os.makedirs(folder)
        events: list[str] = []
        holding = threading.Event()
        release = threading.Event()

        def deliver() -> None:
            with holdFolder(folder):
                holding.set()
                release.wait(5)
                events.append("delivered")

        worker = threading.Thread(target=deliver)
        worker.start()
        holding.wait(5)

        def retire() -> None:
            retireFolder(folder, folder + ".trash")
            events.append("retired")

        retirer = threading.Thread(target=retire)
        retirer.start()
        retirer.join(0.2)
        self.assertEqual(events, [])
        release.set()
        worker.join()
        retirer.join()
        self.assertEqual(events, ["delivered", "retired"])
        self.assertFalse(os.path.exists(folder))
        self.assertRaises(FileNotFoundError, holdFolder(folder).__enter__)

    def test_holdNoticesAFolderReplacedMeanwhile(self) -> None:
        base = self.mktemp()
        folder = os.path.join(base, "alice")
        os.makedirs(folder)
        fd = os.open(folder, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        os.rename(folder, folder + ".old")
        os.makedirs(folder)
        # A fresh folder at the same path is fine to hold...
        with holdFolder(folder):
            pass
        # ...and retiring keeps mail when asked.
        kept = retireFolder(folder, os.path.join(base, "trash"), keep=True)
        self.assertTrue(os.path.isdir(kept))


class _RecordingReactor:
    """The real reactor, noting the uid and gid each spawnProcess asks for."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.identities: list[tuple[int | None, int | None]] = []

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        self.identities.append((kwargs.get("uid"), kwargs.get("gid")))
        return self.real.spawnProcess(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class ProgramAndAutoReplyTests(_Fixture, TestCase):
    def setUp(self) -> None:
        # As root (CI) programs run as program_user nobody: alice's folder is
        # nobody's, as a vpopmail mailbox belongs to the user programs run as.
        self.setUpFixture(self.mktemp, programUser=NOBODY)
        self.home = userFolder(self.data, "alice", "example.com").path
        if os.geteuid() == 0:
            os.chown(self.home, NOBODY.uid, NOBODY.gid)

    async def deliver(
        self, recipient: str, content: bytes = MESSAGE, sender: str = "bob@remote.test"
    ) -> DeliveryResult:
        agent = self.agent(reactor=reactor)
        [result] = await agent.deliver(
            self.queued(recipient, content, sender), [Address.fromStored(recipient)]
        )
        return result

    def dotQmail(self, text: str) -> None:
        home = userFolder(self.data, "alice", "example.com").path
        self.writeFile(os.path.join(home, ".qmail"), text)

    async def test_programExitCodes(self) -> None:
        for code, outcome in (
            (0, Outcome.DELIVERED),
            (100, Outcome.PERMANENT),
            (111, Outcome.TEMPORARY),
            (5, Outcome.TEMPORARY),
        ):
            self.dotQmail(f"|echo said so; exit {code}\n")
            result = await self.deliver("alice@example.com")
            self.assertEqual(result.outcome, outcome, result.text)
            if code:
                self.assertIn("said so", result.text)

    async def test_programSeesTheQmailEnvironmentAndMessage(self) -> None:
        out = os.path.join(self.home, "out")  # written relative to the program's cwd
        self.dotQmail('|{ echo "$SENDER|$RECIPIENT|$EXT|$HOST|$LOCAL"; cat; } > out\n')
        evil = "x$(touch${IFS}pwned)@remote.test"
        result = await self.deliver("alice@example.com", sender=evil)
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        with open(out, "rb") as f:
            self.assertEqual(
                f.read(), f"{evil}|alice@example.com||example.com|alice\n".encode() + MESSAGE
            )
        self.assertFalse(
            os.path.exists(
                os.path.join(userFolder(self.data, "alice", "example.com").path, "pwned")
            )
        )

    async def test_shellMetacharactersInTheRecipientStayData(self) -> None:
        """S5: an extension full of shell syntax, sent as a (quoted) SMTP
        recipient, reaches a .qmail-default program only as the values of
        $EXT, $LOCAL, $RECIPIENT and $DEFAULT: no command in it runs."""
        home = userFolder(self.data, "alice", "example.com").path
        self.writeFile(
            os.path.join(home, ".qmail-default"),
            '|for v in "$EXT" "$LOCAL" "$RECIPIENT" "$DEFAULT"; do echo "[$v]"; done >> out\n',
        )
        extensions = [
            "$(touch pwned1)",
            "`touch pwned2`",
            "x;touch pwned3",
            "x|touch pwned4",
            "x&&touch pwned5",
            "x'$(touch pwned6)'",
            'x"$(touch pwned7)"',
            "x$(touch${IFS}pwned8)",
            "x>pwned9",
            "x<&0;touch pwned10 #",
        ]
        expected = b""
        for ext in extensions:
            smtp = '"alice-' + ext.replace("\\", "\\\\").replace('"', '\\"') + '"@example.com'
            recipient = parseMailbox(smtp)
            self.assertEqual(recipient, Address(f"alice-{ext}", "example.com"))
            agent = self.agent(reactor=reactor)
            [result] = await agent.deliver(self.queued(str(recipient)), [recipient])
            self.assertEqual(result.outcome, Outcome.DELIVERED, (ext, result.text))
            ext = ext.lower()  # local deliveries see the address lower-cased, as in qmail
            local = f"alice-{ext}"
            expected += f"[{ext}]\n[{local}]\n[{local}@example.com]\n[{ext}]\n".encode()
        with open(os.path.join(home, "out"), "rb") as f:
            self.assertEqual(f.read(), expected)
        self.assertEqual([n for n in os.listdir(home) if n.startswith("pwned")], [])

    async def test_programRunsAsProgramUserWhenRoot(self) -> None:
        spawned = _RecordingReactor(reactor)
        self.dotQmail("|id -u; id -g; exit 111\n")
        agent = self.agent(reactor=spawned)
        [result] = await agent.deliver(
            self.queued("alice@example.com"), [Address.fromStored("alice@example.com")]
        )
        self.assertEqual(result.outcome, Outcome.TEMPORARY)
        if os.geteuid() == 0:
            # CI: the captured report says nobody, never root.
            self.assertEqual(result.text, f"{NOBODY.uid}\n{NOBODY.gid}")
            self.assertEqual(spawned.identities, [(NOBODY.uid, NOBODY.gid)])
        else:
            # Only root can switch: the program runs as the server, no uid is asked for.
            self.assertEqual(result.text, f"{os.geteuid()}\n{os.getegid()}")
            self.assertEqual(spawned.identities, [(None, None)])

    async def test_rootWithoutProgramUserRunsNoProgram(self) -> None:
        self.settings = dataclasses.replace(self.settings, programUser=None)
        self.dotQmail("|echo ran\n")
        result = await self.deliver("alice@example.com")
        if os.geteuid() == 0:
            self.assertEqual((result.outcome, result.text), (Outcome.TEMPORARY, NO_PROGRAM_USER))
        else:
            self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)

    async def test_homeProgramUserCannotEnterIsTemporary(self) -> None:
        # A folder only its owner may enter, owned by the server, not by program_user.
        os.chown(self.home, os.geteuid(), os.getegid())
        os.chmod(self.home, 0o700)
        self.dotQmail("|echo ran\n")
        result = await self.deliver("alice@example.com")
        if os.geteuid() == 0:
            self.assertEqual(
                (result.outcome, result.text),
                (
                    Outcome.TEMPORARY,
                    f"Unable to switch to {self.home}: permission denied for program_user."
                    " (#4.3.0)",
                ),
            )
        else:
            # Not root: the program runs as the server, which owns the folder.
            self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)

    async def test_maildirAndMboxLinesIgnoreProgramUser(self) -> None:
        # The server itself writes these, into a folder program_user cannot enter.
        os.chown(self.home, os.geteuid(), os.getegid())
        os.chmod(self.home, 0o700)
        self.dotQmail("./Maildir/\n./mbox\n")
        result = await self.deliver("alice@example.com")
        self.assertEqual((result.outcome, result.text), (Outcome.DELIVERED, "did 2+0+0/"))
        self.assertEqual(len(self.delivered("alice")), 1)
        with open(os.path.join(self.home, "mbox"), "rb") as f:
            self.assertIn(b"Delivered-To: alice@example.com\n", f.read())

    async def test_exit99StopsTheRemainingLines(self) -> None:
        self.dotQmail("./Maildir/\n|exit 99\n./Maildir/\n&x@remote.test\n")
        result = await self.deliver("alice@example.com")
        # qmail-local reads no line after the 99: neither the Maildir nor the forward.
        self.assertEqual((result.outcome, result.text), (Outcome.DELIVERED, "did 1+0+1/"))
        self.assertEqual(len(self.delivered("alice")), 1)
        self.assertEqual(self.injected, [])

    async def test_failedProgramStopsAndForwardsNothing(self) -> None:
        self.dotQmail("&x@remote.test\n|exit 100\n")
        result = await self.deliver("alice@example.com")
        self.assertEqual(result.outcome, Outcome.PERMANENT)
        self.assertEqual(self.injected, [])

    async def test_mboxLine(self) -> None:
        self.dotQmail("./mbox\n")
        result = await self.deliver("alice@example.com", MESSAGE + b"From here on\n")
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        with open(
            os.path.join(userFolder(self.data, "alice", "example.com").path, "mbox"), "rb"
        ) as f:
            mbox = f.read()
        self.assertTrue(mbox.startswith(b"From bob@remote.test "))
        self.assertIn(b"Delivered-To: alice@example.com\n", mbox)
        self.assertIn(b"\n>From here on\n", mbox)

    async def test_vacationAnswersOncePerSender(self) -> None:
        self.store.setVacation("alice", "example.com", Vacation("Away", "Back on Monday.", 3600))
        self.assertEqual((await self.deliver("alice@example.com")).outcome, Outcome.DELIVERED)
        [(sender, rcpts, content)] = self.injectedMessages()
        self.assertEqual((sender, rcpts), ("", ["bob@remote.test"]))
        reply = email.message_from_bytes(content)
        self.assertEqual(reply["Auto-Submitted"], "auto-replied")
        self.assertEqual(reply["Subject"], "Away")
        self.assertEqual(email.utils.parseaddr(reply["From"])[1], "alice@example.com")
        await self.deliver("alice@example.com")
        self.assertEqual(len(self.injected), 1)
        self.assertEqual(len(self.delivered("alice")), 2)

    async def test_vacationNeverAnswersListsOrBounces(self) -> None:
        self.store.setVacation("alice", "example.com", Vacation("Away", "Back on Monday."))
        await self.deliver("alice@example.com", b"Precedence: bulk\n" + MESSAGE)
        await self.deliver(
            "alice@example.com", b"List-Id: <l.example>\n" + MESSAGE, sender="carol@remote.test"
        )
        await self.deliver("alice@example.com", MESSAGE, sender="")
        self.assertEqual(self.injected, [])
        self.assertEqual(len(self.delivered("alice")), 3)
