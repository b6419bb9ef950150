"""The recipient check (P13): asks the delivery resolver in a worker."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.address import Address, parseMailbox
from qmailtx.control import buildControl
from qmailtx.delivery.maildir import makeMaildir
from qmailtx.domains import DomainTable
from qmailtx.fs import FileSystem
from qmailtx.policy.interfaces import IRecipientCheck
from qmailtx.policy.rcptcheck import (
    NOTE,
    NoRecipientCheck,
    RecipientCheck,
    RecipientSettings,
    Status,
    lookupRecipient,
)
from qmailtx.policy.relay import RelayControl
from qmailtx.policy.verdict import CONTINUE, Verdict, VerdictKind
from qmailtx.queue.store import synchronousRunner
from qmailtx.registry import PolicyContext, RegistryError, makeRegistry
from qmailtx.smtp.session import SMTPSession
from qmailtx.testing import SMTPServerHarness, makeTestConfig
from qmailtx.vdomain.cache import CachedUserStore
from qmailtx.vdomain.hosted import HostedDomains
from qmailtx.vdomain.interfaces import DatabaseUnavailable
from qmailtx.vdomain.layout import domainFolder, userFolder
from qmailtx.vdomain.records import (
    Alias,
    CatchAll,
    CatchAllAction,
    Domain,
    QuotaLimit,
    User,
    UserFlags,
)
from qmailtx.vdomain.sqlite import SQLiteUserStore

NO_MAILBOX = "550 5.1.1 sorry, no mailbox here by that name"


class _Fixture(SynchronousTestCase):
    """example.com (alias example.net, catch-all bounce): alice, bob (1000-byte
    quota), carol (locked); valias info; .qmail-sales and .qmail-news-default
    in the domain folder. deleted.test: catch-all delete."""

    def setUp(self) -> None:
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        self.store = SQLiteUserStore(os.path.join(self.data, "users.sqlite3"))
        self.addCleanup(self.store.close)
        # What the code under test reads, as the server has it; tests change self.store.
        self.users = CachedUserStore(self.store)
        self.store.addDomain(Domain("example.com", aliases=("example.net",)))
        self.store.addDomain(Domain("deleted.test", CatchAll(CatchAllAction.DELETE)))
        for user in (
            User("alice", "example.com"),
            User("bob", "example.com", quota=QuotaLimit(1000)),
            User("carol", "example.com", flags=UserFlags.BOUNCE_MAIL),
        ):
            self.store.addUser(user)
            makeMaildir(FileSystem(), self.maildir(user.name))
        self.store.addAlias(Alias("info", "example.com", ("&alice@example.com",)))
        folder = domainFolder(self.data, "example.com").path
        for name in (".qmail-sales", ".qmail-news-default"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("&alice@example.com\n")
        control = buildControl({"me": "mx.test", "locals": ["localhost"]}, {}, "test")
        self.domains = DomainTable.fromControl(control)
        self.settings = RecipientSettings(self.data, self.domains, "-+")

    def maildir(self, user: str) -> str:
        return os.path.join(userFolder(self.data, user, "example.com").path, "Maildir")

    def fill(self, user: str, size: int, n: int = 1) -> None:
        """A message of ``size`` bytes in the user's new/ (maildirsize not updated)."""
        path = os.path.join(self.maildir(user), "new", f"1.M1P1Q{n}.mx.test,S={size}")
        with open(path, "wb") as f:
            f.write(b"x" * size)

    def check(self, **settings: Any) -> RecipientCheck:
        options = dict(data=self.data, domains=self.domains, delimiters="-+")
        options.update(settings)
        return RecipientCheck(self.users, synchronousRunner, RecipientSettings(**options))

    def verdict(
        self, check: RecipientCheck, rcpt: str, session: SMTPSession | None = None
    ) -> Verdict:
        result = check.checkRecipient(session or SMTPSession("192.0.2.5", 4000), parseMailbox(rcpt))
        if isinstance(result, Deferred):
            return self.successResultOf(result)
        return result

    def reply(self, check: RecipientCheck, rcpt: str) -> str:
        verdict = self.verdict(check, rcpt)
        if verdict.reply is None:
            return verdict.kind.value
        return verdict.reply.toBytes().decode().rstrip("\r\n")


