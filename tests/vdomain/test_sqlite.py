"""The embedded SQLite user database, and the hosted-domain cache over it."""

from __future__ import annotations

import os
import sqlite3
import threading

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.queue.store import synchronousRunner
from qmailtx.vdomain.hosted import HostedDomains
from qmailtx.vdomain.interfaces import (
    AlreadyExists,
    DatabaseUnavailable,
    IUserStore,
    NoSuchAlias,
    NoSuchDomain,
    NoSuchUser,
)
from qmailtx.vdomain.records import (
    Alias,
    CatchAll,
    CatchAllAction,
    Domain,
    QuotaError,
    QuotaLimit,
    User,
    UserFlags,
    Vacation,
    parseQuota,
)
from qmailtx.vdomain.sqlite import SQLiteUserStore


class QuotaParsingTests(SynchronousTestCase):
    def test_forms(self) -> None:
        cases = {
            "NOQUOTA": None,
            "": None,
            "0": None,
            "10000000S": QuotaLimit(10000000, None),
            "10000000S,1000C": QuotaLimit(10000000, 1000),
            "1000c": QuotaLimit(None, 1000),
            "1000000": QuotaLimit(1000000, None),
            "1MB": QuotaLimit(1 << 20, None),
            "1000KB": QuotaLimit(1000 * 1024, None),
            "2 GB": QuotaLimit(2 << 30, None),
        }
        for text, expected in cases.items():
            self.assertEqual(parseQuota(text), expected, text)

    def test_maildirsizeDefinition(self) -> None:
        self.assertEqual(str(QuotaLimit(100, 5)), "100S,5C")
        self.assertEqual(str(QuotaLimit(None, 5)), "5C")

    def test_garbageRefused(self) -> None:
        for text in ("lots", "10X", "-5", "1.5MB", "10S,"):
            self.assertRaises(QuotaError, parseQuota, text)


class SQLiteUserStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "users.sqlite3")
        self.store = SQLiteUserStore(self.path)
        self.addCleanup(self.store.close)
        self.store.addDomain(Domain("Example.COM", aliases=("example.net",)))

    def test_providesInterface(self) -> None:
        self.assertTrue(verifyObject(IUserStore, self.store))

    def test_domainsAndAliasDomains(self) -> None:
        self.assertEqual(self.store.canonicalDomain("EXAMPLE.net"), "example.com")
        self.assertEqual(self.store.canonicalDomain("example.com"), "example.com")
        self.assertIsNone(self.store.canonicalDomain("example.org"))
        self.assertIsNone(self.store.domain("example.net"))
        self.store.addAliasDomain("example.org", "example.com")
        [domain] = self.store.domains()
        self.assertEqual(domain.aliases, ("example.net", "example.org"))
        self.store.deleteAliasDomain("example.net")
        self.assertIsNone(self.store.canonicalDomain("example.net"))
        self.assertRaises(NoSuchDomain, self.store.deleteAliasDomain, "example.net")

    def test_domainNamesAreUnique(self) -> None:
        self.assertRaises(AlreadyExists, self.store.addDomain, Domain("example.com"))
        self.assertRaises(AlreadyExists, self.store.addDomain, Domain("example.net"))
        self.assertRaises(AlreadyExists, self.store.addAliasDomain, "example.com", "example.com")
        self.assertRaises(NoSuchDomain, self.store.addAliasDomain, "x.test", "nowhere.test")

    def test_catchAllAndClearPasswords(self) -> None:
        self.assertEqual(self.store.domain("example.com").catchall.action, CatchAllAction.BOUNCE)  # type: ignore[union-attr]
        self.store.setCatchAll("example.com", CatchAll(CatchAllAction.FORWARD, "a@b.test"))
        self.store.setClearPasswords("example.com", True)
        domain = self.store.domain("example.com")
        assert domain is not None
        self.assertEqual(domain.catchall, CatchAll(CatchAllAction.FORWARD, "a@b.test"))
        self.assertTrue(domain.clearPasswords)
        self.assertRaises(NoSuchDomain, self.store.setCatchAll, "x.test", CatchAll())

    def test_users(self) -> None:
        user = User(
            "Alice", "example.com", "$scrypt$x", None, QuotaLimit(1000, 10), UserFlags.NO_POP, "A"
        )
        self.store.addUser(user)
        found = self.store.user("ALICE", "Example.com")
        self.assertEqual(
            found,
            User(
                "alice",
                "example.com",
                "$scrypt$x",
                None,
                QuotaLimit(1000, 10),
                UserFlags.NO_POP,
                "A",
            ),
        )
        self.assertRaises(AlreadyExists, self.store.addUser, User("alice", "example.com"))
        self.assertRaises(NoSuchDomain, self.store.addUser, User("bob", "nowhere.test"))
        self.store.setPassword("alice", "example.com", "new", "clear")
        self.store.setQuota("alice", "example.com", None)
        self.store.setFlags("alice", "example.com", 0)
        found = self.store.user("alice", "example.com")
        assert found is not None
        self.assertEqual(
            (found.passwordHash, found.clearSecret, found.quota, found.flags),
            ("new", "clear", None, UserFlags(0)),
        )
        self.assertEqual([u.name for u in self.store.users("example.com")], ["alice"])
        self.store.deleteUser("alice", "example.com")
        self.assertIsNone(self.store.user("alice", "example.com"))
        self.assertRaises(NoSuchUser, self.store.deleteUser, "alice", "example.com")
        self.assertRaises(NoSuchUser, self.store.setQuota, "alice", "example.com", None)

    def test_aliases(self) -> None:
        self.store.addAlias(Alias("sales", "example.com", ("&a@x.test", "&b@x.test")))
        self.store.addAlias(Alias("sales", "example.com", ("&b@x.test", "|/bin/true")))
        self.assertEqual(
            self.store.alias("sales", "example.com"),
            Alias("sales", "example.com", ("&a@x.test", "&b@x.test", "|/bin/true")),
        )
        self.store.deleteAlias("sales", "example.com", "&a@x.test")
        [alias] = self.store.aliases("example.com")
        self.assertEqual(alias.targets, ("&b@x.test", "|/bin/true"))
        self.store.deleteAlias("sales", "example.com")
        self.assertIsNone(self.store.alias("sales", "example.com"))
        self.assertRaises(NoSuchAlias, self.store.deleteAlias, "sales", "example.com")

    def test_aliasAndUserNamesDoNotCollide(self) -> None:
        self.store.addUser(User("alice", "example.com"))
        self.store.addAlias(Alias("info", "example.com", ("&a@x.test",)))
        self.assertRaises(
            AlreadyExists, self.store.addAlias, Alias("alice", "example.com", ("&x@y",))
        )
        self.assertRaises(AlreadyExists, self.store.addUser, User("info", "example.com"))

    def test_deletingADomainDeletesEverythingInIt(self) -> None:
        self.store.addUser(User("alice", "example.com"))
        self.store.addAlias(Alias("info", "example.com", ("&a@x.test",)))
        self.store.setVacation("alice", "example.com", Vacation("away", "back soon"))
        self.store.deleteDomain("example.com")
        self.store.addDomain(Domain("example.com"))
        self.assertEqual(self.store.users("example.com"), [])
        self.assertEqual(self.store.aliases("example.com"), [])
        self.assertIsNone(self.store.canonicalDomain("example.net"))
        self.assertIsNone(self.store.vacation("alice", "example.com"))

    def test_vacationMemory(self) -> None:
        self.store.addUser(User("alice", "example.com"))
        self.assertRaises(NoSuchUser, self.store.setVacation, "bob", "example.com", None)
        self.store.setVacation("alice", "example.com", Vacation("away", "back soon", 100))
        self.assertEqual(
            self.store.vacation("alice", "example.com"), Vacation("away", "back soon", 100)
        )
        note = self.store.noteVacationReply
        self.assertTrue(note("alice", "example.com", "Bob@x.test", 1000.0, 100))
        self.assertFalse(note("alice", "example.com", "bob@x.test", 1099.0, 100))
        self.assertTrue(note("alice", "example.com", "carol@x.test", 1099.0, 100))
        self.assertTrue(note("alice", "example.com", "bob@x.test", 1100.0, 100))
        # A new vacation message starts with a clean memory.
        self.store.setVacation("alice", "example.com", Vacation("away again", "..."))
        self.assertTrue(note("alice", "example.com", "bob@x.test", 1101.0, 100))
        self.store.setVacation("alice", "example.com", None)
        self.assertIsNone(self.store.vacation("alice", "example.com"))

    def test_versionChangesWithEveryChangeFromAnyConnection(self) -> None:
        before = self.store.version()
        other = SQLiteUserStore(self.path)
        self.addCleanup(other.close)
        other.addUser(User("alice", "example.com"))
        self.assertGreater(self.store.version(), before)
        now = self.store.version()
        self.store.addUser(User("alice", "example.com", "x")) if False else None
        self.assertEqual(self.store.version(), now)

    def test_usableFromManyThreads(self) -> None:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(20):
                    self.store.addUser(User(f"u{n}-{i}", "example.com"))
                    self.store.user(f"u{n}-{i}", "example.com")
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(self.store.users("example.com")), 80)

    def test_unusableFileIsUnavailableNotMissing(self) -> None:
        broken = os.path.join(self.mktemp(), "users.sqlite3")
        os.makedirs(os.path.dirname(broken))
        with open(broken, "wb") as f:
            f.write(b"this is not a database" * 100)
        store = SQLiteUserStore(broken)
        self.addCleanup(store.close)
        self.assertRaises(DatabaseUnavailable, store.user, "alice", "example.com")

    def test_schemaVersionRecorded(self) -> None:
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        self.assertEqual(version, 1)
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        self.assertEqual(mode, "wal")


class HostedDomainsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SQLiteUserStore(os.path.join(self.mktemp(), "users.sqlite3"))
        self.addCleanup(self.store.close)
        self.store.addDomain(Domain("example.com", aliases=("example.net",)))
        self.clock = Clock()
        self.hosted = HostedDomains(self.store, synchronousRunner, self.clock, interval=1.0)
        self.hosted.startService()
        self.addCleanup(self.hosted.stopService)

    def test_loadsDomainsAndAliasesAtStart(self) -> None:
        self.assertTrue(self.hosted.contains("EXAMPLE.com"))
        self.assertTrue(self.hosted.contains("example.net"))
        self.assertFalse(self.hosted.contains("example.org"))

    def test_newDomainFoundAtOnceByLookup(self) -> None:
        self.store.addDomain(Domain("example.org"))
        self.assertFalse(self.hosted.contains("example.org"))
        found = self.hosted.lookup("example.org")
        assert isinstance(found, Deferred)
        self.assertTrue(self.successResultOf(found))
        self.assertTrue(self.hosted.contains("example.org"))
        missing = self.hosted.lookup("nowhere.test")
        assert isinstance(missing, Deferred)
        self.assertFalse(self.successResultOf(missing))

    def test_deletedDomainForgottenAfterInterval(self) -> None:
        self.store.deleteDomain("example.com")
        self.assertTrue(self.hosted.contains("example.com"))
        self.clock.advance(1.0)
        self.assertFalse(self.hosted.contains("example.com"))
        self.assertFalse(self.hosted.contains("example.net"))

    def test_knownDomainAnsweredWithoutDatabase(self) -> None:
        self.assertIs(self.hosted.lookup("example.com"), True)
