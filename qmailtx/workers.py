"""The worker threads that do qmailtx's disk work (queue files, Maildirs, fsync).

A plain pool: jobs go to the threads through one ``queue.SimpleQueue``;
results come back to the reactor in batches, one ``callFromThread`` per batch
rather than per job. Twisted's ``ThreadPool`` does the same job with a
coordinator thread and a wake-up per result; measured under load, the round
trips cost more than the disk work of a small message.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

_STOP = object()


class WorkerPool:
    def __init__(self, reactor: IReactorFromThreads, size: int, name: str = "qmailtx-io") -> None:
        self.reactor = reactor
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._results: list[tuple[Deferred[Any], bool, Any]] = []
        self._flushScheduled = False
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        for i in range(self.size):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Run what is queued already, then end the threads (blocks until they have)."""
        if not self.started:
            return
        self.started = False
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``f(*args)`` in a worker; the Deferred fires in the reactor thread."""
        d: Deferred[Any] = Deferred()
        self._jobs.put((f, args, d))
        return d

    __call__ = run

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            f, args, d = job
            try:
                outcome: tuple[Deferred[Any], bool, Any] = (d, True, f(*args))
            except BaseException:
                outcome = (d, False, Failure())
            with self._lock:
                self._results.append(outcome)
                if self._flushScheduled:
                    continue
                self._flushScheduled = True
            self.reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            batch, self._results = self._results, []
            self._flushScheduled = False
        for d, ok, value in batch:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
