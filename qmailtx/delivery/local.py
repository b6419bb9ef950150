"""Local delivery: one recipient, one Maildir under the data folder.

Mailboxes live where vpopmail keeps them:
``<data>/domains/<domain>/<user>/Maildir/``. A recipient whose mailbox folder
does not exist is a permanent failure; every other problem (a full disk, an
I/O error, a missing ``new/``) is temporary and the message stays queued.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath, InsecurePath
from zope.interface import implementer

from qmailtx.address import Address
from qmailtx.delivery.interfaces import (
    DeliveryResult,
    IDeliveryAgent,
    Outcome,
    delivered,
    permanent,
    temporary,
)
from qmailtx.delivery.maildir import MaildirWriter
from qmailtx.fs import FileSystem
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.store import Runner

NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"


def mailboxPath(dataDir: str, recipient: Address) -> str | None:
    """The Maildir for a local recipient, or None if the name cannot be a mailbox.

    Built with FilePath.child, so no address can name a path outside
    ``<data>/domains``.
    """
    user = recipient.local.lower()
    domain = recipient.domain.lower()
    if not user or not domain or user.startswith(".") or domain.startswith("."):
        return None
    try:
        path = FilePath(dataDir).child("domains").child(domain).child(user).child("Maildir")
    except InsecurePath:
        return None
    return path.path


def returnPathLines(sender: Address, recipient: Address) -> bytes:
    """qmail-local's RPLINE and DTLINE."""
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode("ascii", "replace")


@implementer(IDeliveryAgent)
class LocalDeliveryAgent:
    def __init__(
        self,
        runner: Runner,
        dataDir: str,
        writer: MaildirWriter | None = None,
        fs: FileSystem | None = None,
    ) -> None:
        self._run = runner
        self.dataDir = dataDir
        self.fs = fs or FileSystem()
        self.writer = writer or MaildirWriter(self.fs)

    def batchKey(self, recipient: Address) -> object:
        return recipient  # qmail-local delivers one recipient at a time

    def deliver(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        return self._run(self._deliverAll, message, recipients, whenDelivered)

    def _deliverAll(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None,
    ) -> list[DeliveryResult]:
        results = [self._deliverOne(message, r) for r in recipients]
        if whenDelivered is not None and all(r.outcome is Outcome.DELIVERED for r in results):
            try:
                whenDelivered()
            except OSError:
                pass  # the queue manager tries again in its own time
        return results

    def _deliverOne(self, message: QueuedMessage, recipient: Address) -> DeliveryResult:
        maildir = mailboxPath(self.dataDir, recipient)
        if maildir is None:
            return permanent(NO_MAILBOX)
        try:
            source = self.fs.openRead(message.path)
        except OSError as e:
            return temporary(f"Unable to read message: {e.strerror}. (#4.3.0)")
        try:
            name = self.writer.deliver(
                maildir,
                returnPathLines(message.sender, recipient),
                source,
                message.messageOffset,
                message.messageLength,
            )
        except OSError as e:
            reason = e.strerror or str(e)
            if e.errno == errno.ENOENT:
                # Only now look why: no such user (permanent) or a broken Maildir.
                if not os.path.isdir(os.path.dirname(maildir)):
                    return permanent(NO_MAILBOX)
                return temporary(f"Unable to write into maildir: {reason}. (#4.2.1)")
            return temporary(f"Temporary error on maildir delivery: {reason}. (#4.3.0)")
        finally:
            self.fs.close(source)
        return delivered(f"did 0+0+1/ {name}")