class LookupTests(_Fixture):
    def status(self, rcpt: str) -> Status:
        return lookupRecipient(self.users, self.settings, parseMailbox(rcpt))[0]

    def test_everyKindOfAddressExists(self) -> None:
        for rcpt in (
            "alice@example.com",
            "ALICE@Example.COM",
            "alice@example.net",
            "alice-ext@example.com",
            "alice+ext@example.com",
            "info@example.com",
            "sales@example.com",
            "news-subscribe@example.com",
            "anyone@deleted.test",
        ):
            self.assertIs(self.status(rcpt), Status.EXISTS, rcpt)

    def test_unknownUser(self) -> None:
        self.assertIs(self.status("nobody@example.com"), Status.UNKNOWN)
        self.assertIs(self.status("nobody@example.net"), Status.UNKNOWN)

    def test_domainsNotHostedAreNotOurs(self) -> None:
        self.assertIs(self.status("x@remote.test"), Status.NOT_OURS)
        self.assertIs(self.status("nobody@localhost"), Status.NOT_OURS)

    def test_lockedUser(self) -> None:
        self.assertIs(self.status("carol@example.com"), Status.LOCKED)

    def test_fullMailboxAtTheLimit(self) -> None:
        self.fill("bob", 999)
        self.assertIs(self.status("bob@example.com"), Status.EXISTS)
        self.fill("bob", 1, n=2)
        os.unlink(os.path.join(self.maildir("bob"), "maildirsize"))  # recounted: 1000 bytes
        self.assertIs(self.status("bob@example.com"), Status.FULL)

    def test_secondLookupAsksOnlyTheVersion(self) -> None:
        for rcpt in ("alice@example.com", "alice+ext@example.net", "nobody@example.com"):
            self.status(rcpt)
            statements: list[str] = []
            connection = self.store._connect()  # the runner is synchronous: this thread
            connection.set_trace_callback(statements.append)
            try:
                self.status(rcpt)
            finally:
                connection.set_trace_callback(None)
            self.assertEqual(statements, ["SELECT value FROM meta WHERE key = 'generation'"], rcpt)

    def test_changesByAnotherStoreAreSeenAtOnce(self) -> None:
        other = SQLiteUserStore(self.store.path)
        self.addCleanup(other.close)
        self.assertIs(self.status("dave@example.com"), Status.UNKNOWN)
        other.addUser(User("dave", "example.com"))
        self.assertIs(self.status("dave@example.com"), Status.EXISTS)
        other.setFlags("dave", "example.com", UserFlags.BOUNCE_MAIL)
        self.assertIs(self.status("dave@example.com"), Status.LOCKED)
        other.deleteUser("dave", "example.com")
        self.assertIs(self.status("dave@example.com"), Status.UNKNOWN)
        self.assertIs(self.status("alice@example.org"), Status.NOT_OURS)
        other.addAliasDomain("example.org", "example.com")
        self.assertIs(self.status("alice@example.org"), Status.EXISTS)

    def test_mailboxWithoutMaildirIsNotRefused(self) -> None:
        self.store.addUser(User("dave", "example.com", quota=QuotaLimit(10)))
        dave = Address("dave", "example.com")
        self.assertEqual(lookupRecipient(self.users, self.settings, dave), (Status.EXISTS, ""))

    def test_unreadableQuotaIsLeftToDelivery(self) -> None:
        self.store.addUser(User("dave", "example.com", quota=QuotaLimit(10)))
        os.makedirs(self.maildir("dave"))
        open(os.path.join(self.maildir("dave"), "tmp"), "w").close()  # not a folder
        status, note = lookupRecipient(self.users, self.settings, Address("dave", "example.com"))
        self.assertIs(status, Status.EXISTS)
        self.assertEqual(note, "quota not checked: Not a directory")

    def test_quotaNoteIsLogged(self) -> None:
        self.test_unreadableQuotaIsLeftToDelivery()
        with capturedLogs() as events:
            self.assertIs(self.verdict(self.check(), "dave@example.com"), CONTINUE)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["note"], "quota not checked: Not a directory")


