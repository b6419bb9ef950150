"""The embedded user database: one SQLite file, no server to run.

Safe from any thread: each thread gets its own connection. The file is in
WAL mode, so ``qmailctl`` can write while the server reads, and the server
sees each change at its next lookup (no restart, no signal). A ``generation``
counter, bumped by triggers, tells caches that something changed.

Schema changes go through ``_MIGRATIONS``; the schema version is kept in
``PRAGMA user_version``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from zope.interface import implementer

from qmailtx.vdomain.interfaces import (
    AlreadyExists,
    DatabaseUnavailable,
    IUserStore,
    NoSuchAlias,
    NoSuchDomain,
    NoSuchUser,
    UserDatabaseError,
)
from qmailtx.vdomain.records import (
    Alias,
    CatchAll,
    CatchAllAction,
    Domain,
    QuotaLimit,
    User,
    UserFlags,
    Vacation,
    parseQuota,
)

_TABLES = ("domains", "alias_domains", "users", "aliases", "vacations")

_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('generation', 0);
CREATE TABLE domains (
    name TEXT PRIMARY KEY,
    catchall TEXT NOT NULL DEFAULT 'bounce-no-mailbox',
    catchall_target TEXT NOT NULL DEFAULT '',
    clear_passwords INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE alias_domains (
    alias TEXT PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE
);
CREATE INDEX alias_domains_domain ON alias_domains(domain);
CREATE TABLE users (
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL DEFAULT '',
    clear_secret TEXT,
    quota TEXT,
    flags INTEGER NOT NULL DEFAULT 0,
    gecos TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (domain, name)
);
CREATE TABLE aliases (
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (domain, name, target)
);
CREATE TABLE vacations (
    domain TEXT NOT NULL,
    name TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    period INTEGER NOT NULL,
    PRIMARY KEY (domain, name),
    FOREIGN KEY (domain, name) REFERENCES users(domain, name) ON DELETE CASCADE
);
CREATE TABLE vacation_replies (
    domain TEXT NOT NULL,
    name TEXT NOT NULL,
    sender TEXT NOT NULL,
    sent REAL NOT NULL,
    PRIMARY KEY (domain, name, sender),
    FOREIGN KEY (domain, name) REFERENCES users(domain, name) ON DELETE CASCADE
);
""" + "".join(
    f"""
CREATE TRIGGER {table}_{op} AFTER {op.upper()} ON {table}
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'generation'; END;
"""
    for table in _TABLES
    for op in ("insert", "update", "delete")
)

_MIGRATIONS = (_SCHEMA_1,)


def _lower(name: str) -> str:
    return name.strip().lower()


def _quotaText(quota: QuotaLimit | None) -> str | None:
    return None if quota is None or quota.unlimited else str(quota)


