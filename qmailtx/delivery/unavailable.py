"""Stand-in for the remote channel until remote delivery exists: always try later.

Remote recipients therefore stay queued and are retried on the remote
schedule; they bounce only when ``queuelifetime`` has passed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.delivery.interfaces import DeliveryResult, IDeliveryAgent, temporary
from qmailtx.queue.layout import QueuedMessage

TEXT = "Sorry, this server does not deliver to remote hosts yet. (#4.3.0)"


@implementer(IDeliveryAgent)
class NoRemoteDelivery:
    def batchKey(self, recipient: Address) -> object:
        return recipient.domain

    def deliver(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        return succeed([temporary(TEXT) for _ in recipients])
