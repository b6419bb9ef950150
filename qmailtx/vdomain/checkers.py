"""twisted.cred checkers over the user database, as vpopmail's vchkpw checks logins.

A login name is ``user@domain`` or ``user%domain`` (lower-cased); the domain
may be an alias domain, and the avatar id is always
``b"user@canonical-domain"``. Database lookups and password hashing run in
the worker threads (``runner``), never in the reactor thread.

Every refusal is the same ``UnauthorizedLogin`` (the protocol answers 535 or
-ERR); the reason goes to the log, the secret never does. An unknown user
costs one verification against a dummy hash, like a wrong password. A
database outage is not a refusal: ``DatabaseUnavailable`` fails the login as
itself, for a temporary reply (454).

Service flags are vpopmail's: NO_SMTP refuses SMTP AUTH, NO_POP POP3,
NO_IMAP IMAP. A user with an empty password hash cannot log in.

A successful plain-password login whose stored hash ``needsRehash`` (legacy
crypt formats imported from vpopmail, scrypt below the configured cost)
stores a new scrypt hash of the password, in the same worker thread; the
clear secret is kept. If that cannot be stored the login still succeeds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.mail.pop3 import APOPCredentials
from zope.interface import implementer

from qmailtx.logging import logsafe
from qmailtx.queue.store import Runner
from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.passwords import PasswordHasher, defaultHasher
from qmailtx.vdomain.records import User, UserFlags

log = Logger()

SERVICE_FLAGS = {
    "smtp": UserFlags.NO_SMTP,
    "pop3": UserFlags.NO_POP,
    "imap": UserFlags.NO_IMAP,
}

# The one message of every refusal: nothing tells an unknown user from a
# wrong password.
REFUSED = "authentication failed"

_LOGIN = re.compile(r"([^@%]+)[@%]([^@%]+)\Z")


def parseLogin(username: object) -> tuple[str, str] | None:
    """``(user, domain)``, lower-cased, from ``user@domain`` or ``user%domain``
    (bytes in UTF-8, or str); None for anything else."""
    if isinstance(username, bytes):
        try:
            username = username.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(username, str):
        return None
    m = _LOGIN.match(username.lower())
    if m is None:
        return None
    return m.group(1), m.group(2)


def _shown(username: object) -> str:
    """The login name as it may appear in a log line."""
    if isinstance(username, bytes):
        username = username.decode("utf-8", "replace")
    return logsafe(str(username))


@dataclass(frozen=True)
class _Lookup:
    user: User | None
    reason: str  # why ``user`` is None, or why the login fails after all


def _lookup(store: IUserStore, username: object) -> _Lookup:
    """Find the user named by a login name (blocking: worker threads only)."""
    parsed = parseLogin(username)
    if parsed is None:
        return _Lookup(None, "not user@domain")
    name, domainName = parsed
    domain = store.canonicalDomain(domainName)
    if domain is None:
        return _Lookup(None, "no such domain")
    user = store.user(name, domain)
    if user is None:
        return _Lookup(None, "no such user")
    if not user.passwordHash:
        return _Lookup(None, "no password set")
    return _Lookup(user, "")


def _serviceFlag(service: str) -> UserFlags:
    try:
        return SERVICE_FLAGS[service]
    except KeyError:
        raise ValueError(f"unknown service {service!r}; one of {sorted(SERVICE_FLAGS)}") from None


def _refuse(service: str, username: object, reason: str) -> UnauthorizedLogin:
    log.info(
        "{service} login refused for {user}: {reason}",
        service=service,
        user=_shown(username),
        reason=reason,
    )
    return UnauthorizedLogin(REFUSED)


@implementer(ICredentialsChecker)
class UserPasswordChecker:
    """Plain passwords (SMTP AUTH PLAIN/LOGIN, POP3 USER/PASS) against the
    stored hash; see ``qmailtx.vdomain.passwords``."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        store: IUserStore,
        runner: Runner,
        service: str,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.service = service
        self.hasher = defaultHasher if hasher is None else hasher
        self._flag = _serviceFlag(service)

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        return Deferred.fromCoroutine(self._login(credentials.username, credentials.password))

    async def _login(self, username: bytes, password: bytes) -> bytes | tuple[()]:
        found: _Lookup = await self.runner(self._check, username, password)
        if found.user is None:
            raise _refuse(self.service, username, found.reason)
        return found.user.address.encode("utf-8")

    def _check(self, username: bytes, password: bytes) -> _Lookup:
        """Look up and verify (blocking: runs in a worker thread)."""
        found = _lookup(self.store, username)
        if found.user is None:
            self.hasher.burn(password)
            return found
        if not self.hasher.verifyPassword(password, found.user.passwordHash):
            return _Lookup(None, "wrong password")
        if found.user.flags & self._flag:
            return _Lookup(None, f"{self.service} disabled for this user")
        if self.hasher.needsRehash(found.user.passwordHash):
            self._rehash(found.user, password)
        return found

    def _rehash(self, user: User, password: bytes) -> None:
        """Replace the verified legacy (or cheaper) hash of ``user`` with a
        current one, keeping the clear secret (blocking: worker thread). A
        failure is logged, by exception type only, and the login goes on."""
        scheme = self.hasher.schemeOf(user.passwordHash)
        try:
            newHash = self.hasher.hashPassword(password)
            # Narrow the race with a password change made since the lookup.
            current = self.store.user(user.name, user.domain)
            if current is None or current.passwordHash != user.passwordHash:
                log.info(
                    "password hash of {user} not upgraded: changed since the login began",
                    user=user.address,
                )
                return
            self.store.setPassword(user.name, user.domain, newHash, current.clearSecret)
        except Exception as e:
            # Not log.failure: a backend's message could quote the new hash.
            log.warn(
                "could not store the upgraded password hash of {user}: {error}",
                user=user.address,
                error=f"{type(e).__module__}.{type(e).__qualname__}",
            )
            return
        log.info(
            "upgraded the password hash of {user} from {scheme}",
            user=user.address,
            scheme=scheme,
        )