@implementer(IUserStore)
class SQLiteUserStore:
    """IUserStore in one SQLite file (created, with its folder, if missing)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._migrated = False

    # -- connections ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
        except (sqlite3.Error, OSError) as e:
            raise DatabaseUnavailable(f"user database {self.path}: {e}") from e
        with self._lock:
            self._connections.append(connection)
            if not self._migrated:
                self._migrate(connection)
                self._migrated = True
        self._local.connection = connection
        return connection

    def _migrate(self, connection: sqlite3.Connection) -> None:
        try:
            connection.execute("BEGIN IMMEDIATE")
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number}")
            connection.execute("COMMIT")
        except sqlite3.Error as e:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise DatabaseUnavailable(f"user database {self.path}: {e}") from e

    def close(self) -> None:
        """Close every thread's connection (for tests and clean shutdown)."""
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections = []
        self._local = threading.local()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        connection = self._connect()
        try:
            yield connection
        except sqlite3.Error as e:
            raise DatabaseUnavailable(f"user database {self.path}: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise DatabaseUnavailable(f"user database {self.path}: {e}") from e
        try:
            yield connection
        except BaseException as e:
            connection.execute("ROLLBACK")
            if isinstance(e, sqlite3.IntegrityError):
                if "UNIQUE" in str(e):
                    raise AlreadyExists(str(e)) from e
                raise UserDatabaseError(str(e)) from e
            if isinstance(e, sqlite3.Error):
                raise DatabaseUnavailable(f"user database {self.path}: {e}") from e
            raise
        else:
            try:
                connection.execute("COMMIT")
            except sqlite3.Error as e:
                connection.execute("ROLLBACK")
                raise DatabaseUnavailable(f"user database {self.path}: {e}") from e

    def version(self) -> int:
        with self._read() as c:
            (value,) = c.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            return int(value)

    # -- domains --------------------------------------------------------------

    def canonicalDomain(self, name: str) -> str | None:
        name = _lower(name)
        with self._read() as c:
            row = c.execute(
                "SELECT name FROM domains WHERE name = ?"
                " UNION ALL SELECT domain FROM alias_domains WHERE alias = ?",
                (name, name),
            ).fetchone()
        return None if row is None else str(row[0])

    def _domainFromRow(self, c: sqlite3.Connection, row: Any) -> Domain:
        name, action, target, clear = row
        aliases = tuple(
            r[0]
            for r in c.execute(
                "SELECT alias FROM alias_domains WHERE domain = ? ORDER BY alias", (name,)
            )
        )
        return Domain(name, CatchAll(CatchAllAction(action), target), bool(clear), aliases)

    def domain(self, name: str) -> Domain | None:
        with self._read() as c:
            row = c.execute(
                "SELECT name, catchall, catchall_target, clear_passwords FROM domains"
                " WHERE name = ?",
                (_lower(name),),
            ).fetchone()
            return None if row is None else self._domainFromRow(c, row)

    def domains(self) -> list[Domain]:
        with self._read() as c:
            rows = c.execute(
                "SELECT name, catchall, catchall_target, clear_passwords FROM domains ORDER BY name"
            ).fetchall()
            return [self._domainFromRow(c, row) for row in rows]

    def _requireDomain(self, c: sqlite3.Connection, name: str) -> None:
        if c.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is None:
            raise NoSuchDomain(f"no such domain: {name}")

    def _refuseTakenDomain(self, c: sqlite3.Connection, name: str) -> None:
        if (
            c.execute(
                "SELECT 1 FROM domains WHERE name = ? UNION ALL"
                " SELECT 1 FROM alias_domains WHERE alias = ?",
                (name, name),
            ).fetchone()
            is not None
        ):
            raise AlreadyExists(f"domain exists already: {name}")

    def addDomain(self, domain: Domain) -> None:
        name = _lower(domain.name)
        with self._write() as c:
            self._refuseTakenDomain(c, name)
            c.execute(
                "INSERT INTO domains (name, catchall, catchall_target, clear_passwords)"
                " VALUES (?, ?, ?, ?)",
                (
                    name,
                    domain.catchall.action.value,
                    domain.catchall.target,
                    int(domain.clearPasswords),
                ),
            )
            for alias in domain.aliases:
                self._refuseTakenDomain(c, _lower(alias))
                c.execute("INSERT INTO alias_domains VALUES (?, ?)", (_lower(alias), name))

    def deleteDomain(self, name: str) -> None:
        name = _lower(name)
        with self._write() as c:
            self._requireDomain(c, name)
            c.execute("DELETE FROM domains WHERE name = ?", (name,))

    def addAliasDomain(self, alias: str, target: str) -> None:
        alias, target = _lower(alias), _lower(target)
        with self._write() as c:
            self._requireDomain(c, target)
            self._refuseTakenDomain(c, alias)
            c.execute("INSERT INTO alias_domains VALUES (?, ?)", (alias, target))

    def deleteAliasDomain(self, alias: str) -> None:
        with self._write() as c:
            if c.execute("DELETE FROM alias_domains WHERE alias = ?", (_lower(alias),)).rowcount:
                return
        raise NoSuchDomain(f"no such alias domain: {_lower(alias)}")

    def setCatchAll(self, name: str, catchall: CatchAll) -> None:
        name = _lower(name)
        with self._write() as c:
            self._requireDomain(c, name)
            c.execute(
                "UPDATE domains SET catchall = ?, catchall_target = ? WHERE name = ?",
                (catchall.action.value, catchall.target, name),
            )

    def setClearPasswords(self, name: str, enabled: bool) -> None:
        name = _lower(name)
        with self._write() as c:
            self._requireDomain(c, name)
            c.execute("UPDATE domains SET clear_passwords = ? WHERE name = ?", (int(enabled), name))

    # -- users ----------------------------------------------------------------

    _USER_COLUMNS = "name, domain, password_hash, clear_secret, quota, flags, gecos"

    @staticmethod
    def _userFromRow(row: Any) -> User:
        name, domain, hashed, clear, quota, flags, gecos = row
        return User(
            name,
            domain,
            hashed,
            clear,
            None if quota is None else parseQuota(quota),
            UserFlags(flags),
            gecos,
        )

    def user(self, name: str, domain: str) -> User | None:
        with self._read() as c:
            row = c.execute(
                f"SELECT {self._USER_COLUMNS} FROM users WHERE domain = ? AND name = ?",
                (_lower(domain), _lower(name)),
            ).fetchone()
        return None if row is None else self._userFromRow(row)

    def users(self, domain: str) -> list[User]:
        domain = _lower(domain)
        with self._read() as c:
            self._requireDomain(c, domain)
            rows = c.execute(
                f"SELECT {self._USER_COLUMNS} FROM users WHERE domain = ? ORDER BY name",
                (domain,),
            ).fetchall()
        return [self._userFromRow(row) for row in rows]

    def addUser(self, user: User) -> None:
        name, domain = _lower(user.name), _lower(user.domain)
        with self._write() as c:
            self._requireDomain(c, domain)
            if self._exists(c, "users", name, domain) or self._exists(c, "aliases", name, domain):
                raise AlreadyExists(f"{name}@{domain} exists already")
            c.execute(
                f"INSERT INTO users ({self._USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    domain,
                    user.passwordHash,
                    user.clearSecret,
                    _quotaText(user.quota),
                    int(user.flags),
                    user.gecos,
                ),
            )

    @staticmethod
    def _exists(c: sqlite3.Connection, table: str, name: str, domain: str) -> bool:
        row = c.execute(
            f"SELECT 1 FROM {table} WHERE domain = ? AND name = ? LIMIT 1", (domain, name)
        ).fetchone()
        return row is not None

    def _updateUser(
        self, name: str, domain: str, assignments: str, values: tuple[Any, ...]
    ) -> None:
        name, domain = _lower(name), _lower(domain)
        with self._write() as c:
            self._requireDomain(c, domain)
            cursor = c.execute(
                f"UPDATE users SET {assignments} WHERE domain = ? AND name = ?",
                (*values, domain, name),
            )
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no such user: {name}@{domain}")

    def deleteUser(self, name: str, domain: str) -> None:
        name, domain = _lower(name), _lower(domain)
        with self._write() as c:
            self._requireDomain(c, domain)
            cursor = c.execute("DELETE FROM users WHERE domain = ? AND name = ?", (domain, name))
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no such user: {name}@{domain}")

    def setPassword(
        self, name: str, domain: str, passwordHash: str, clearSecret: str | None
    ) -> None:
        self._updateUser(
            name, domain, "password_hash = ?, clear_secret = ?", (passwordHash, clearSecret)
        )

    def setQuota(self, name: str, domain: str, quota: QuotaLimit | None) -> None:
        self._updateUser(name, domain, "quota = ?", (_quotaText(quota),))

    def setFlags(self, name: str, domain: str, flags: int) -> None:
        self._updateUser(name, domain, "flags = ?", (int(flags),))

    # -- aliases --------------------------------------------------------------

    def alias(self, name: str, domain: str) -> Alias | None:
        name, domain = _lower(name), _lower(domain)
        with self._read() as c:
            rows = c.execute(
                "SELECT target FROM aliases WHERE domain = ? AND name = ? ORDER BY position",
                (domain, name),
            ).fetchall()
        if not rows:
            return None
        return Alias(name, domain, tuple(r[0] for r in rows))

    def aliases(self, domain: str) -> list[Alias]:
        domain = _lower(domain)
        with self._read() as c:
            self._requireDomain(c, domain)
            rows = c.execute(
                "SELECT name, target FROM aliases WHERE domain = ? ORDER BY name, position",
                (domain,),
            ).fetchall()
        found: dict[str, list[str]] = {}
        for name, target in rows:
            found.setdefault(name, []).append(target)
        return [Alias(name, domain, tuple(targets)) for name, targets in found.items()]

    def addAlias(self, alias: Alias) -> None:
        name, domain = _lower(alias.name), _lower(alias.domain)
        with self._write() as c:
            self._requireDomain(c, domain)
            if self._exists(c, "users", name, domain):
                raise AlreadyExists(f"{name}@{domain} is a user")
            (position,) = c.execute(
                "SELECT COALESCE(MAX(position), 0) FROM aliases WHERE domain = ? AND name = ?",
                (domain, name),
            ).fetchone()
            for target in alias.targets:
                position += 1
                c.execute(
                    "INSERT OR IGNORE INTO aliases VALUES (?, ?, ?, ?)",
                    (domain, name, position, target),
                )

    def deleteAlias(self, name: str, domain: str, target: str | None = None) -> None:
        name, domain = _lower(name), _lower(domain)
        with self._write() as c:
            self._requireDomain(c, domain)
            if target is None:
                cursor = c.execute(
                    "DELETE FROM aliases WHERE domain = ? AND name = ?", (domain, name)
                )
            else:
                cursor = c.execute(
                    "DELETE FROM aliases WHERE domain = ? AND name = ? AND target = ?",
                    (domain, name, target),
                )
            if cursor.rowcount == 0:
                what = f"{name}@{domain}" + ("" if target is None else f" -> {target}")
                raise NoSuchAlias(f"no such alias: {what}")

    # -- auto-responder -------------------------------------------------------

    def vacation(self, name: str, domain: str) -> Vacation | None:
        with self._read() as c:
            row = c.execute(
                "SELECT subject, body, period FROM vacations WHERE domain = ? AND name = ?",
                (_lower(domain), _lower(name)),
            ).fetchone()
        return None if row is None else Vacation(row[0], row[1], int(row[2]))

    def setVacation(self, name: str, domain: str, vacation: Vacation | None) -> None:
        name, domain = _lower(name), _lower(domain)
        with self._write() as c:
            if not self._exists(c, "users", name, domain):
                raise NoSuchUser(f"no such user: {name}@{domain}")
            c.execute("DELETE FROM vacations WHERE domain = ? AND name = ?", (domain, name))
            c.execute("DELETE FROM vacation_replies WHERE domain = ? AND name = ?", (domain, name))
            if vacation is not None:
                c.execute(
                    "INSERT INTO vacations VALUES (?, ?, ?, ?, ?)",
                    (domain, name, vacation.subject, vacation.body, vacation.period),
                )

    def noteVacationReply(
        self, name: str, domain: str, sender: str, now: float, period: int
    ) -> bool:
        name, domain, sender = _lower(name), _lower(domain), _lower(sender)
        with self._write() as c:
            row = c.execute(
                "SELECT sent FROM vacation_replies WHERE domain = ? AND name = ? AND sender = ?",
                (domain, name, sender),
            ).fetchone()
            if row is not None and now - float(row[0]) < period:
                return False
            c.execute(
                "INSERT OR REPLACE INTO vacation_replies VALUES (?, ?, ?, ?)",
                (domain, name, sender, now),
            )
            return True


def _statements(script: str) -> Iterator[str]:
    """Split a schema script into statements (triggers keep their inner ';')."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statement = buffer.strip()
            if statement:
                yield statement
            buffer = ""
