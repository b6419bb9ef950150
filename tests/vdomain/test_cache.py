"""The read-through cache in front of the user database (delivery, rcptcheck)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.vdomain.cache import CachedUserStore, fresh, pinned
from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.records import Alias, Domain, QuotaLimit, User, Vacation
from qmailtx.vdomain.sqlite import SQLiteUserStore

VERSION_QUERY = "SELECT value FROM meta WHERE key = 'generation'"


class _Fixture(SynchronousTestCase):
    """example.com with alice; ``self.other`` is a second, independent store
    on the same file, as ``qmailctl`` in another process would be."""

    def setUp(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "users.sqlite3")
        self.store = SQLiteUserStore(path)
        self.addCleanup(self.store.close)
        self.store.addDomain(Domain("example.com"))
        self.store.addUser(User("alice", "example.com"))
        self.other = SQLiteUserStore(path)
        self.addCleanup(self.other.close)
        self.cache = CachedUserStore(self.store)

    @contextmanager
    def queries(self) -> Iterator[list[str]]:
        """The statements this thread's connection of ``self.store`` runs."""
        statements: list[str] = []
        connection = self.store._connect()
        connection.set_trace_callback(statements.append)
        try:
            yield statements
        finally:
            connection.set_trace_callback(None)


class InterfaceTests(_Fixture):
    def test_providesIUserStore(self) -> None:
        self.assertTrue(verifyObject(IUserStore, self.cache))

    def test_versionAndListingsAreTheStore(self) -> None:
        self.assertEqual(self.cache.version(), self.store.version())
        self.assertEqual(self.cache.domains(), self.store.domains())
        self.assertEqual(self.cache.users("example.com"), self.store.users("example.com"))
        self.assertEqual(self.cache.aliases("example.com"), [])

    def test_answersAreTheStores(self) -> None:
        self.store.addAliasDomain("example.net", "example.com")
        self.store.addAlias(Alias("info", "example.com", ("&alice@example.com",)))
        self.store.setVacation("alice", "example.com", Vacation("away", "back soon", 3600))
        for _ in range(2):  # the store's answer, then the cached one
            self.assertEqual(self.cache.canonicalDomain("example.net"), "example.com")
            self.assertEqual(self.cache.domain("example.com"), self.store.domain("example.com"))
            self.assertEqual(
                self.cache.user("alice", "example.com"), self.store.user("alice", "example.com")
            )
            self.assertEqual(
                self.cache.alias("info", "example.com"), self.store.alias("info", "example.com")
            )
            self.assertEqual(
                self.cache.vacation("alice", "example.com"),
                self.store.vacation("alice", "example.com"),
            )

    def test_sizeMustBePositive(self) -> None:
        self.assertRaises(ValueError, CachedUserStore, self.store, 0)

    def test_helpersDoNothingForOtherStores(self) -> None:
        with pinned(self.store), fresh(self.store), pinned(None):
            self.assertIsNotNone(self.store.user("alice", "example.com"))


class OtherProcessChangeTests(_Fixture):
    """A change made through another store object is seen by the very next
    lookup, and by the next pinned block."""

    def assertSeen(
        self,
        change: Callable[[], object],
        lookup: str,
        args: tuple[str, ...],
        before: object,
        after: object,
    ) -> None:
        call = getattr(self.cache, lookup)
        with pinned(self.cache):
            self.assertEqual(call(*args), before)
            self.assertEqual(call(*args), before)
        change()
        self.assertEqual(call(*args), after)
        with pinned(self.cache):
            self.assertEqual(call(*args), after)

    def test_userAdded(self) -> None:
        self.assertSeen(
            lambda: self.other.addUser(User("bob", "example.com")),
            "user",
            ("bob", "example.com"),
            None,
            User("bob", "example.com"),
        )

    def test_userDeleted(self) -> None:
        self.assertSeen(
            lambda: self.other.deleteUser("alice", "example.com"),
            "user",
            ("alice", "example.com"),
            User("alice", "example.com"),
            None,
        )

    def test_aliasAdded(self) -> None:
        info = Alias("info", "example.com", ("&alice@example.com",))
        self.assertSeen(
            lambda: self.other.addAlias(info), "alias", ("info", "example.com"), None, info
        )

    def test_quotaChanged(self) -> None:
        self.assertSeen(
            lambda: self.other.setQuota("alice", "example.com", QuotaLimit(1000)),
            "user",
            ("alice", "example.com"),
            User("alice", "example.com"),
            User("alice", "example.com", quota=QuotaLimit(1000)),
        )

    def test_vacationSet(self) -> None:
        away = Vacation("away", "back soon", 3600)
        self.assertSeen(
            lambda: self.other.setVacation("alice", "example.com", away),
            "vacation",
            ("alice", "example.com"),
            None,
            away,
        )

    def test_aliasDomainAdded(self) -> None:
        self.assertSeen(
            lambda: self.other.addAliasDomain("example.net", "example.com"),
            "canonicalDomain",
            ("example.net",),
            None,
            "example.com",
        )

    def test_domainAliasesChanged(self) -> None:
        self.assertSeen(
            lambda: self.other.addAliasDomain("example.net", "example.com"),
            "domain",
            ("example.com",),
            Domain("example.com"),
            Domain("example.com", aliases=("example.net",)),
        )

    def test_pinnedBlockAnswersAsOfItsFirstLookup(self) -> None:
        with pinned(self.cache):
            self.assertIsNone(self.cache.user("bob", "example.com"))
            self.other.addUser(User("bob", "example.com"))
            self.assertIsNone(self.cache.user("bob", "example.com"))
            with fresh(self.cache):
                self.assertIsNotNone(self.cache.user("bob", "example.com"))
        self.assertIsNotNone(self.cache.user("bob", "example.com"))


