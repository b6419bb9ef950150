"""One connection's SASL AUTH between its lines, for SMTP and POP3 alike.

The mechanisms themselves (``Exchange`` and its subclasses) live in
``qmailtx.smtp.auth``; a protocol drives one through a ``SASLSession``,
which keeps what must last from one client line to the next:

- ``start(exchange, initial)`` and ``respond(line)`` give the next step: a
  ``Challenge`` (the session then waits for the client's line: ``waiting``),
  the credentials to log in with, or ``REFUSED`` (PLAIN naming someone
  else's authzid). Input that is not base64, or ``*``, raises
  ``AuthInputError``. Only how a challenge is written differs between the
  protocols (``334 ...`` or ``+ ...``), and the replies.
- ``failed(host)`` counts a refused login against the client address in the
  shared ``AuthThrottle`` and gives the delay before the refusal may be
  answered; ``wait(delay)`` waits it out and says False when the connection
  went away meanwhile (``close``).
- ``succeeded(host, logout, user)`` records a login; its cred ``logout`` runs
  at ``endLogin`` (SMTP's STARTTLS forgets the login) or ``close``.

Nothing here logs what the client sent: responses hold passwords.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from qmailtx.smtp.auth import (
    AuthRefused,
    Challenge,
    Exchange,
    Step,
    decodeInitialResponse,
    decodeResponse,
)
from qmailtx.smtp.throttle import AuthThrottle

log = Logger()


class Refused:
    """The exchange refused the login before any check."""


REFUSED: Final = Refused()


class SASLSession:
    def __init__(self, clock: IReactorTime, throttle: AuthThrottle) -> None:
        self.clock = clock
        self.throttle = throttle
        self.mechanism = ""  # of the latest exchange, for the logs
        self._exchange: Exchange | None = None  # waiting for the client's next line
        self._delay: Deferred[None] | None = None
        self._logout: Callable[[], None] | None = None  # of the current login
        self._user = ""

    @property
    def waiting(self) -> bool:
        """The client's next line answers a challenge (it is no command)."""
        return self._exchange is not None

    def start(self, exchange: Exchange, initial: str | None) -> Step | Refused:
        """The first step; ``initial`` is the response on the AUTH line, if any."""
        self._exchange = None
        self.mechanism = exchange.name
        try:
            step = exchange.start(None if initial is None else decodeInitialResponse(initial))
        except AuthRefused:
            return REFUSED
        return self._next(exchange, step)

    def respond(self, line: bytes) -> Step | Refused:
        """The step after the client's answer to a challenge."""
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            raise RuntimeError("no SASL exchange is waiting for a line")
        try:
            step = exchange.respond(decodeResponse(line))
        except AuthRefused:
            return REFUSED
        return self._next(exchange, step)

    def _next(self, exchange: Exchange, step: Step) -> Step:
        if isinstance(step, Challenge):
            self._exchange = exchange
        return step

    def abandon(self) -> None:
        """Forget a waiting exchange (its line was too long)."""
        self._exchange = None

    def failed(self, host: str) -> float:
        """Count a refused login from ``host``; seconds before answering it."""
        return self.throttle.failed(host)

    def succeeded(
        self, host: str, logout: Callable[[], None] | None = None, user: str = ""
    ) -> None:
        """A login from ``host`` as ``user``; ``logout`` ends it (twisted.cred)."""
        self.throttle.succeeded(host)
        self.endLogin()
        self._logout, self._user = logout, user

    def endLogin(self) -> None:
        """Run the current login's logout, if any (once)."""
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                logout()
            except Exception:
                log.failure("logout of {user} failed", user=self._user)

    async def wait(self, delay: float) -> bool:
        """Wait ``delay`` seconds; False when ``close`` came first."""
        self._delay = deferLater(self.clock, delay, lambda: None)
        try:
            await self._delay
        except CancelledError:
            return False
        finally:
            self._delay = None
        return True

    def close(self) -> None:
        """The connection is gone: forget the exchange, end any wait, log out."""
        self._exchange = None
        if self._delay is not None:
            self._delay.cancel()
        self.endLogin()
