"""Logins through cred: the checkers over the user database, and the realm."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qmailtx.queue.store import synchronousRunner
from qmailtx.vdomain import checkers
from qmailtx.vdomain.checkers import (
    REFUSED,
    HashedSecretChecker,
    UserPasswordChecker,
    makePortal,
    parseLogin,
)
from qmailtx.vdomain.interfaces import DatabaseUnavailable
from qmailtx.vdomain.passwords import PasswordHasher
from qmailtx.vdomain.realm import IMailAccount, MailAccount, MailRealm
from qmailtx.vdomain.records import Domain, User, UserFlags
from qmailtx.vdomain.sqlite import SQLiteUserStore
from qmailtx.workers import WorkerPool

ALICE_PASSWORD = "alice-Pa55word"
ALICE_CLEAR = "alice-Cl3ar"
# openssl passwd -1 -salt abcdefgh password
DAVE_MD5_CRYPT = "$1$abcdefgh$G//4keteveJp0qb8z2DxG/"
# Imported hashes of passwords that no log line could contain by chance:
# openssl passwd -1 -salt qmailtx Dave-S3cret; openssl passwd -6 -salt qmailtx Frank-S3cret
DAVE_PASSWORD = "Dave-S3cret"
DAVE_IMPORTED = "$1$qmailtx$hB68XLuhqcvljCjNTZm/40"
FRANK_PASSWORD = "Frank-S3cret"
FRANK_IMPORTED = (
    "$6$qmailtx$MJcDwL6MPFbzJkqVXMn.I0t9yMdOiZeN4JEQvLceoUYkl40Fbx9aaLhO2pVEMNQAWiOGf9INxG/"
    "owsfhXntfR0"
)
APOP_BANNER = b"<1896.697170952@dbc.mtview.ca.us>"


class RecordingHasher(PasswordHasher):
    """A cheap hasher noting each verification: the hash it used, and its thread."""

    def __init__(self) -> None:
        super().__init__(log2N=4)
        self.calls: list[tuple[str, int]] = []

    def verifyPassword(self, secret: str | bytes, hashed: str) -> bool:
        self.calls.append((hashed, threading.get_ident()))
        return super().verifyPassword(secret, hashed)

    def hashesVerified(self) -> list[str]:
        """Per verification: "scrypt", "md5_crypt", or "dummy" for an unknown user's."""
        dummy = self._dummyHash
        return [
            "dummy" if hashed == dummy else "md5_crypt" if hashed.startswith("$1$") else "scrypt"
            for hashed, _ in self.calls
        ]