class QueryCountTests(_Fixture):
    def test_pinnedBlockAsksTheVersionOnce(self) -> None:
        with pinned(self.cache):
            self.cache.canonicalDomain("example.com")
            self.cache.alias("alice", "example.com")
            self.cache.user("alice", "example.com")
            self.cache.vacation("alice", "example.com")
        with self.queries() as statements, pinned(self.cache):
            self.cache.canonicalDomain("example.com")
            self.cache.alias("alice", "example.com")
            self.cache.user("alice", "example.com")
            self.cache.vacation("alice", "example.com")
        self.assertEqual(statements, [VERSION_QUERY])

    def test_negativeAnswersAreCached(self) -> None:
        self.assertIsNone(self.cache.user("nobody", "example.com"))
        with self.queries() as statements:
            self.assertIsNone(self.cache.user("nobody", "example.com"))
            self.assertIsNone(self.cache.canonicalDomain("nowhere.test"))
            self.assertIsNone(self.cache.canonicalDomain("nowhere.test"))
        # version (a hit); version, canonicalDomain, version again; version (a hit)
        self.assertEqual(len(statements), 5)
        self.assertEqual(statements.count(VERSION_QUERY), 4)

    def test_negativeAnswersAreInvalidated(self) -> None:
        self.assertIsNone(self.cache.canonicalDomain("new.test"))
        self.other.addDomain(Domain("new.test"))
        self.assertEqual(self.cache.canonicalDomain("new.test"), "new.test")

    def test_changeEmptiesTheCache(self) -> None:
        self.cache.user("alice", "example.com")
        self.cache.user("nobody", "example.com")
        self.assertEqual(len(self.cache), 2)
        self.other.setFlags("alice", "example.com", 0)
        with self.queries() as statements:
            self.cache.user("nobody", "example.com")
        self.assertEqual(len(statements), 3)  # version, user, version
        self.assertEqual(len(self.cache), 1)


