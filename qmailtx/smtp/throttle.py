"""Failed-AUTH penalties per client address (Dovecot's auth penalty, on a clock).

Each failed login from an address makes the server wait before it answers
``535``: 1 s, then 2, 4, 8 ... up to a cap (30 s). One failure is forgiven
for every ``decay`` seconds without a new one, and a successful login from
the address halves its count (not more: a guesser holding one good account
must not wipe its penalty by logging in with it). Only failures wait, and
only the failing connection (the delay is a ``callLater`` on the factory's
clock): other clients, and good logins from the same address, are not slowed.

IPv6 clients are counted per /64, the block one subscriber usually holds.
The table is bounded: past ``maxClients`` addresses the one idle longest is
forgotten.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime


@dataclass
class _Record:
    failures: int
    last: float


def clientKey(host: str) -> str:
    """The address a penalty is kept for: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthThrottle:
    def __init__(
        self,
        clock: IReactorTime,
        base: float = 1.0,
        cap: float = 30.0,
        decay: float = 60.0,
        maxClients: int = 10000,
    ) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.decay = decay
        self.maxClients = maxClients
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _current(self, key: str, now: float) -> int:
        record = self._records.get(key)
        if record is None:
            return 0
        forgiven = int((now - record.last) // self.decay) if self.decay > 0 else 0
        return max(0, record.failures - forgiven)

    def failures(self, host: str) -> int:
        """Failures still counted against ``host`` now."""
        return self._current(clientKey(host), self.clock.seconds())

    def failed(self, host: str) -> float:
        """Record a failed login from ``host``; the seconds to wait before answering."""
        key = clientKey(host)
        now = self.clock.seconds()
        failures = self._current(key, now) + 1
        self._records[key] = _Record(failures, now)
        self._records.move_to_end(key)
        while len(self._records) > self.maxClients:
            self._records.popitem(last=False)
        return float(min(self.cap, self.base * 2 ** min(failures - 1, 32)))

    def succeeded(self, host: str) -> None:
        """A login from ``host`` succeeded: halve the failures counted."""
        key = clientKey(host)
        now = self.clock.seconds()
        failures = self._current(key, now) // 2
        if failures:
            self._records[key] = _Record(failures, now)
        else:
            self._records.pop(key, None)
