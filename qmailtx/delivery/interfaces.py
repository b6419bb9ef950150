"""Delivery agents and what they answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from twisted.internet.defer import Deferred
from zope.interface import Interface

from qmailtx.address import Address
from qmailtx.queue.layout import QueuedMessage


class Outcome(Enum):
    DELIVERED = "success"
    TEMPORARY = "deferral"
    PERMANENT = "failure"


@dataclass(frozen=True)
class DeliveryResult:
    """One recipient's result, with qmail-style report text ("...(#5.1.1)")."""

    outcome: Outcome
    text: str


def delivered(text: str) -> DeliveryResult:
    return DeliveryResult(Outcome.DELIVERED, text)


def temporary(text: str) -> DeliveryResult:
    return DeliveryResult(Outcome.TEMPORARY, text)


def permanent(text: str) -> DeliveryResult:
    return DeliveryResult(Outcome.PERMANENT, text)


class IDeliveryAgent(Interface):
    """Delivers one queued message to some of its recipients (one channel)."""

    def deliver(
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        """Answer a Deferred firing with one DeliveryResult per recipient, in order.

        ``whenDelivered``, if given, is blocking work (removing the finished
        queue file) that the agent may run in its worker right after every
        recipient was delivered, sparing the queue a second trip to a
        thread; an agent without workers ignores it.

        Must never errback for an ordinary failure: a full disk, a refused
        connection or an unknown user are results (temporary or permanent).
        """

    def batchKey(recipient: Address) -> object:
        """Recipients with equal keys may share one ``deliver`` call.

        Keys are hashable; the queue manager also counts running
        deliveries per key (see ``batchLimit``)."""

    def batchLimit(key: object) -> int | None:
        """How many ``deliver`` calls for ``key`` (a ``batchKey``) may run at
        once, or None for no limit beyond the channel's concurrency.

        The queue manager enforces it: a delivery waiting for its key's
        turn takes none of the channel's slots. Answers synchronously."""