# For users without a usable clear secret the response is still computed,
# against this, so they cost what a real user does.
_DUMMY_SECRET = os.urandom(16).hex().encode("ascii")


def _asBytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return b""


def _matches(credentials: IUsernameHashedPassword, secret: bytes) -> bool | Deferred[bool]:
    """Whether the client's response was made with ``secret``.

    Twisted's ``CramMD5Credentials.checkPassword`` and
    ``APOPCredentials.checkPassword`` compare with ``==``, not in constant
    time, and ``APOPCredentials`` compares a str hexdigest with the bytes
    digest ``POP3`` gives it, so on Python 3 it never matches. For those two
    classes the expected response is computed here (HMAC-MD5 of the challenge,
    RFC 2195; MD5 of the banner's timestamp and the secret, RFC 1939) and
    compared with ``hmac.compare_digest``. Other providers fall back on their
    own ``checkPassword``.
    """
    if isinstance(credentials, CramMD5Credentials):
        challenge = _asBytes(credentials.challenge)
        if not challenge:
            return False
        expected = hmac.new(secret, challenge, hashlib.md5).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, _asBytes(credentials.response).lower())
    if isinstance(credentials, APOPCredentials):
        magic = _asBytes(credentials.magic)
        if not magic:
            return False
        # MD5 is what APOP is (RFC 1939), not a choice made here.
        expected = hashlib.md5(magic + secret).hexdigest().encode("ascii")  # noqa: S324
        return hmac.compare_digest(expected, _asBytes(credentials.digest).lower())
    return maybeDeferred(credentials.checkPassword, secret)


@implementer(ICredentialsChecker)
class HashedSecretChecker:
    """Challenge-response logins (CRAM-MD5, APOP): they need the user's clear
    secret, kept only in domains with ``clearPasswords``; a user without one
    is refused. The lookup runs in a worker thread; the response is checked
    in the calling thread (one MD5 or HMAC-MD5, microseconds)."""

    credentialInterfaces = (IUsernameHashedPassword,)

    def __init__(self, store: IUserStore, runner: Runner, service: str) -> None:
        self.store = store
        self.runner = runner
        self.service = service
        self._flag = _serviceFlag(service)

    def requestAvatarId(self, credentials: IUsernameHashedPassword) -> Deferred[bytes | tuple[()]]:
        return Deferred.fromCoroutine(self._login(credentials))

    async def _login(self, credentials: IUsernameHashedPassword) -> bytes | tuple[()]:
        username = credentials.username
        found: _Lookup = await self.runner(_lookup, self.store, username)
        user, reason = found.user, found.reason
        if user is not None and not user.clearSecret:
            user, reason = None, "no clear secret (domain without clear passwords)"
        secret = _DUMMY_SECRET if user is None else _asBytes(user.clearSecret)
        matched = await maybeDeferred(_matches, credentials, secret)
        if user is None:
            raise _refuse(self.service, username, reason)
        if not matched:
            raise _refuse(self.service, username, "wrong response")
        if user.flags & self._flag:
            raise _refuse(self.service, username, f"{self.service} disabled for this user")
        return user.address.encode("utf-8")


def makePortal(
    store: IUserStore,
    runner: Runner,
    service: str,
    realm: IRealm,
    hasher: PasswordHasher | None = None,
    hashedSecrets: bool = True,
) -> Portal:
    """A portal checking plain passwords and, unless ``hashedSecrets`` is
    False, CRAM-MD5/APOP responses (which are then advertised)."""
    checkers: list[ICredentialsChecker] = [UserPasswordChecker(store, runner, service, hasher)]
    if hashedSecrets:
        checkers.append(HashedSecretChecker(store, runner, service))
    return Portal(realm, checkers)