class RecordingRunner:
    """synchronousRunner, noting each job."""

    def __init__(self) -> None:
        self.jobs: list[Callable[..., Any]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.jobs.append(f)
        return synchronousRunner(f, *args)


def makeStore(
    testCase: SynchronousTestCase,
    hasher: PasswordHasher,
    storeClass: type[SQLiteUserStore] = SQLiteUserStore,
) -> SQLiteUserStore:
    """example.com (clear passwords; alias mail.example.net) and plain.example:

    alice   password and clear secret
    bob     NO_POP and NO_IMAP
    carol   no password hash at all (but a clear secret)
    dave    a legacy md5_crypt hash of "password"
    erin    in plain.example: password only, no clear secret
    """
    store = storeClass(testCase.mktemp() + "/users.sqlite3")
    testCase.addCleanup(store.close)
    store.addDomain(Domain("example.com", clearPasswords=True, aliases=("mail.example.net",)))
    store.addDomain(Domain("plain.example"))
    store.addUser(
        User("alice", "example.com", hasher.hashPassword(ALICE_PASSWORD), clearSecret=ALICE_CLEAR)
    )
    store.addUser(
        User(
            "bob",
            "example.com",
            hasher.hashPassword("bob-password"),
            clearSecret="bob-clear",
            flags=UserFlags.NO_POP | UserFlags.NO_IMAP,
        )
    )
    store.addUser(User("carol", "example.com", "", clearSecret="carol-clear"))
    store.addUser(User("dave", "example.com", DAVE_MD5_CRYPT))
    store.addUser(User("erin", "plain.example", hasher.hashPassword("erin-password")))
    return store


class RecordingStore(SQLiteUserStore):
    """SQLite, noting each setPassword: (address, hash, clear secret, thread)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.passwordsSet: list[tuple[str, str, str | None, int]] = []

    def setPassword(
        self, name: str, domain: str, passwordHash: str, clearSecret: str | None
    ) -> None:
        self.passwordsSet.append(
            (f"{name}@{domain}", passwordHash, clearSecret, threading.get_ident())
        )
        super().setPassword(name, domain, passwordHash, clearSecret)


class UnavailableOnSetPasswordStore(SQLiteUserStore):
    """Reads work; setPassword fails, quoting what it was given."""

    error: type[Exception] = DatabaseUnavailable

    def setPassword(
        self, name: str, domain: str, passwordHash: str, clearSecret: str | None
    ) -> None:
        raise self.error(f"cannot store {passwordHash!r} for {name}@{domain}")


class CrashingOnSetPasswordStore(UnavailableOnSetPasswordStore):
    error = RuntimeError


class RacingStore(SQLiteUserStore):
    """An administrator changes dave's password just after the login's lookup."""

    adminHash = ""

    def user(self, name: str, domain: str) -> User | None:
        found = super().user(name, domain)
        if name == "dave" and not self.adminHash:
            self.adminHash = PasswordHasher.cheap().hashPassword("admin-set")
            super().setPassword(name, domain, self.adminHash, None)
        return found


def unavailableStore(testCase: SynchronousTestCase) -> SQLiteUserStore:
    """A store whose database cannot be opened: a file stands where its folder should."""
    blocker = testCase.mktemp()
    with open(blocker, "w"):
        pass
    store = SQLiteUserStore(os.path.join(blocker, "users.sqlite3"))
    testCase.addCleanup(store.close)
    return store


def cramMD5(username: bytes, secret: bytes, host: bytes = b"mx.example.com") -> CramMD5Credentials:
    """Credentials as twisted's ESMTP and IMAP4 servers fill them: getChallenge, setResponse."""
    credentials = CramMD5Credentials(host)
    challenge = credentials.getChallenge()
    digest = hmac.new(secret, challenge, hashlib.md5).hexdigest().encode("ascii")
    credentials.setResponse(username + b" " + digest)
    return credentials


def apop(username: bytes, secret: bytes) -> Any:
    """Credentials as twisted's POP3.do_APOP makes them (digest as bytes)."""
    from twisted.mail.pop3 import APOPCredentials

    digest = hashlib.md5(APOP_BANNER + secret).hexdigest().encode("ascii")  # noqa: S324
    return APOPCredentials(APOP_BANNER, username, digest)


class ParseLoginTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parseLogin(b"alice@example.com"), ("alice", "example.com"))
        self.assertEqual(parseLogin(b"alice%example.com"), ("alice", "example.com"))
        self.assertEqual(parseLogin(b"Alice@Example.COM"), ("alice", "example.com"))
        self.assertEqual(parseLogin("alice@example.com"), ("alice", "example.com"))

    def test_refused(self) -> None:
        for bad in [
            b"alice",
            b"alice@",
            b"@example.com",
            b"a@b@example.com",
            b"a%b@example.com",
            b"\xff@example.com",
            b"",
            None,
        ]:
            with self.subTest(bad=bad):
                self.assertIsNone(parseLogin(bad))


class UserPasswordCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hasher = RecordingHasher()
        self.store = makeStore(self, self.hasher)
        self.runner = RecordingRunner()
        self.hasher.calls.clear()

    def checker(self, service: str = "smtp") -> UserPasswordChecker:
        return UserPasswordChecker(self.store, self.runner, service, self.hasher)

    def login(self, username: bytes, password: bytes, service: str = "smtp") -> Deferred[Any]:
        return self.checker(service).requestAvatarId(UsernamePassword(username, password))

    def refusal(self, username: bytes, password: bytes, service: str = "smtp") -> str:
        failure = self.failureResultOf(self.login(username, password, service), UnauthorizedLogin)
        return str(failure.value)

    def test_providesInterface(self) -> None:
        checker = self.checker()
        verifyObject(ICredentialsChecker, checker)
        self.assertEqual(checker.credentialInterfaces, (IUsernamePassword,))

    def test_unknownServiceRefused(self) -> None:
        self.assertRaises(ValueError, UserPasswordChecker, self.store, self.runner, "ftp")

    def test_success(self) -> None:
        avatarId = self.successResultOf(self.login(b"alice@example.com", ALICE_PASSWORD.encode()))
        self.assertEqual(avatarId, b"alice@example.com")
        self.assertIsInstance(avatarId, bytes)

    def test_percentForm(self) -> None:
        avatarId = self.successResultOf(self.login(b"alice%example.com", ALICE_PASSWORD.encode()))
        self.assertEqual(avatarId, b"alice@example.com")

    def test_caseInsensitiveName(self) -> None:
        avatarId = self.successResultOf(self.login(b"ALICE@Example.Com", ALICE_PASSWORD.encode()))
        self.assertEqual(avatarId, b"alice@example.com")

    def test_aliasDomainGivesCanonicalAvatar(self) -> None:
        avatarId = self.successResultOf(
            self.login(b"alice@mail.example.net", ALICE_PASSWORD.encode())
        )
        self.assertEqual(avatarId, b"alice@example.com")

    def test_legacyHash(self) -> None:
        self.assertEqual(
            self.successResultOf(self.login(b"dave@example.com", b"password")),
            b"dave@example.com",
        )
        self.assertEqual(self.refusal(b"dave@example.com", b"Password"), REFUSED)

    def test_refusalsLookAlike(self) -> None:
        """Wrong password, unknown user, unknown domain, bad form: one message."""
        messages = {
            self.refusal(b"alice@example.com", b"wrong"),
            self.refusal(b"alice@example.com", b""),
            self.refusal(b"nobody@example.com", ALICE_PASSWORD.encode()),
            self.refusal(b"alice@nowhere.example", ALICE_PASSWORD.encode()),
            self.refusal(b"alice", ALICE_PASSWORD.encode()),
            self.refusal(b"\xff\xfe@example.com", b"x"),
            self.refusal(b"carol@example.com", b""),
            self.refusal(b"bob@example.com", b"bob-password", "pop3"),
        }
        self.assertEqual(messages, {REFUSED})

    def test_unknownUserCostsOneVerification(self) -> None:
        """Unknown users cost one scrypt verification (of a dummy hash), as a
        wrong password does."""
        self.refusal(b"nobody@example.com", b"guess")
        self.refusal(b"nobody@nowhere.example", b"guess")
        self.refusal(b"alice", b"guess")
        self.refusal(b"alice@example.com", b"guess")
        self.assertEqual(self.hasher.hashesVerified(), ["dummy", "dummy", "dummy", "scrypt"])
        self.assertTrue(self.hasher.calls[0][0].startswith("$scrypt$ln=4,"))

    def test_emptyHashRefused(self) -> None:
        """carol has no hash: no password at all lets her in, the empty one included."""
        self.refusal(b"carol@example.com", b"")
        self.refusal(b"carol@example.com", b"carol-clear")
        self.assertEqual(self.hasher.hashesVerified(), ["dummy", "dummy"])

    def test_serviceFlags(self) -> None:
        """bob has NO_POP and NO_IMAP: SMTP AUTH works, POP3 and IMAP do not."""
        password = b"bob-password"
        self.assertEqual(
            self.successResultOf(self.login(b"bob@example.com", password, "smtp")),
            b"bob@example.com",
        )
        self.refusal(b"bob@example.com", password, "pop3")
        self.refusal(b"bob@example.com", password, "imap")
        self.assertEqual(
            self.successResultOf(self.login(b"alice@example.com", ALICE_PASSWORD.encode(), "pop3")),
            b"alice@example.com",
        )

    def test_noSMTPFlag(self) -> None:
        self.store.setFlags("alice", "example.com", UserFlags.NO_SMTP | UserFlags.BOUNCE_MAIL)
        self.refusal(b"alice@example.com", ALICE_PASSWORD.encode(), "smtp")
        self.assertEqual(
            self.successResultOf(self.login(b"alice@example.com", ALICE_PASSWORD.encode(), "pop3")),
            b"alice@example.com",
        )

    def test_bounceMailDoesNotRefuseLogin(self) -> None:
        self.store.setFlags("alice", "example.com", UserFlags.BOUNCE_MAIL)
        self.successResultOf(self.login(b"alice@example.com", ALICE_PASSWORD.encode()))

    def test_databaseUnavailableIsNotARefusal(self) -> None:
        checker = UserPasswordChecker(unavailableStore(self), self.runner, "smtp", self.hasher)
        d = checker.requestAvatarId(UsernamePassword(b"alice@example.com", b"x"))
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(DatabaseUnavailable))
        self.assertFalse(failure.check(UnauthorizedLogin))

    def test_workRunsInTheRunner(self) -> None:
        self.successResultOf(self.login(b"alice@example.com", ALICE_PASSWORD.encode()))
        self.refusal(b"nobody@example.com", b"x")
        self.assertEqual(len(self.runner.jobs), 2)

    def test_secretsNeverLogged(self) -> None:
        secrets = [ALICE_PASSWORD, "Wr0ng-s3cret", "bob-password"]
        with capturedLogs() as events:
            self.successResultOf(self.login(b"alice@example.com", ALICE_PASSWORD.encode()))
            self.refusal(b"alice@example.com", b"Wr0ng-s3cret")
            self.refusal(b"nobody@example.com", ALICE_PASSWORD.encode())
            self.refusal(b"bob@example.com", b"bob-password", "pop3")
        self.assertEqual(len(events), 3)
        for event in events:
            text = formatEvent(event) + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, text)
        reasons = [event["reason"] for event in events]
        self.assertEqual(reasons, ["wrong password", "no such user", "pop3 disabled for this user"])
        self.assertEqual(events[0]["user"], "alice@example.com")
        self.assertEqual(events[0]["service"], "smtp")