class WriteThroughTests(_Fixture):
    def test_writeInAPinnedBlockIsSeenAtOnce(self) -> None:
        with pinned(self.cache):
            self.assertIsNone(self.cache.user("alice", "example.com").quota)  # type: ignore[union-attr]
            self.cache.setQuota("alice", "example.com", QuotaLimit(5000))
            user = self.cache.user("alice", "example.com")
            assert user is not None
            self.assertEqual(user.quota, QuotaLimit(5000))
        self.assertEqual(self.store.user("alice", "example.com"), user)

    def test_everyWriteInvalidates(self) -> None:
        writes = [
            lambda: self.cache.addUser(User("bob", "example.com")),
            lambda: self.cache.setPassword("bob", "example.com", "x", None),
            lambda: self.cache.setFlags("bob", "example.com", 0),
            lambda: self.cache.addAlias(Alias("info", "example.com", ("&bob@example.com",))),
            lambda: self.cache.deleteAlias("info", "example.com"),
            lambda: self.cache.setVacation("bob", "example.com", Vacation("a", "b", 1)),
            lambda: self.cache.noteVacationReply("bob", "example.com", "x@y.test", 1.0, 1),
            lambda: self.cache.deleteUser("bob", "example.com"),
            lambda: self.cache.addAliasDomain("example.net", "example.com"),
            lambda: self.cache.deleteAliasDomain("example.net"),
            lambda: self.cache.setClearPasswords("example.com", True),
            lambda: self.cache.addDomain(Domain("two.test")),
            lambda: self.cache.deleteDomain("two.test"),
        ]
        for write in writes:
            self.cache.user("alice", "example.com")
            self.assertEqual(len(self.cache), 1)
            write()
            self.assertEqual(len(self.cache), 0)

    def test_failedWriteInvalidatesToo(self) -> None:
        from qmailtx.vdomain.interfaces import NoSuchUser

        self.cache.user("alice", "example.com")
        self.assertRaises(NoSuchUser, self.cache.deleteUser, "nobody", "example.com")
        self.assertEqual(len(self.cache), 0)

    def test_answerReadBeforeAWriteIsNotKept(self) -> None:
        """A lookup whose read began before a write through the cache ended
        does not store its (perhaps older) answer."""
        cache = self.cache
        original = self.store.user

        def slowUser(name: str, domain: str) -> User | None:
            found = original(name, domain)
            cache.setQuota("alice", "example.com", QuotaLimit(7))  # meanwhile
            return found

        self.store.user = slowUser  # type: ignore[method-assign]
        self.assertIsNone(cache.user("alice", "example.com").quota)  # type: ignore[union-attr]
        self.store.user = original  # type: ignore[method-assign]
        self.assertEqual(len(cache), 0)
        self.assertEqual(cache.user("alice", "example.com").quota, QuotaLimit(7))  # type: ignore[union-attr]

    def test_answerReadAcrossAnUnversionedWriteIsNotKept(self) -> None:
        """The same with a write that leaves the generation alone (vacation
        replies): the answer is not kept either."""
        cache = self.cache
        original = self.store.user

        def slowUser(name: str, domain: str) -> User | None:
            found = original(name, domain)
            cache.noteVacationReply("alice", "example.com", "x@y.test", 1.0, 1)
            return found

        self.store.user = slowUser  # type: ignore[method-assign]
        version = self.store.version()
        self.assertIsNotNone(cache.user("alice", "example.com"))
        self.store.user = original  # type: ignore[method-assign]
        self.assertEqual(self.store.version(), version)
        self.assertEqual(len(cache), 0)

    def test_blockThatSeesANewerVersionKeepsIt(self) -> None:
        """A miss that finds the database changed under it returns the newer
        answer and moves its block on: the block's later answers do not go back."""
        self.cache.user("alice", "example.com")
        original = self.store.vacation

        def changing(name: str, domain: str) -> Vacation | None:
            self.other.setQuota("alice", "example.com", QuotaLimit(9))
            return original(name, domain)

        self.store.vacation = changing  # type: ignore[method-assign]
        with pinned(self.cache):
            self.assertIsNone(self.cache.vacation("alice", "example.com"))
            self.store.vacation = original  # type: ignore[method-assign]
            user = self.cache.user("alice", "example.com")
        assert user is not None
        self.assertEqual(user.quota, QuotaLimit(9))


class BoundTests(_Fixture):
    def test_leastRecentlyUsedGoes(self) -> None:
        cache = CachedUserStore(self.store, size=3)
        for name in ("a", "b", "c"):
            cache.user(name, "example.com")
        cache.user("a", "example.com")  # a is now the most recent
        cache.user("d", "example.com")  # b goes
        self.assertEqual(len(cache), 3)
        with self.queries() as statements:
            cache.user("a", "example.com")
            cache.user("c", "example.com")
            cache.user("d", "example.com")
        self.assertEqual(statements, [VERSION_QUERY] * 3)
        with self.queries() as statements:
            cache.user("b", "example.com")
        self.assertEqual(len(statements), 3)
        self.assertEqual(len(cache), 3)

    def test_manyLookupsStayBounded(self) -> None:
        cache = CachedUserStore(self.store, size=50)
        with pinned(cache):
            for i in range(500):
                cache.user(f"u{i}", "example.com")
        self.assertEqual(len(cache), 50)


class ThreadTests(_Fixture):
    def _quota(self) -> int:
        user = self.cache.user("alice", "example.com")
        assert user is not None
        return (user.quota.bytes or 0) if user.quota is not None else 0

    def test_threadsNeverSeeAnOlderAnswer(self) -> None:
        """Readers in several threads while another store raises a quota step
        by step: each reader's answers never go back (a pinned block answers
        as of its start or later, as the store itself would), and once the
        writer is done every reader sees its last value."""
        steps = 60
        errors: list[str] = []
        done = threading.Event()

        def reader() -> None:
            try:
                last = -1
                while True:
                    finished = done.is_set()
                    with pinned(self.cache):
                        values = [self._quota(), self._quota()]
                    for value in values:
                        if value < last:
                            errors.append(f"went back from {last} to {value}")
                        last = value
                    if finished:
                        if last != steps:
                            errors.append(f"ended at {last}, not {steps}")
                        return
            except Exception as e:  # pragma: no cover - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for step in range(1, steps + 1):
            self.other.setQuota("alice", "example.com", QuotaLimit(step))
        done.set()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
