"""A read-through cache of the user database lookups delivery makes.

Delivering one message to a hosted user asks the store several small
questions (``canonicalDomain``, ``alias`` in its exact and ``-default``
forms, ``user``, ``vacation``, sometimes ``domain``). ``CachedUserStore``
keeps their answers, negative ones included, for one value of the store's
``version()``: the generation counter that the database bumps on every
change, whoever makes it (``qmailctl`` in another process included).

The rule: an answer is kept only if ``version()`` had the same value
before and after it was read (so it is exactly that version's), and served
only while ``version()`` still has that value; a new value empties the
cache. Outside ``pinned()`` every lookup asks ``version()`` first, so it is
never older than the database. Inside ``with pinned(store):`` (one
message, in one worker thread) ``version()`` is asked once, at the first
lookup, and the block's answers are as of that moment or later, never going
back: a change made by another process during the block counts from the
next block, or from the first lookup of this one that has to read the
store and sees the new version. A hit costs no query; a miss costs the
read and one ``version()``.

Writes go straight to the store and empty the cache; an answer read before
a write made through this object is never stored after it (an epoch counter
guards the race), and the writing thread's block asks ``version()`` again.
Listings (``domains``, ``users``, ``aliases``) are not cached. The cache is
an LRU of at most ``size`` answers, shared by all threads under one lock;
the answers are frozen records, safe to share.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

from zope.interface import implementer

from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.records import Alias, CatchAll, Domain, QuotaLimit, User, Vacation

T = TypeVar("T")

_MISSING: Any = object()


@implementer(IUserStore)
class CachedUserStore:
    """IUserStore over another one, caching its single-record lookups."""

    def __init__(self, store: IUserStore, size: int = 10_000) -> None:
        if size < 1:
            raise ValueError("cache size must be at least 1")
        self.store = store
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._version: int | None = None  # the version the entries belong to
        self._epoch = 0  # bumped whenever entries are dropped
        self._local = threading.local()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- the version rule -----------------------------------------------------

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Ask ``version()`` at most once for the lookups made in this block
        by this thread (blocks nest: the outermost one decides)."""
        local = self._local
        if getattr(local, "pinned", False):
            yield
            return
        local.pinned, local.version = True, None
        try:
            yield
        finally:
            local.pinned, local.version = False, None

    @contextmanager
    def fresh(self) -> Iterator[None]:
        """Inside ``pinned()``: lookups in this block ask ``version()`` each time."""
        local = self._local
        saved = getattr(local, "pinned", False), getattr(local, "version", None)
        local.pinned, local.version = False, None
        try:
            yield
        finally:
            local.pinned, local.version = saved[0], None  # a write may have come between

    def _currentVersion(self) -> int:
        local = self._local
        if not getattr(local, "pinned", False):
            return self.store.version()
        version: int | None = local.version
        if version is None:
            version = local.version = self.store.version()
        return version

    def _lookup(self, kind: str, fetch: Callable[..., T], *args: str) -> T:
        key = (kind, *args)
        version = self._currentVersion()
        with self._lock:
            if version != self._version:
                self._entries.clear()
                self._version = version
                self._epoch += 1
            else:
                value = self._entries.get(key, _MISSING)
                if value is not _MISSING:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return value  # type: ignore[no-any-return]
            epoch = self._epoch
            self.misses += 1
        value = fetch(*args)
        after = self.store.version()
        if after != version:
            # The database changed while we read: the answer is newer than
            # ``version`` (not kept, it is not that version's), and this
            # thread's block moves on with it, so its answers never go back.
            if getattr(self._local, "pinned", False):
                self._local.version = after
            return value
        with self._lock:
            if epoch == self._epoch:  # no write through us, no other version meanwhile
                self._entries[key] = value
                if len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return value

    def invalidate(self) -> None:
        """Drop every answer; this thread's pinned block asks ``version()`` again."""
        with self._lock:
            self._entries.clear()
            self._version = None
            self._epoch += 1
        self._local.version = None

    def _write(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return call(*args)
        finally:
            self.invalidate()

    # -- cached lookups ---------------------------------------------------------

    def version(self) -> int:
        return self.store.version()

    def canonicalDomain(self, name: str) -> str | None:
        return self._lookup("canonical", self.store.canonicalDomain, name)

    def domain(self, name: str) -> Domain | None:
        return self._lookup("domain", self.store.domain, name)

    def user(self, name: str, domain: str) -> User | None:
        return self._lookup("user", self.store.user, name, domain)

    def alias(self, name: str, domain: str) -> Alias | None:
        return self._lookup("alias", self.store.alias, name, domain)

    def vacation(self, name: str, domain: str) -> Vacation | None:
        return self._lookup("vacation", self.store.vacation, name, domain)

    # -- listings: not cached -------------------------------------------------

    def domains(self) -> list[Domain]:
        return self.store.domains()

    def users(self, domain: str) -> list[User]:
        return self.store.users(domain)

    def aliases(self, domain: str) -> list[Alias]:
        return self.store.aliases(domain)

    # -- writes: straight through, then invalidate ------------------------------

    def addDomain(self, domain: Domain) -> None:
        self._write(self.store.addDomain, domain)

    def deleteDomain(self, name: str) -> None:
        self._write(self.store.deleteDomain, name)

    def addAliasDomain(self, alias: str, target: str) -> None:
        self._write(self.store.addAliasDomain, alias, target)

    def deleteAliasDomain(self, alias: str) -> None:
        self._write(self.store.deleteAliasDomain, alias)

    def setCatchAll(self, name: str, catchall: CatchAll) -> None:
        self._write(self.store.setCatchAll, name, catchall)

    def setClearPasswords(self, name: str, enabled: bool) -> None:
        self._write(self.store.setClearPasswords, name, enabled)

    def addUser(self, user: User) -> None:
        self._write(self.store.addUser, user)

    def deleteUser(self, name: str, domain: str) -> None:
        self._write(self.store.deleteUser, name, domain)

    def setPassword(
        self, name: str, domain: str, passwordHash: str, clearSecret: str | None
    ) -> None:
        self._write(self.store.setPassword, name, domain, passwordHash, clearSecret)

    def setQuota(self, name: str, domain: str, quota: QuotaLimit | None) -> None:
        self._write(self.store.setQuota, name, domain, quota)

    def setFlags(self, name: str, domain: str, flags: int) -> None:
        self._write(self.store.setFlags, name, domain, flags)

    def addAlias(self, alias: Alias) -> None:
        self._write(self.store.addAlias, alias)

    def deleteAlias(self, name: str, domain: str, target: str | None = None) -> None:
        self._write(self.store.deleteAlias, name, domain, target)

    def setVacation(self, name: str, domain: str, vacation: Vacation | None) -> None:
        self._write(self.store.setVacation, name, domain, vacation)

    def noteVacationReply(
        self, name: str, domain: str, sender: str, now: float, period: int
    ) -> bool:
        # vacation_replies has no generation trigger and no cached lookup reads
        # it, but every write invalidates: one simple rule.
        return self._write(self.store.noteVacationReply, name, domain, sender, now, period)


def pinned(store: IUserStore | None) -> AbstractContextManager[None]:
    """``store.pinned()`` for a CachedUserStore; for any other store, nothing."""
    if isinstance(store, CachedUserStore):
        return store.pinned()
    return nullcontext()


def fresh(store: IUserStore | None) -> AbstractContextManager[None]:
    """``store.fresh()`` for a CachedUserStore; for any other store, nothing."""
    if isinstance(store, CachedUserStore):
        return store.fresh()
    return nullcontext()
