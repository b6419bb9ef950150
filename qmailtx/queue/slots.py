"""Jobs waiting for a delivery slot: one channel's limit, and one per key.

A channel (local, remote) runs at most ``limit`` jobs at once (qmail's
``concurrencyremote``); a key (the agent's ``batchKey``: a domain, for
remote delivery) may have a lower limit of its own. A job whose key is
saturated waits without taking one of the channel's slots, so one slow
domain cannot starve the others (Postfix's per-destination concurrency).

Jobs start in the order they were added, skipping those whose key is
saturated. Each key keeps its own FIFO; a heap holds the keys that have
waiting jobs and room, ordered by their oldest waiting job. Adding,
starting and releasing cost O(log k) for k such keys, however many jobs
wait for a saturated key.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Key(Generic[T]):
    limit: int | None
    jobs: deque[tuple[int, T]] = field(default_factory=deque)
    running: int = 0
    ready: bool = False  # in the heap: has jobs waiting and room

    def hasRoom(self) -> bool:
        return self.limit is None or self.running < self.limit


class SlotQueue(Generic[T]):
    """FIFO of jobs under a global limit and per-key limits.

    ``keyLimit(key)`` is asked once while the key is known (it has jobs
    waiting or running); ``None`` means only the global limit applies.
    """

    def __init__(self, limit: int, keyLimit: Callable[[Hashable], int | None]) -> None:
        self.limit = max(limit, 1)
        self._keyLimit = keyLimit
        self._keys: dict[Hashable, _Key[T]] = {}
        self._ready: list[tuple[int, Hashable]] = []  # (oldest job's number, key)
        self._numbers = itertools.count()
        self.running = 0
        self.waiting = 0

    def add(self, key: Hashable, job: T) -> None:
        """Queue ``job``; it starts when ``take`` hands it out."""
        entry = self._keys.get(key)
        if entry is None:
            limit = self._keyLimit(key)
            entry = self._keys[key] = _Key(None if limit is None else max(limit, 1))
        entry.jobs.append((next(self._numbers), job))
        self.waiting += 1
        self._offer(key, entry)

    def take(self) -> tuple[Hashable, T] | None:
        """The oldest job that may start now, its slots taken; None if none may."""
        if self.running >= self.limit or not self._ready:
            return None
        _, key = heapq.heappop(self._ready)
        entry = self._keys[key]
        entry.ready = False
        _, job = entry.jobs.popleft()
        self.waiting -= 1
        entry.running += 1
        self.running += 1
        self._offer(key, entry)
        return key, job

    def release(self, key: Hashable) -> None:
        """A job of ``key`` has ended: free its slots."""
        entry = self._keys[key]
        entry.running -= 1
        self.running -= 1
        if not entry.jobs and not entry.running:
            del self._keys[key]  # only keys with jobs are kept
            return
        self._offer(key, entry)

    def runningFor(self, key: Hashable) -> int:
        entry = self._keys.get(key)
        return entry.running if entry is not None else 0

    def clear(self) -> None:
        """Forget the waiting jobs; running ones keep their slots until released."""
        self._ready.clear()
        self.waiting = 0
        for key, entry in list(self._keys.items()):
            entry.jobs.clear()
            entry.ready = False
            if not entry.running:
                del self._keys[key]

    def _offer(self, key: Hashable, entry: _Key[T]) -> None:
        if entry.jobs and not entry.ready and entry.hasRoom():
            heapq.heappush(self._ready, (entry.jobs[0][0], key))
            entry.ready = True