class RehashTests(SynchronousTestCase):
    """A login with a legacy (or cheaper) hash stores a current one."""

    def setUp(self) -> None:
        self.hasher = PasswordHasher.cheap()

    def makeStore(self, storeClass: type[SQLiteUserStore] = RecordingStore) -> SQLiteUserStore:
        store = makeStore(self, self.hasher, storeClass)
        store.deleteUser("dave", "example.com")
        store.addUser(User("dave", "example.com", DAVE_IMPORTED))
        store.addUser(User("frank", "plain.example", FRANK_IMPORTED))
        return store

    def login(
        self, store: SQLiteUserStore, username: bytes, password: bytes, service: str = "smtp"
    ) -> Deferred[Any]:
        checker = UserPasswordChecker(store, synchronousRunner, service, self.hasher)
        return checker.requestAvatarId(UsernamePassword(username, password))

    def storedHash(self, store: SQLiteUserStore, name: str, domain: str) -> str:
        user = store.user(name, domain)
        assert user is not None
        return user.passwordHash

    def test_md5CryptUpgradedToScrypt(self) -> None:
        store = self.makeStore()
        with capturedLogs() as events:
            self.assertEqual(
                self.successResultOf(
                    self.login(store, b"dave@example.com", DAVE_PASSWORD.encode())
                ),
                b"dave@example.com",
            )
        stored = self.storedHash(store, "dave", "example.com")
        self.assertTrue(stored.startswith("$scrypt$ln=4,r=8,p=1$"), stored)
        self.assertFalse(self.hasher.needsRehash(stored))
        # the same password still logs in, another still does not
        self.successResultOf(self.login(store, b"dave@example.com", DAVE_PASSWORD.encode()))
        self.failureResultOf(
            self.login(store, b"dave@example.com", DAVE_PASSWORD.lower().encode()),
            UnauthorizedLogin,
        )
        self.assertEqual(self.storedHash(store, "dave", "example.com"), stored)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.info)
        self.assertEqual(
            (events[0]["user"], events[0]["scheme"]), ("dave@example.com", "md5_crypt")
        )
        text = formatEvent(events[0]) + repr(events[0])
        for secret in [DAVE_PASSWORD, DAVE_IMPORTED, stored]:
            self.assertNotIn(secret, text)

    def test_sha512CryptUpgradedToScrypt(self) -> None:
        store = self.makeStore()
        with capturedLogs() as events:
            self.successResultOf(self.login(store, b"frank@plain.example", FRANK_PASSWORD.encode()))
        self.assertTrue(self.storedHash(store, "frank", "plain.example").startswith("$scrypt$"))
        self.assertEqual(events[0]["scheme"], "sha512_crypt")
        self.successResultOf(self.login(store, b"frank@plain.example", FRANK_PASSWORD.encode()))

    def test_clearSecretKept(self) -> None:
        store = self.makeStore()
        assert isinstance(store, RecordingStore)
        store.setPassword("dave", "example.com", DAVE_IMPORTED, "dave-clear")
        store.passwordsSet.clear()
        self.successResultOf(self.login(store, b"dave@example.com", DAVE_PASSWORD.encode()))
        user = store.user("dave", "example.com")
        assert user is not None
        self.assertEqual(user.clearSecret, "dave-clear")
        self.assertEqual(len(store.passwordsSet), 1)
        self.assertEqual(store.passwordsSet[0][2], "dave-clear")

    def test_wrongPasswordDoesNotRehash(self) -> None:
        store = self.makeStore()
        assert isinstance(store, RecordingStore)
        self.failureResultOf(self.login(store, b"dave@example.com", b"wrong"), UnauthorizedLogin)
        self.assertEqual(self.storedHash(store, "dave", "example.com"), DAVE_IMPORTED)
        self.assertEqual(store.passwordsSet, [])

    def test_disabledServiceDoesNotRehash(self) -> None:
        store = self.makeStore()
        assert isinstance(store, RecordingStore)
        store.setFlags("dave", "example.com", UserFlags.NO_POP)
        self.failureResultOf(
            self.login(store, b"dave@example.com", DAVE_PASSWORD.encode(), "pop3"),
            UnauthorizedLogin,
        )
        self.assertEqual(self.storedHash(store, "dave", "example.com"), DAVE_IMPORTED)
        self.assertEqual(store.passwordsSet, [])

    def test_currentHashNotRewritten(self) -> None:
        store = self.makeStore()
        assert isinstance(store, RecordingStore)
        before = self.storedHash(store, "alice", "example.com")
        with capturedLogs() as events:
            self.successResultOf(self.login(store, b"alice@example.com", ALICE_PASSWORD.encode()))
        self.assertEqual(self.storedHash(store, "alice", "example.com"), before)
        self.assertEqual(store.passwordsSet, [])
        self.assertEqual(len(events), 0)

    def test_cheaperScryptUpgraded(self) -> None:
        """needsRehash depends on the hasher's cost: raising it upgrades on login."""
        store = self.makeStore()
        self.hasher = PasswordHasher(log2N=5)
        self.successResultOf(self.login(store, b"alice@example.com", ALICE_PASSWORD.encode()))
        stored = self.storedHash(store, "alice", "example.com")
        self.assertTrue(stored.startswith("$scrypt$ln=5,"), stored)
        self.successResultOf(self.login(store, b"alice@example.com", ALICE_PASSWORD.encode()))

    def assertStoreFailureHarmless(self, storeClass: type[UnavailableOnSetPasswordStore]) -> None:
        store = self.makeStore(storeClass)
        with capturedLogs() as events:
            self.assertEqual(
                self.successResultOf(
                    self.login(store, b"dave@example.com", DAVE_PASSWORD.encode())
                ),
                b"dave@example.com",
            )
        self.assertEqual(self.storedHash(store, "dave", "example.com"), DAVE_IMPORTED)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertEqual(events[0]["user"], "dave@example.com")
        self.assertIn(storeClass.error.__name__, events[0]["error"])
        self.assertNotIn("log_failure", events[0])
        text = formatEvent(events[0]) + repr(events[0])
        for secret in [DAVE_PASSWORD, "$scrypt$", DAVE_IMPORTED]:
            self.assertNotIn(secret, text)
        # and again: still no harm
        self.successResultOf(self.login(store, b"dave@example.com", DAVE_PASSWORD.encode()))

    def test_databaseUnavailableOnStoreDoesNotFailLogin(self) -> None:
        self.assertStoreFailureHarmless(UnavailableOnSetPasswordStore)

    def test_crashOnStoreDoesNotFailLogin(self) -> None:
        self.assertStoreFailureHarmless(CrashingOnSetPasswordStore)

    def test_passwordChangedMeanwhileIsKept(self) -> None:
        """An administrator's new password, set between the lookup and the
        rehash, is not overwritten by the old password's new hash."""
        store = self.makeStore(RacingStore)
        assert isinstance(store, RacingStore)
        self.successResultOf(self.login(store, b"dave@example.com", DAVE_PASSWORD.encode()))
        self.assertEqual(self.storedHash(store, "dave", "example.com"), store.adminHash)


class HashedSecretCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = makeStore(self, PasswordHasher.cheap())
        self.runner = RecordingRunner()

    def checker(self, service: str = "smtp") -> HashedSecretChecker:
        return HashedSecretChecker(self.store, self.runner, service)

    def refusal(self, credentials: Any, service: str = "smtp") -> str:
        d = self.checker(service).requestAvatarId(credentials)
        return str(self.failureResultOf(d, UnauthorizedLogin).value)

    def test_providesInterface(self) -> None:
        checker = self.checker()
        verifyObject(ICredentialsChecker, checker)
        self.assertEqual(checker.credentialInterfaces, (IUsernameHashedPassword,))

    def test_cramMD5(self) -> None:
        credentials = cramMD5(b"alice@example.com", ALICE_CLEAR.encode())
        self.assertEqual(
            self.successResultOf(self.checker().requestAvatarId(credentials)),
            b"alice@example.com",
        )
        self.assertEqual(len(self.runner.jobs), 1)

    def test_cramMD5UpperCaseHex(self) -> None:
        credentials = cramMD5(b"alice@example.com", ALICE_CLEAR.encode())
        credentials.response = credentials.response.upper()
        self.successResultOf(self.checker().requestAvatarId(credentials))

    def test_cramMD5AliasDomain(self) -> None:
        credentials = cramMD5(b"alice%mail.example.net", ALICE_CLEAR.encode())
        self.assertEqual(
            self.successResultOf(self.checker().requestAvatarId(credentials)),
            b"alice@example.com",
        )

    def test_cramMD5Wrong(self) -> None:
        self.assertEqual(self.refusal(cramMD5(b"alice@example.com", b"wrong")), REFUSED)
        # the right digest for another challenge
        credentials = cramMD5(b"alice@example.com", ALICE_CLEAR.encode())
        credentials.challenge = b"<1.2@elsewhere>"
        self.assertEqual(self.refusal(credentials), REFUSED)

    def test_responsesAreComparedInConstantTime(self) -> None:
        """CRAM-MD5 and APOP digests go through hmac.compare_digest, right or
        wrong (Twisted's own checkPassword compares with ==)."""
        real = hmac.compare_digest
        compared: list[tuple[bytes, bytes]] = []

        def recording(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return real(a, b)

        self.patch(checkers.hmac, "compare_digest", recording)
        right = cramMD5(b"alice@example.com", ALICE_CLEAR.encode())
        self.successResultOf(self.checker().requestAvatarId(right))
        self.refusal(cramMD5(b"alice@example.com", b"wrong"))
        self.successResultOf(
            self.checker("pop3").requestAvatarId(apop(b"alice@example.com", ALICE_CLEAR.encode()))
        )
        self.refusal(apop(b"alice@example.com", b"wrong"), "pop3")
        self.assertEqual(len(compared), 4)
        self.assertEqual([a == b for a, b in compared], [True, False, True, False])
        self.assertEqual(compared[0][1], right.response.split(b" ")[-1])

    def test_cramMD5WithoutChallengeRefused(self) -> None:
        credentials = CramMD5Credentials(b"mx.example.com")
        digest = hmac.new(ALICE_CLEAR.encode(), b"", hashlib.md5).hexdigest().encode()
        credentials.setResponse(b"alice@example.com " + digest)
        self.assertEqual(self.refusal(credentials), REFUSED)

    def test_cramMD5WithoutResponseRefused(self) -> None:
        credentials = CramMD5Credentials(b"mx.example.com")
        credentials.getChallenge()
        self.assertEqual(self.refusal(credentials), REFUSED)

    def test_apop(self) -> None:
        credentials = apop(b"alice@example.com", ALICE_CLEAR.encode())
        self.assertEqual(
            self.successResultOf(self.checker("pop3").requestAvatarId(credentials)),
            b"alice@example.com",
        )

    def test_apopWrong(self) -> None:
        self.assertEqual(self.refusal(apop(b"alice@example.com", b"wrong"), "pop3"), REFUSED)
        self.assertEqual(
            self.refusal(apop(b"alice@example.com", ALICE_PASSWORD.encode()), "pop3"), REFUSED
        )

    def test_refusalsLookAlike(self) -> None:
        messages = {
            self.refusal(cramMD5(b"nobody@example.com", b"x")),
            self.refusal(cramMD5(b"alice@nowhere.example", ALICE_CLEAR.encode())),
            self.refusal(cramMD5(b"alice", ALICE_CLEAR.encode())),
            # no clear secret: erin's domain keeps none
            self.refusal(cramMD5(b"erin@plain.example", b"")),
            self.refusal(apop(b"erin@plain.example", b"erin-password"), "pop3"),
            # dave's account predates clear passwords
            self.refusal(cramMD5(b"dave@example.com", b"password")),
            # carol has a clear secret but no password hash: cannot log in
            self.refusal(cramMD5(b"carol@example.com", b"carol-clear")),
            # bob: right secret, service switched off
            self.refusal(apop(b"bob@example.com", b"bob-clear"), "pop3"),
            self.refusal(cramMD5(b"bob@example.com", b"bob-clear"), "imap"),
        }
        self.assertEqual(messages, {REFUSED})
        self.successResultOf(
            self.checker("smtp").requestAvatarId(cramMD5(b"bob@example.com", b"bob-clear"))
        )

    def test_otherProvidersUseTheirCheckPassword(self) -> None:
        @implementer(IUsernameHashedPassword)
        class Custom:
            def __init__(self, username: bytes, expected: bytes) -> None:
                self.username = username
                self.expected = expected
                self.seen: list[bytes] = []

            def checkPassword(self, password: bytes) -> Deferred[bool]:
                self.seen.append(password)
                return succeed(hmac.compare_digest(password, self.expected))

        good = Custom(b"alice@example.com", ALICE_CLEAR.encode())
        self.assertEqual(
            self.successResultOf(self.checker().requestAvatarId(good)), b"alice@example.com"
        )
        self.assertEqual(good.seen, [ALICE_CLEAR.encode()])
        self.refusal(Custom(b"alice@example.com", b"other"))

    def test_databaseUnavailableIsNotARefusal(self) -> None:
        checker = HashedSecretChecker(unavailableStore(self), self.runner, "pop3")
        failure = self.failureResultOf(
            checker.requestAvatarId(apop(b"alice@example.com", ALICE_CLEAR.encode()))
        )
        self.assertTrue(failure.check(DatabaseUnavailable))

    def test_secretsNeverLogged(self) -> None:
        with capturedLogs() as events:
            self.refusal(cramMD5(b"alice@example.com", b"Wr0ng-s3cret"))
            self.refusal(apop(b"erin@plain.example", b"erin-password"), "pop3")
        self.assertEqual(len(events), 2)
        for event in events:
            text = formatEvent(event) + repr(event)
            for secret in ["Wr0ng-s3cret", "erin-password", ALICE_CLEAR]:
                self.assertNotIn(secret, text)


class PortalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = makeStore(self, PasswordHasher.cheap())
        self.data = self.mktemp()
        self.realm = MailRealm(self.store, self.data)
        self.portal = makePortal(
            self.store, synchronousRunner, "pop3", self.realm, PasswordHasher.cheap()
        )

    def test_realmProvidesInterface(self) -> None:
        verifyObject(IRealm, self.realm)

    def test_credentialInterfaces(self) -> None:
        self.assertEqual(
            set(self.portal.listCredentialsInterfaces()),
            {IUsernamePassword, IUsernameHashedPassword},
        )
        plainOnly = makePortal(
            self.store, synchronousRunner, "pop3", self.realm, hashedSecrets=False
        )
        self.assertEqual(plainOnly.listCredentialsInterfaces(), [IUsernamePassword])

    def test_loginGivesAccount(self) -> None:
        credentials = UsernamePassword(b"alice@mail.example.net", ALICE_PASSWORD.encode())
        interface, account, logout = self.successResultOf(
            self.portal.login(credentials, None, IMailAccount)
        )
        self.assertIs(interface, IMailAccount)
        assert isinstance(account, MailAccount)
        verifyObject(IMailAccount, account)
        self.assertEqual(account.address, "alice@example.com")
        self.assertEqual(
            account.maildir,
            os.path.join(os.path.abspath(self.data), "domains", "example.com", "alice", "Maildir"),
        )
        logout()

    def test_apopLoginGivesAccount(self) -> None:
        d = self.portal.login(apop(b"alice@example.com", ALICE_CLEAR.encode()), None, IMailAccount)
        _, account, _ = self.successResultOf(d)
        assert isinstance(account, MailAccount)
        self.assertEqual(account.address, "alice@example.com")

    def test_unknownInterface(self) -> None:
        from twisted.mail.pop3 import IMailbox

        self.assertRaises(
            NotImplementedError, self.realm.requestAvatar, b"alice@example.com", None, IMailbox
        )
        credentials = UsernamePassword(b"alice@example.com", ALICE_PASSWORD.encode())
        self.failureResultOf(self.portal.login(credentials, None, IMailbox), NotImplementedError)

    def test_anonymousRefused(self) -> None:
        self.assertRaises(NotImplementedError, self.realm.requestAvatar, (), None, IMailAccount)


class WorkerThreadTests(TestCase):
    """With the real worker pool, hashing never runs in the reactor thread."""

    async def test_hashingOffTheReactorThread(self) -> None:
        hasher = RecordingHasher()
        store = makeStore(self, hasher)
        hasher.calls.clear()
        pool = WorkerPool(cast(IReactorFromThreads, reactor), 2, name="test-checkers")
        pool.start()
        self.addCleanup(pool.stop)
        checker = UserPasswordChecker(store, pool.run, "smtp", hasher)
        avatarId = await checker.requestAvatarId(
            UsernamePassword(b"alice@example.com", ALICE_PASSWORD.encode())
        )
        self.assertEqual(avatarId, b"alice@example.com")
        try:
            await checker.requestAvatarId(UsernamePassword(b"nobody@example.com", b"x"))
        except UnauthorizedLogin:
            pass
        else:
            self.fail("unknown user logged in")
        self.assertEqual(hasher.hashesVerified(), ["scrypt", "dummy"])
        self.assertNotIn(threading.get_ident(), [thread for _, thread in hasher.calls])

    async def test_rehashOffTheReactorThread(self) -> None:
        store = makeStore(self, PasswordHasher.cheap(), RecordingStore)
        assert isinstance(store, RecordingStore)
        pool = WorkerPool(cast(IReactorFromThreads, reactor), 2, name="test-checkers")
        pool.start()
        self.addCleanup(pool.stop)
        checker = UserPasswordChecker(store, pool.run, "pop3", PasswordHasher.cheap())
        avatarId = await checker.requestAvatarId(UsernamePassword(b"dave@example.com", b"password"))
        self.assertEqual(avatarId, b"dave@example.com")
        self.assertEqual(len(store.passwordsSet), 1)
        address, stored, _, thread = store.passwordsSet[0]
        self.assertEqual(address, "dave@example.com")
        self.assertTrue(stored.startswith("$scrypt$"))
        self.assertNotEqual(thread, threading.get_ident())
