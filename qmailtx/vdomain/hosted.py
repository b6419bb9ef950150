"""Which domains the user database hosts, as seen from the reactor thread.

The SMTP server asks at every RCPT and the queue manager at every
recipient, so the answer must usually be immediate: a set of hosted names
(domains and alias domains) kept in memory and reloaded whenever the
database's generation changes (checked every ``interval`` seconds in a
worker thread). A name missing from the set is looked up in the database
before it is refused (``lookup``, at RCPT) or sent remote (the queue
manager's ``confirmRemote``), so a domain added by ``qmailctl`` a moment
ago, or before the set was first loaded, is served at once; a deleted one
stops being served within ``interval``, and delivery asks the database
itself anyway.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from qmailtx.queue.store import Runner
from qmailtx.vdomain.interfaces import IUserStore

log = Logger()


def _snapshot(store: IUserStore) -> tuple[int, frozenset[str]]:
    version = store.version()
    names: set[str] = set()
    for domain in store.domains():
        names.add(domain.name)
        names.update(domain.aliases)
    return version, frozenset(names)


class HostedDomains(Service):
    def __init__(
        self, store: IUserStore, runner: Runner, clock: IReactorTime, interval: float = 1.0
    ) -> None:
        self.store = store
        self._run = runner
        self.clock = clock
        self.interval = interval
        self.names: frozenset[str] = frozenset()
        self._version: int | None = None
        self._loop: LoopingCall | None = None
        self._refreshing = False

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _poll(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True
        d = self._run(self._changedSnapshot, self._version)
        d.addCallbacks(self._loaded, self._failed)

    def _changedSnapshot(self, known: int | None) -> tuple[int, frozenset[str]] | None:
        if known is not None and self.store.version() == known:
            return None
        return _snapshot(self.store)

    def _loaded(self, snapshot: tuple[int, frozenset[str]] | None) -> None:
        self._refreshing = False
        if snapshot is not None:
            version, names = snapshot
            if names != self.names or self._version is None:
                log.info(
                    "hosted domains: {count} ({added} added, {removed} removed)",
                    count=len(names),
                    added=len(names - self.names),
                    removed=len(self.names - names),
                )
            self._version, self.names = version, names

    def _failed(self, failure: Failure) -> None:
        self._refreshing = False
        log.failure("reading hosted domains from the user database failed", failure)

    def contains(self, domain: str) -> bool:
        """From memory only (may be up to ``interval`` seconds old)."""
        return domain.lower() in self.names

    def lookup(self, domain: str) -> bool | Deferred[bool]:
        """True at once for a known name; otherwise ask the database."""
        domain = domain.lower()
        if domain in self.names:
            return True
        d = self._run(self.store.canonicalDomain, domain)
        return d.addCallback(self._looked, domain)

    def _looked(self, canonical: str | None, domain: str) -> bool:
        if canonical is None:
            return False
        self.names = self.names | {domain}
        return True
