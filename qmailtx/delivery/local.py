"""Local delivery: qmail-local and vdelivermail in one agent.

For each recipient ``resolve.py`` makes a plan (in a worker thread): the
lines of a ``.qmail`` file or a valias, or the user's own ``Maildir/``.
The lines run in order, as qmail-local runs them: Maildir and mbox lines in
the worker thread, ``|program`` lines as child processes from the reactor,
forwards last, re-injected through the queue (durable before the recipient
is marked done). A program's exit 99 stops the remaining lines.

Outcomes follow qmail: an unknown user or a mail loop is permanent, every
I/O problem (a full disk, EIO, a missing folder) is temporary, and over
quota is what ``[delivery] over_quota`` says ("bounce": permanent 5.2.2,
as vpopmail; "defer": temporary 4.2.2).

The common case (a user's Maildir, nothing else) costs one worker job per
recipient: resolution, quota, write and fsync together.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.address import Address, AddressError, parseMailbox
from qmailtx.delivery import vacation as autoresponder
from qmailtx.delivery.dotqmail import (
    Forward,
    MaildirLine,
    MboxLine,
    Program,
    ownerSender,
    qmailEnvironment,
    ufLine,
)
from qmailtx.delivery.identity import ProgramUser, ProgramUserError, programIdentity
from qmailtx.delivery.interfaces import (
    DeliveryResult,
    IDeliveryAgent,
    Outcome,
    delivered,
    permanent,
    temporary,
)
from qmailtx.delivery.maildir import MaildirWriter, StaleTmpSweeper, makeMaildir
from qmailtx.delivery.mbox import MboxError, appendMbox
from qmailtx.delivery.program import classifyExit, runProgram, spawnFailure
from qmailtx.delivery.quota import (
    MAILDIRSIZE,
    MaildirQuota,
    QuotaUsage,
    crossedPercent,
    parseDefinition,
)
from qmailtx.delivery.resolve import Plan, resolveRecipient
from qmailtx.delivery.verh import isVerpFor, rewrite
from qmailtx.domains import DomainTable
from qmailtx.fs import FileSystem
from qmailtx.queue.bounce import rfc5322Date
from qmailtx.queue.disk import newMessageId
from qmailtx.queue.filter import QueueRefused
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.store import QueueStore, Runner
from qmailtx.vdomain.cache import fresh, pinned
from qmailtx.vdomain.interfaces import DatabaseUnavailable, IUserStore
from qmailtx.vdomain.records import QuotaLimit, User
from qmailtx.vdomain.userlock import holdFolder

log = Logger()

HEADER_LIMIT = 256 * 1024
DATABASE_DOWN = "Temporary failure: the user database is unavailable. (#4.3.0)"
NO_PROGRAM_USER = "Unable to run program: running as root and no program_user. (#4.3.0)"


@dataclass(frozen=True)
class LocalSettings:
    data: str
    domains: DomainTable
    me: str = "localhost"
    overQuota: str = "bounce"  # or "defer"
    warnPercent: int = 90  # 0: no quota warnings
    delimiters: str = "-"
    programTimeout: float = 3600.0
    timezone: str = ""  # dates of generated mail ("": local)
    verh: bool = False  # P4: rewrite ##L/##H for VERP-expanded senders
    # Who |program lines run as while the server is root ([delivery] program_user);
    # without one a root server refuses to run programs at all.
    programUser: ProgramUser | None = None


def returnPathLines(sender: Address, address: str) -> bytes:
    """qmail-local's RPLINE and DTLINE."""
    return f"Return-Path: <{sender}>\nDelivered-To: {address}\n".encode("ascii", "replace")


def hasDeliveredTo(header: bytes, address: str) -> bool:
    """qmail-local's loop test: our exact Delivered-To line is in the header already."""
    wanted = address.lower().encode("ascii", "replace")
    for line in header.split(b"\n"):
        if line[:13].lower() == b"delivered-to:" and line[13:].strip().lower() == wanted:
            return True
    return False