class RecipientCheckTests(_Fixture):
    def test_providesIRecipientCheck(self) -> None:
        self.assertTrue(verifyObject(IRecipientCheck, self.check()))
        self.assertTrue(verifyObject(IRecipientCheck, NoRecipientCheck()))

    def test_verdicts(self) -> None:
        check = self.check()
        self.assertEqual(self.reply(check, "alice@example.com"), "continue")
        self.assertEqual(self.reply(check, "x@remote.test"), "continue")
        self.assertEqual(self.reply(check, "Nobody@EXAMPLE.com"), NO_MAILBOX)
        self.assertEqual(
            self.reply(check, "carol@example.com"),
            "550 5.2.1 sorry, this account is locked and does not receive mail",
        )

    def test_fullMailboxBouncesOrDefers(self) -> None:
        self.fill("bob", 1000)
        self.assertEqual(
            self.reply(self.check(), "bob@example.com"),
            "552 5.2.2 sorry, recipient mailbox is full",
        )
        self.assertEqual(
            self.reply(self.check(overQuota="defer"), "bob@example.com"),
            "452 4.2.2 sorry, recipient mailbox is full, try again later",
        )

    def test_catchAllDomainsHaveEveryAddress(self) -> None:
        check = self.check()
        self.assertIs(self.verdict(check, "whoever@deleted.test"), CONTINUE)
        self.store.setCatchAll("example.com", CatchAll(CatchAllAction.FORWARD, "x@remote.test"))
        self.assertIs(self.verdict(check, "nobody@example.com"), CONTINUE)
        self.store.setCatchAll("example.com", CatchAll(CatchAllAction.MAILBOX, "alice"))
        self.assertIs(self.verdict(check, "nobody@example.com"), CONTINUE)

    def test_domainsNotHostedNeedNoWorker(self) -> None:
        calls: list[object] = []

        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            calls.append(f)
            return synchronousRunner(f, *args)

        hosted = HostedDomains(self.store, runner, Clock())
        hosted.startService()
        self.addCleanup(hosted.stopService)
        calls.clear()
        check = RecipientCheck(self.users, runner, self.settings, hosted)
        session = SMTPSession("192.0.2.5", 4000)
        self.assertIs(check.checkRecipient(session, Address("x", "elsewhere.example")), CONTINUE)
        self.assertEqual(calls, [])
        result = check.checkRecipient(session, Address("nobody", "example.com"))
        assert isinstance(result, Deferred)
        self.assertIs(self.successResultOf(result).kind, VerdictKind.REPLY)
        self.assertEqual(calls, [lookupRecipient])

    def test_lookupRunsInTheWorker(self) -> None:
        pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append((f, args, d))
            return d

        check = RecipientCheck(self.users, runner, self.settings)
        result = check.checkRecipient(SMTPSession("192.0.2.5", 4000), Address("x", "example.com"))
        assert isinstance(result, Deferred)
        self.assertNoResult(result)
        [(f, args, d)] = pending
        self.assertIs(f, lookupRecipient)
        d.callback(f(*args))
        verdict = self.successResultOf(result)
        self.assertIs(verdict.kind, VerdictKind.REPLY)

    def test_databaseUnavailableIsATemporaryFailure(self) -> None:
        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return Deferred.fromCoroutine(_raise(DatabaseUnavailable("db down")))

        check = RecipientCheck(self.users, runner, self.settings)
        with capturedLogs() as events:
            verdict = self.verdict(check, "alice@example.com")
        assert verdict.reply is not None
        self.assertEqual(
            verdict.reply.toBytes(),
            b"451 4.3.0 system temporarily unavailable, try again later\r\n",
        )
        [event] = events
        self.assertEqual((event["policy"], event["code"]), ("rcptcheck", 451))

    def test_crashIsLoggedAndTemporary(self) -> None:
        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return Deferred.fromCoroutine(_raise(ZeroDivisionError()))

        check = RecipientCheck(self.users, runner, self.settings)
        verdict = self.verdict(check, "alice@example.com")
        assert verdict.reply is not None
        self.assertEqual(verdict.reply.code, 451)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unknownRecipientIsLogged(self) -> None:
        session = SMTPSession("192.0.2.5", 4000, sessionId="s9")
        session.sender = Address("a", "sender.test")
        with capturedLogs() as events:
            self.verdict(self.check(), "nobody@example.com", session)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            (event["policy"], event["rcpt"], event["sender"], event["peer"], event["code"]),
            ("rcptcheck", "nobody@example.com", "a@sender.test", "192.0.2.5", 550),
        )

    def test_tooManyUnknownRecipientsRefusesEverything(self) -> None:
        check = self.check(maxBad=2)
        session = SMTPSession("192.0.2.5", 4000)
        codes = []
        for rcpt in ("x@example.com", "alice@example.com", "y@example.com", "alice@example.com"):
            verdict = self.verdict(check, rcpt, session)
            codes.append(verdict.reply.enhanced if verdict.reply else "ok")
        self.assertEqual(codes, ["5.1.1", "ok", "5.1.1", "5.5.3"])
        self.assertEqual(session.notes[NOTE], 2)
        session.resetTransaction()
        self.assertEqual(self.reply(check, "alice@example.com"), "continue")  # another session
        self.assertEqual(
            self.verdict(check, "alice@example.com", session).reply,
            self.verdict(check, "x@remote.test", session).reply,
        )

    def test_noLimit(self) -> None:
        check = self.check(maxBad=0)
        session = SMTPSession("192.0.2.5", 4000)
        for _ in range(20):
            self.verdict(check, "x@example.com", session)
        self.assertIs(self.verdict(check, "alice@example.com", session), CONTINUE)


