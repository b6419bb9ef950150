"""Concurrent-connection caps per client address and in total (threats.md S13).

Postfix's anvil counts the connections each client holds open
(``smtpd_client_connection_count_limit``) and its process limit bounds them
all; a qmailtx listener is one process, so one ``ConnectionLimiter`` per
protocol factory does both. A protocol calls ``acquire`` when the
connection is made and, only if it was admitted, ``release`` when it is
lost; a refused connection is answered and closed without being counted.

Clients are counted by ``clientKey``: the IPv4 address, or the IPv6 /64 (one
subscriber's block), as the failed-AUTH throttle counts them. Exempt
clients (relay clients, loopback: Postfix's
``smtpd_client_event_limit_exceptions``) skip the per-client cap but still
count toward the total. Refusals are logged at most once per ``logInterval``
seconds per client key, with the number left unlogged since, so a flood
cannot flood the log.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from qmailtx.smtp.throttle import clientKey

log = Logger()

_LOG_TABLE_LIMIT = 4096  # refusal-log entries kept before stale ones are pruned


class Admission(enum.Enum):
    """What ``acquire`` decided; only ``ADMITTED`` is counted (and released)."""

    ADMITTED = "admitted"
    TOO_MANY_FROM_CLIENT = "too many connections from the client"
    TOO_MANY_IN_TOTAL = "too many connections in total"

    def __bool__(self) -> bool:
        return self is Admission.ADMITTED


def _never(host: str) -> bool:
    return False


class ConnectionLimiter:
    """Open connections per client key and in total, against two caps (0: no cap)."""

    def __init__(
        self,
        clock: IReactorTime,
        maxTotal: int,
        maxPerClient: int,
        exempt: Callable[[str], bool] = _never,
        name: str = "",
        logInterval: float = 1.0,
    ) -> None:
        self.clock = clock
        self.maxTotal = maxTotal
        self.maxPerClient = maxPerClient
        self.exempt = exempt
        self.name = name
        self.logInterval = logInterval
        self.total = 0
        self._perClient: dict[str, int] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # key -> (last logged, refused since)

    def count(self, host: str) -> int:
        """Connections now counted against ``host``'s client key."""
        return self._perClient.get(clientKey(host), 0)

    def acquire(self, host: str) -> Admission:
        """Admit a new connection from ``host`` (and count it) or say why not."""
        key = clientKey(host)
        if self.maxTotal and self.total >= self.maxTotal:
            return self._refused(host, key, Admission.TOO_MANY_IN_TOTAL)
        held = self._perClient.get(key, 0)
        if self.maxPerClient and held >= self.maxPerClient and not self.exempt(host):
            return self._refused(host, key, Admission.TOO_MANY_FROM_CLIENT)
        self.total += 1
        self._perClient[key] = held + 1
        return Admission.ADMITTED

    def release(self, host: str) -> None:
        """An admitted connection from ``host`` has ended."""
        key = clientKey(host)
        held = self._perClient.get(key, 0)
        if held <= 0 or self.total <= 0:
            log.error("connection limiter: release for {peer} without acquire", peer=host)
            return
        self.total -= 1
        if held == 1:
            del self._perClient[key]
        else:
            self._perClient[key] = held - 1

    def _refused(self, host: str, key: str, why: Admission) -> Admission:
        now = self.clock.seconds()
        last, unlogged = self._logged.get(key, (None, 0))
        if last is not None and now - last < self.logInterval:
            self._logged[key] = (last, unlogged + 1)
            return why
        if len(self._logged) >= _LOG_TABLE_LIMIT:
            self._prune(now)
        log.info(
            "{listener} refused a connection from {peer}: {reason}"
            " ({held} from {client}, {total} in total; {unlogged} more refused unlogged)",
            listener=self.name,
            peer=host,
            client=key,
            reason=why.value,
            held=self._perClient.get(key, 0),
            total=self.total,
            unlogged=unlogged,
        )
        self._logged[key] = (now, 0)
        return why

    def _prune(self, now: float) -> None:
        stale = [k for k, (t, _) in self._logged.items() if now - t >= self.logInterval]
        for k in stale:
            del self._logged[k]
        if len(self._logged) >= _LOG_TABLE_LIMIT:  # a flood from that many clients at once
            self._logged.clear()
