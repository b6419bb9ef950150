"""The user database: one blocking interface for every backend.

Backends are blocking, as vpopmail's are, and safe to call from any thread:
the server calls them from its worker threads (never the reactor thread),
``qmailctl`` calls them directly. The embedded backend is SQLite
(``qmailtx.vdomain.sqlite``); a PostgreSQL or MariaDB backend for several
nodes sharing one database implements the same interface over a
connection pool. ``ThreadedUserDatabase`` gives the reactor thread a
Deferred-returning face of any backend.
"""

from __future__ import annotations

from zope.interface import Interface

from qmailtx.vdomain.records import Alias, CatchAll, Domain, QuotaLimit, User, Vacation


class UserDatabaseError(Exception):
    """Base of the errors a backend raises for bad requests (not for outages)."""


class NoSuchDomain(UserDatabaseError):
    pass


class NoSuchUser(UserDatabaseError):
    pass


class NoSuchAlias(UserDatabaseError):
    pass


class AlreadyExists(UserDatabaseError):
    pass


class DatabaseUnavailable(Exception):
    """The backend cannot answer now (a temporary failure: mail is deferred)."""


class IUserStore(Interface):
    """Domains, users, aliases, quotas and catch-alls. Every name is lower-cased
    by the backend; every method may raise DatabaseUnavailable."""

    def version() -> int:
        """A number that changes whenever anything in the database changes
        (for caches; another process's changes included)."""

    # -- domains ------------------------------------------------------------

    def canonicalDomain(name: str) -> str | None:
        """The hosted domain ``name`` is (itself) or is an alias of; None if neither."""

    def domain(name: str) -> Domain | None:
        """A hosted domain by its own name (alias domains: None)."""

    def domains() -> list[Domain]:
        """All hosted domains, by name, each with its alias domains."""

    def addDomain(domain: Domain) -> None:
        """AlreadyExists if the name is a domain or an alias domain."""

    def deleteDomain(name: str) -> None:
        """Delete a domain with its users, aliases and alias domains (NoSuchDomain)."""

    def addAliasDomain(alias: str, target: str) -> None:
        """Make ``alias`` another name of the hosted domain ``target``."""

    def deleteAliasDomain(alias: str) -> None:
        pass

    def setCatchAll(name: str, catchall: CatchAll) -> None:
        pass

    def setClearPasswords(name: str, enabled: bool) -> None:
        pass

    # -- users --------------------------------------------------------------

    def user(name: str, domain: str) -> User | None:
        """A user of a hosted domain (give the canonical domain name)."""

    def users(domain: str) -> list[User]:
        """NoSuchDomain if the domain is not hosted."""

    def addUser(user: User) -> None:
        """NoSuchDomain, or AlreadyExists (also when an alias has the name)."""

    def deleteUser(name: str, domain: str) -> None:
        """NoSuchUser. The vacation memory goes with the user."""

    def setPassword(name: str, domain: str, passwordHash: str, clearSecret: str | None) -> None:
        pass

    def setQuota(name: str, domain: str, quota: QuotaLimit | None) -> None:
        pass

    def setFlags(name: str, domain: str, flags: int) -> None:
        pass

    # -- aliases (valias) ---------------------------------------------------

    def alias(name: str, domain: str) -> Alias | None:
        pass

    def aliases(domain: str) -> list[Alias]:
        pass

    def addAlias(alias: Alias) -> None:
        """Add targets to an alias (created if new; a target already there is
        not repeated). NoSuchDomain; AlreadyExists if a user has the name."""

    def deleteAlias(name: str, domain: str, target: str | None = None) -> None:
        """Delete one target, or the whole alias when ``target`` is None (NoSuchAlias)."""

    # -- auto-responder -----------------------------------------------------

    def vacation(name: str, domain: str) -> Vacation | None:
        pass

    def setVacation(name: str, domain: str, vacation: Vacation | None) -> None:
        """Switch the auto-responder on (replacing any earlier one and its
        memory) or off."""

    def noteVacationReply(name: str, domain: str, sender: str, now: float, period: int) -> bool:
        """Atomically: True, and remember ``now``, if ``sender`` was not answered
        in the last ``period`` seconds; False otherwise."""