async def _raise(e: Exception) -> None:
    raise e


class RegisterTests(_Fixture):
    def test_withoutUserDatabaseEveryoneContinues(self) -> None:
        registry = makeRegistry(makeTestConfig(self.mktemp()), names=["rcptcheck"])
        check = registry.getUtility(IRecipientCheck, name="rcptcheck")
        self.assertIs(
            check.checkRecipient(SMTPSession("192.0.2.5", 1), Address("x", "y")), CONTINUE
        )

    def test_settingsFromConfig(self) -> None:
        config = makeTestConfig(
            self.mktemp(),
            '[delivery]\nover_quota = "defer"\nrecipient_delimiter = "+"\n'
            '[control]\nlocals = ["here.test"]\n',
        )
        context = PolicyContext(
            config, runner=synchronousRunner, users=self.users, extra={"max_bad_recipients": 3}
        )
        check = makeRegistry(config, context, ["rcptcheck"]).getUtility(
            IRecipientCheck, name="rcptcheck"
        )
        assert isinstance(check, RecipientCheck)
        s = check.settings
        self.assertEqual(
            (s.data, s.delimiters, s.overQuota, s.maxBad),
            (config.paths.data, "+", "defer", 3),
        )
        self.assertTrue(s.domains.isLocal("here.test"))

    def test_userDatabaseWithoutWorkersIsRefused(self) -> None:
        config = makeTestConfig(self.mktemp())
        with self.assertRaises(RegistryError):
            makeRegistry(config, PolicyContext(config, users=self.store), ["rcptcheck"])


class RecipientCheckProtocolTests(_Fixture):
    def test_addressDisguisesDoNotSlipPast(self) -> None:
        """threats.md S16: every spelling of an unknown hosted recipient is
        refused, none is queued; a known one in disguise lands on its owner."""
        table = DomainTable(frozenset({"example.com"}), frozenset(), {})
        h = SMTPServerHarness(self.mktemp(), recipientChecks=[RelayControl(table), self.check()])
        disguises = [
            b"nobody@example.com.",
            b"NOBODY@Example.COM",
            b'"nobody"@example.com',
            b"nobody%x@example.com",
            b"x!nobody@example.com",
            b"@a.test:nobody@example.com",
            b'"alice@example.com"@example.com',
        ]
        h.clear()
        h.send(b"HELO c\r\nMAIL FROM:<a@sender.test>\r\n")
        for rcpt in disguises:
            h.send(b"RCPT TO:<" + rcpt + b">\r\n")
        h.send(b"RCPT TO:<@relay.test:Alice@EXAMPLE.com.>\r\nDATA\r\nhi\r\n.\r\n")
        codes = h.codes()
        self.assertEqual(codes[2 : 2 + len(disguises)], [550] * len(disguises), h.replies())
        self.assertEqual(codes[-3:], [250, 354, 250])
        [message] = h.committed
        self.assertEqual(
            [(r.local.lower(), r.domain.lower()) for r in message.recipients],
            [("alice", "example.com")],
        )

    def test_unknownRefusedKnownQueued(self) -> None:
        table = DomainTable(frozenset({"example.com"}), frozenset(), {})
        h = SMTPServerHarness(self.mktemp(), recipientChecks=[RelayControl(table), self.check()])
        h.clear()
        h.send(
            b"HELO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<nobody@example.com>\r\n"
            b"RCPT TO:<Alice@example.com>\r\nDATA\r\nhi\r\n.\r\n"
        )
        self.assertEqual(h.codes(), [250, 250, 550, 250, 354, 250])
        self.assertEqual(h.replies()[2], NO_MAILBOX)
        [message] = h.committed
        self.assertEqual(message.recipients, [Address("Alice", "example.com")])