@dataclass
class Injection:
    """A message delivery creates: a forward or an auto-reply."""

    sender: Address
    recipients: list[Address]
    content: bytes
    what: str


@dataclass
class _Progress:
    """One recipient's delivery as it runs through its plan."""

    recipient: Address
    plan: Plan | None = None
    position: int = 0
    files: int = 0
    forwards: list[Address] = field(default_factory=list)
    programs: int = 0
    result: DeliveryResult | None = None
    injections: list[Injection] = field(default_factory=list)
    header: bytes = b""


@implementer(IDeliveryAgent)
class LocalDeliveryAgent:
    def __init__(
        self,
        runner: Runner,
        settings: LocalSettings,
        store: IUserStore | None = None,
        queue: QueueStore | None = None,
        reactor: Any = None,
        writer: MaildirWriter | None = None,
        fs: FileSystem | None = None,
        clock: Callable[[], float] = time.time,
        tmpSweeper: StaleTmpSweeper | None = None,
    ) -> None:
        self._run = runner
        self.settings = settings
        self.store = store
        self.queue = queue
        self.reactor = reactor  # IReactorProcess + IReactorTime, for |program lines
        self.fs = fs or FileSystem()
        self.writer = writer or MaildirWriter(self.fs)
        self.clock = clock
        self.tmpSweeper = tmpSweeper if tmpSweeper is not None else StaleTmpSweeper()

    def batchKey(self, recipient: Address) -> object:
        return recipient  # qmail-local delivers one recipient at a time

    def batchLimit(self, key: object) -> int | None:
        return None  # concurrencylocal alone

    def deliver(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        return Deferred.fromCoroutine(self._deliverAll(message, recipients, whenDelivered))

    async def _deliverAll(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None,
    ) -> list[DeliveryResult]:
        progress = [_Progress(r) for r in recipients]
        await self._run(self._firstPass, message, progress, whenDelivered)
        results = []
        for p in progress:
            while p.result is None:
                await self._continue(message, p)
            if p.injections and p.result.outcome is Outcome.DELIVERED:
                p.result = await self._inject(message, p)
            results.append(p.result)
        return results

    # -- worker thread ------------------------------------------------------

    def _firstPass(
        self,
        message: QueuedMessage,
        progress: list[_Progress],
        whenDelivered: Callable[[], None] | None,
    ) -> None:
        for p in progress:
            self._step(message, p)
        done = all(
            p.result is not None and p.result.outcome is Outcome.DELIVERED and not p.injections
            for p in progress
        )
        if whenDelivered is not None and done:
            try:
                whenDelivered()
            except OSError:
                pass  # the queue manager tries again in its own time

    def _step(self, message: QueuedMessage, p: _Progress) -> None:
        """Run the plan's lines until a program needs the reactor or the plan ends.

        A cached user database is asked its version once for the whole step:
        its answers are as of the step's first lookup or later (a change made
        during the step counts from the next message)."""
        with pinned(self.store):
            self._pinnedStep(message, p)

    def _pinnedStep(self, message: QueuedMessage, p: _Progress) -> None:
        try:
            source = self.fs.openRead(message.path)
        except OSError as e:
            p.result = temporary(f"Unable to read message: {e.strerror}. (#4.3.0)")
            return
        try:
            if p.plan is None and not self._plan(message, p, source):
                return
            plan = p.plan
            assert plan is not None
            if plan.ownerFolder is None:
                self._runLines(message, p, source)
                return
            created = False
            if plan.owner is not None and not os.path.isdir(plan.ownerFolder):
                created = self._makeOwnerFolder(plan.ownerFolder)
            with holdFolder(plan.ownerFolder):
                # A folder made here may belong to a user deleted meanwhile.
                if created and self._gone(plan.owner):
                    shutil.rmtree(plan.ownerFolder, ignore_errors=True)
                    p.result = temporary(f"The mailbox of {plan.address} was deleted. (#4.2.1)")
                    return
                self._runLines(message, p, source)
        except DatabaseUnavailable:
            p.result = temporary(DATABASE_DOWN)
        except MboxError as e:
            p.result = temporary(e.text)
        except OSError as e:
            reason = e.strerror or str(e)
            p.result = temporary(f"Temporary error on local delivery: {reason}. (#4.3.0)")
        finally:
            self.fs.close(source)

    def _makeOwnerFolder(self, folder: str) -> bool:
        """Make a user's folder with its Maildir, whole or not at all: built
        under a scratch name beside it and renamed into place, so a delivery
        running at the same time never finds the folder without ``new/``.
        False when another delivery made it first."""
        parent = os.path.dirname(folder)
        self.fs.makedirs(parent)
        scratch = tempfile.mkdtemp(prefix=".new-", dir=parent)
        try:
            makeMaildir(self.fs, os.path.join(scratch, "Maildir"))
            os.rename(scratch, folder)
        except OSError as e:
            shutil.rmtree(scratch, ignore_errors=True)
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        return True

    def _gone(self, owner: User | None) -> bool:
        if owner is None or self.store is None:
            return False
        with fresh(self.store):  # now, not as of the start of the step
            return self.store.user(owner.name, owner.domain) is None

    def _plan(self, message: QueuedMessage, p: _Progress, source: int) -> bool:
        plan = resolveRecipient(
            self.store,
            self.settings.data,
            self.settings.domains,
            p.recipient,
            self.settings.delimiters,
        )
        if plan.final is not None:
            p.result = plan.final
            return False
        header = self._readHeader(message, source)
        if hasDeliveredTo(header, plan.address):
            p.result = permanent(
                "This message is looping: it already has my Delivered-To line. (#5.4.6)"
            )
            return False
        p.plan = plan
        p.header = header
        return True

    def _readHeader(self, message: QueuedMessage, source: int) -> bytes:
        head = self.fs.readAt(
            source, min(message.messageLength, HEADER_LIMIT), message.messageOffset
        )
        end = head.find(b"\n\n")
        return head if end < 0 else head[: end + 1]

    def _runLines(self, message: QueuedMessage, p: _Progress, source: int) -> None:
        plan = p.plan
        assert plan is not None
        lines = plan.instructions
        while p.position < len(lines):
            line = lines[p.position]
            if isinstance(line, Program):
                return  # the reactor runs it, then calls _step again
            p.position += 1
            if isinstance(line, Forward):
                try:
                    p.forwards.append(self._forwardAddress(line.address, plan))
                except AddressError:
                    p.result = permanent(f"Bad forwarding address: {line.address}. (#5.1.3)")
                    return
            elif isinstance(line, MaildirLine):
                failed = self._maildir(message, p, source, self._path(plan, line.path))
                if failed is not None:
                    p.result = failed
                    return
                p.files += 1
            elif isinstance(line, MboxLine):
                self._mbox(message, p, source, self._path(plan, line.path))
                p.files += 1
        self._finish(message, p, source)

    def _finish(self, message: QueuedMessage, p: _Progress, source: int) -> None:
        plan = p.plan
        assert plan is not None
        if p.forwards:
            content = b"Delivered-To: " + plan.address.encode("ascii", "replace") + b"\n"
            content += self.fs.readAt(source, message.messageLength, message.messageOffset)
            p.injections.append(
                Injection(self._forwardSender(message, plan), p.forwards, content, "forward")
            )
        if plan.owner is not None and p.files:
            self._vacation(message, p, plan.owner)
        p.result = delivered(f"did {p.files}+{len(p.forwards)}+{p.programs}/")

    def _path(self, plan: Plan, path: str) -> str:
        return path if path.startswith("/") else os.path.join(plan.home, path)

    def _forwardAddress(self, text: str, plan: Plan) -> Address:
        address = parseMailbox(text.strip())
        if not address.domain:
            address = address.withDomain(plan.address.rpartition("@")[2])
        return address

    def _forwardSender(self, message: QueuedMessage, plan: Plan) -> Address:
        """qmail-local's NEWSENDER: ``<local>-owner@<domain>`` when the .qmail
        file has a ``-owner`` companion (mailing lists); bounces stay bounces.

        qmail's VERP form (``-owner-default`` present too) needs per-recipient
        sender expansion in the queue, which qmailtx does not do: such lists
        get the plain ``-owner`` sender.
        """
        if plan.dotQmail is None:
            return message.sender
        folder, dash, ext = plan.dotQmail
        local, _, host = plan.address.rpartition("@")
        sender = ownerSender(folder, dash, ext, str(message.sender), local, host)
        if sender == str(message.sender):
            return message.sender
        return Address(f"{local}-owner", host)

    def _rewritten(self, message: QueuedMessage, p: _Progress, source: int) -> bytes | None:
        """The message rewritten for this recipient (verh, P4), or None to copy
        the queue file as it is."""
        if not self.settings.verh or not isVerpFor(message.sender, p.recipient):
            return None
        content = self.fs.readAt(source, message.messageLength, message.messageOffset)
        return rewrite(content, p.recipient)

    def _mbox(self, message: QueuedMessage, p: _Progress, source: int, path: str) -> None:
        plan = p.plan
        assert plan is not None
        prefix = returnPathLines(message.sender, plan.address)
        content = self._rewritten(message, p, source)
        if content is None:
            appendMbox(
                path,
                self._fromLine(message),
                prefix,
                source,
                message.messageOffset,
                message.messageLength,
            )
            return
        fd = os.memfd_create("verh", os.MFD_CLOEXEC)
        try:
            self.fs.write(fd, content)
            appendMbox(path, self._fromLine(message), prefix, fd, 0, len(content))
        finally:
            os.close(fd)

    def _fromLine(self, message: QueuedMessage) -> bytes:
        return ufLine(str(message.sender), self.clock()).encode("ascii", "replace")

    def _maildir(
        self, message: QueuedMessage, p: _Progress, source: int, path: str
    ) -> DeliveryResult | None:
        """Write into one Maildir, under its quota; a result only when it failed."""
        plan = p.plan
        assert plan is not None
        maildir = path.rstrip("/")
        self._sweepTmp(maildir)
        prefix = returnPathLines(message.sender, plan.address)
        offset, length = message.messageOffset, message.messageLength
        content = self._rewritten(message, p, source)
        if content is not None:
            # The rewritten copy is written whole; the queue file is not touched.
            prefix, source, offset, length = prefix + content, -1, 0, 0
        size = len(prefix) + length
        owned = plan.owner is not None and os.path.join(plan.home, "Maildir") == maildir
        if owned:
            # The user database is the truth for a user's own Maildir (a
            # maildirsize left from an old quota does not count).
            limit = plan.owner.quota if plan.owner is not None else None
        else:
            # Other Maildirs count only a maildirsize they have (qmail's
            # maildir++ patch), with its own definition.
            limit = maildirsizeLimit(maildir)
        if limit is None or limit.unlimited:
            self.writer.deliver(maildir, prefix, source, offset, length)
            return None
        quota = MaildirQuota(maildir, limit, clock=self.clock, fs=self.fs, host=self.writer.host)
        # Written and fsync'd outside the lock, so deliveries into one Maildir
        # overlap; only check, link and count are serialised.
        pending = self.writer.prepare(maildir, prefix, source, offset, length)
        counted = False
        try:
            with quota.locked():
                fits, before = quota.checkUsage(size, 1)
                if not fits:
                    return self._overQuota(plan.address)
                self.writer.publish(pending)
                counted = self._count(quota, size, 1, maildir)
            self.fs.syncDirectory(os.path.join(maildir, "new"))
        except BaseException:
            # The usage line went in with the link (a crash then over-counts
            # until the next recount; it never loses the message); a delivery
            # that failed after it takes the line back once the file is gone.
            if self.writer.unpublish(pending) and counted:
                self._uncount(quota, size, maildir)
            raise
        finally:
            self.writer.discard(pending)
        percent = self.settings.warnPercent
        after = QuotaUsage(before.bytes + size, before.count + 1)
        if owned and percent and crossedPercent(before, after, quota.limit, percent):
            self._warn(maildir, plan.address, after, quota.limit)
        return None

    def _sweepTmp(self, maildir: str) -> None:
        """Remove what killed writers left in tmp/ (D4), once an hour at most."""
        try:
            swept = self.tmpSweeper.sweep(maildir, self.clock())
        except OSError as e:
            log.warn("sweep of {maildir}/tmp failed: {error}", maildir=maildir, error=e.strerror)
            return
        if swept:
            log.info("removed {count} stale files from {maildir}/tmp", count=swept, maildir=maildir)

    def _count(self, quota: MaildirQuota, size: int, count: int, maildir: str) -> bool:
        """Append a usage line; False (logged) when maildirsize could not be updated."""
        try:
            quota.add(size, count)
        except OSError as e:
            # The message is in new/ already: do not deliver it twice for
            # want of a usage line. The next recount corrects it.
            log.warn(
                "maildirsize of {maildir} not updated: {error}", maildir=maildir, error=e.strerror
            )
            return False
        return True

    def _uncount(self, quota: MaildirQuota, size: int, maildir: str) -> None:
        """Take back the usage line of a message removed from new/ again."""
        try:
            with quota.locked():
                self._count(quota, -size, -1, maildir)
        except OSError as e:
            log.warn(
                "maildirsize of {maildir} over-counts until a recount: {error}",
                maildir=maildir,
                error=e.strerror,
            )

    def _overQuota(self, address: str) -> DeliveryResult:
        if self.settings.overQuota == "defer":
            return temporary(f"The mailbox of {address} is over quota. (#4.2.2)")
        return permanent(f"Sorry, the mailbox of {address} is over quota. (#5.2.2)")

    def _warn(self, maildir: str, address: str, usage: QuotaUsage, limit: QuotaLimit) -> None:
        warning = quotaWarning(
            address,
            self.settings.warnPercent,
            usage,
            limit,
            self.clock(),
            self.settings.me,
            self.settings.timezone,
        )
        try:
            self.writer.deliver(maildir, warning, -1, 0, 0)
        except OSError as e:
            log.warn(
                "quota warning for {rcpt} not written: {error}", rcpt=address, error=e.strerror
            )

    def _vacation(self, message: QueuedMessage, p: _Progress, owner: User) -> None:
        store = self.store
        if store is None:
            return
        try:
            answer = store.vacation(owner.name, owner.domain)
            if answer is None:
                return
            names = {owner.address, str(p.recipient).lower()}
            domain = store.domain(owner.domain)
            if domain is not None:
                names.update(f"{owner.name}@{alias}" for alias in domain.aliases)
            ok, why = autoresponder.shouldAnswer(message.sender, p.header, names)
            if not ok:
                log.debug("no auto-reply for {rcpt}: {why}", rcpt=owner.address, why=why)
                return
            now = self.clock()
            if not store.noteVacationReply(
                owner.name, owner.domain, str(message.sender), now, answer.period
            ):
                return
        except DatabaseUnavailable:
            return  # no reply is better than a deferred delivery
        content = autoresponder.buildReply(
            answer,
            owner.address,
            message.sender,
            p.header,
            now,
            f"{newMessageId(now)}.qmailtx@{self.settings.me}",
            self.settings.timezone,
        )
        p.injections.append(Injection(Address.null(), [message.sender], content, "auto-reply"))

    # -- reactor thread -----------------------------------------------------

    async def _continue(self, message: QueuedMessage, p: _Progress) -> None:
        plan = p.plan
        assert plan is not None
        line = plan.instructions[p.position]
        assert isinstance(line, Program)
        p.position += 1
        p.programs += 1
        result, stop = await self._program(message, p, line)
        if result.outcome is not Outcome.DELIVERED:
            p.result = result
            return
        if stop:
            p.position = len(plan.instructions)
        await self._run(self._step, message, p)

    async def _program(
        self, message: QueuedMessage, p: _Progress, line: Program
    ) -> tuple[DeliveryResult, bool]:
        plan = p.plan
        assert plan is not None
        if self.reactor is None:
            return temporary("Program deliveries are not available here. (#4.3.0)"), False
        try:
            user = programIdentity(self.settings.programUser)
        except ProgramUserError:
            return temporary(NO_PROGRAM_USER), False
        try:
            fd = await self._run(self._messageFile, message)
        except OSError as e:
            return temporary(f"Unable to read message: {e.strerror}. (#4.3.0)"), False
        try:
            env = qmailEnvironment(
                user=plan.owner.name if plan.owner else plan.local,
                home=plan.home,
                local=plan.address.rpartition("@")[0],
                host=plan.address.rpartition("@")[2],
                ext=plan.ext,
                sender=str(message.sender),
                when=self.clock(),
                newSender=str(self._forwardSender(message, plan)),
                default=plan.default,
            )
            outcome = await runProgram(
                self.reactor,
                line.command,
                env,
                plan.home or self.settings.data,
                fd,
                self.settings.programTimeout,
                self.reactor,
                user=user,
            )
        except (OSError, ValueError) as e:
            return spawnFailure(e), False
        finally:
            os.close(fd)
        return classifyExit(outcome)

    def _messageFile(self, message: QueuedMessage) -> int:
        """The message alone in an unnamed, seekable file: a program's stdin."""
        fd = os.open(self.settings.data, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            source = self.fs.openRead(message.path)
            try:
                self.fs.copyRange(source, fd, message.messageOffset, message.messageLength)
            finally:
                self.fs.close(source)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _inject(self, message: QueuedMessage, p: _Progress) -> DeliveryResult:
        assert p.result is not None
        if self.queue is None:
            return temporary("Forwarding is not available here. (#4.3.0)")
        for injection in p.injections:
            try:
                queued = await self.queue.inject(
                    self.clock(),
                    injection.sender,
                    injection.recipients,
                    injection.content,
                    {"f": message.msgid},
                )
            except QueueRefused as e:
                if injection.what == "forward":
                    text = f"The queue refused the forwarded message: {e.reply.text}."
                    if e.permanent:
                        return permanent(f"{text} (#{e.reply.enhanced or '5.3.0'})")
                    return temporary(f"{text} (#{e.reply.enhanced or '4.3.0'})")
                log.warn("auto-reply for {msgid} refused: {error}", msgid=message.msgid, error=e)
                continue
            except OSError as e:
                if injection.what == "forward":
                    return temporary(f"Unable to forward message: {e.strerror}. (#4.3.0)")
                log.warn("auto-reply for {msgid} not queued: {error}", msgid=message.msgid, error=e)
                continue
            log.info(
                "{what} of msg {msgid} to {rcpt} queued as msg {queued}",
                what=injection.what,
                msgid=message.msgid,
                rcpt=",".join(str(r) for r in injection.recipients),
                queued=queued.msgid,
            )
        return p.result


def maildirsizeLimit(maildir: str) -> QuotaLimit | None:
    """The definition line of a Maildir's own maildirsize, if it has a usable one."""
    try:
        with open(os.path.join(maildir, MAILDIRSIZE), "rb") as f:
            first = f.readline(200)
        limit = parseDefinition(first.decode("ascii").strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return None if limit.unlimited else limit


def quotaWarning(
    address: str,
    percent: int,
    usage: QuotaUsage,
    limit: QuotaLimit,
    now: float,
    me: str,
    timezone: str = "",
) -> bytes:
    """vpopmail's quota warning, delivered into the mailbox itself."""
    used = f"{usage.bytes} of its {limit.bytes} bytes" if limit.bytes else ""
    if limit.count:
        used += (" and " if used else "") + f"{usage.count} of its {limit.count} messages"
    return (
        f"From: Mail Delivery System <MAILER-DAEMON@{me}>\n"
        f"To: {address}\n"
        f"Subject: Your mailbox is {percent}% full\n"
        f"Date: {rfc5322Date(now, timezone)}\n"
        f"Message-ID: <{newMessageId(now)}.quota@{me}>\n"
        "Auto-Submitted: auto-generated\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        f"Your mailbox {address} uses {used}.\n"
        "Please delete some messages: mail that does not fit will be returned\n"
        "to its senders.\n"
    ).encode("ascii", "replace")
