"""The queue manager (qmail-send's job): schedule, deliver, retry, bounce.

New messages are scheduled the moment the store commits them; a start-up
scan recovers what a crash left. Each recipient belongs to a channel (local
or remote); an *attempt* delivers a message's due recipients of one channel,
in jobs (one per ``batchKey``: a domain, for remote delivery) that wait for
a slot under the channel's concurrency limit and the agent's ``batchLimit``
for their key; a job waiting for a saturated key (a slow domain) takes none
of the channel's slots, so it does not hold up other keys' jobs. When an
attempt ends, in this order: permanent failures are bounced (the bounce is
durable before anything else changes), delivered and bounced recipients are
marked done in the queue file (or the file is removed when nothing is left),
and temporary failures are rescheduled on qmail's retry schedule.

A crash between any two of these steps repeats work (a delivery or a
bounce) and never loses it.

Messages that another process linked into the queue (``qmailtx-queue``, run
by a QMAILQUEUE filter or a local program) are announced by id through the
store's arrivals (the trigger FIFO, or the store itself when a filter
accepted a message); ``pickUp`` loads and schedules those it does not know,
one look at a time, later requests folded into the next look.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable, Hashable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from qmailtx.address import Address
from qmailtx.delivery.interfaces import (
    DeliveryResult,
    IDeliveryAgent,
    Outcome,
    temporary,
)
from qmailtx.logging import logsafe
from qmailtx.queue.bounce import (
    BounceSettings,
    FailedRecipient,
    bounceKind,
    buildBounce,
)
from qmailtx.queue.disk import ScanResult
from qmailtx.queue.filter import QueueRefused
from qmailtx.queue.layout import DELIVERED, FAILED, TODO, QueuedMessage
from qmailtx.queue.schedule import GIVE_UP, isFinalAttempt, nextRetry
from qmailtx.queue.slots import SlotQueue
from qmailtx.queue.store import QueueStore

log = Logger()

HEADER_LIMIT = 64 * 1024
RELOOK_DELAY = 60  # seconds before looking again for queue files that could not be read


@dataclass(frozen=True)
class QueueSettings:
    concurrency: Mapping[str, int]
    lifetime: float
    bounce: BounceSettings


@dataclass
class _MessageState:
    message: QueuedMessage
    channels: list[str]  # per recipient
    busy: set[str] = field(default_factory=set)
    nextAttempt: dict[str, float] = field(default_factory=dict)
    lock: DeferredLock = field(default_factory=DeferredLock)


@dataclass
class _Attempt:
    state: _MessageState
    channel: str
    outstanding: int
    results: dict[int, DeliveryResult] = field(default_factory=dict)
    removed: bool = False  # the agent removed the finished queue file already


@dataclass
class _Job:
    attempt: _Attempt
    key: Hashable  # the agent's batchKey
    indices: list[int]


class QueueManager(Service):
    def __init__(
        self,
        reactor: IReactorTime,
        store: QueueStore,
        agents: Mapping[str, IDeliveryAgent],
        classify: Callable[[Address], str],
        settings: QueueSettings,
        confirmRemote: Callable[[frozenset[str]], Deferred[frozenset[str]]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.agents = dict(agents)
        self.classify = classify
        # ``classify`` answers from memory; ``confirmRemote(domains)``, when
        # given, says which of the domains it called remote are local after
        # all (a hosted domain added a moment ago, or before the in-memory
        # list was first loaded), asked before such a message is scheduled.
        self.confirmRemote = confirmRemote
        self._classifying: set[str] = set()
        self.settings = settings
        self.messages: dict[str, _MessageState] = {}
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        self._deliveryIds = itertools.count(1)
        self._timer: IDelayedCall | None = None
        self._relook: IDelayedCall | None = None  # another look for unreadable files
        # per channel: waiting jobs, and the slots (channel and key) taken
        self._slots: dict[str, SlotQueue[_Job]] = {
            channel: SlotQueue(settings.concurrency.get(channel, 1), agent.batchLimit)
            for channel, agent in self.agents.items()
        }
        self._idleWaiters: list[Deferred[None]] = []
        self._stopping = False
        self.recovered: Deferred[ScanResult] = Deferred()
        self._recoveryDone = False
        self._arrivals: set[str] = set()
        self._lookEverywhere = False
        self._picking = False
        self._endedWhilePicking: set[str] = set()
        store.addListener(self._committed)
        store.addArrivalListener(self.pickUp)

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._recoveryDone = False
        self.store.scan().addCallbacks(self._recovered, self._recoveryFailed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._relook is not None and self._relook.active():
            self._relook.cancel()
        self._relook = None
        for slots in self._slots.values():
            slots.clear()  # still queued on disk; taken up again at the next start
        return self.whenIdle().addCallback(self._forget)

    def _forget(self, _: object) -> None:
        """After a stop, keep nothing: a later start reads the queue afresh."""
        self.messages.clear()
        self._heap.clear()
        self._arrivals.clear()
        self._lookEverywhere = False
        self.recovered = Deferred()

    def whenIdle(self) -> Deferred[None]:
        """Fires when no delivery is running or being recorded."""
        if self._isIdle():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idleWaiters.append(d)
        return d

    def _isIdle(self) -> bool:
        return not any(slots.running for slots in self._slots.values())

    def _checkIdle(self) -> None:
        if self._isIdle():
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def _recovered(self, result: ScanResult) -> None:
        if result.removedTemporary:
            log.info(
                "recovery: removed {count} unfinished file(s) from queue/tmp",
                count=result.removedTemporary,
            )
        for name, reason in result.quarantined:
            log.warn(
                "recovery: queue file {msgid} is damaged ({reason}); moved to queue/corrupt",
                msgid=name,
                reason=reason,
            )
        for name, reason in result.unreadable:
            log.warn(
                "recovery: queue file {msgid} cannot be read now ({reason}); left in the"
                " queue, looking again in {delay} s",
                msgid=name,
                reason=reason,
                delay=RELOOK_DELAY,
            )
        if result.unreadable:
            self._relook = self.reactor.callLater(RELOOK_DELAY, self.pickUp, None)
        recovered = 0
        classifying = []
        for message in result.messages:
            if message.msgid not in self.messages:
                recovered += 1
                pending = self.add(message)
                if pending is not None:
                    classifying.append(pending)
        log.info("recovery: {count} message(s) in the queue", count=recovered)
        # ``recovered`` fires once every recovered message is scheduled.
        DeferredList(classifying).addCallback(lambda _: self._recoveryFinished(result))

    def _recoveryFinished(self, result: ScanResult) -> None:
        self._recoveryDone = True
        self.recovered.callback(result)
        self._pickUpNext()

    def _recoveryFailed(self, failure: Failure) -> None:
        log.failure("queue recovery failed; queued messages are not being delivered", failure)
        self._recoveryDone = True
        self.recovered.errback(failure)
        self._pickUpNext()

    # -- intake -------------------------------------------------------------

    def _committed(self, message: QueuedMessage) -> None:
        self.add(message)

    def add(self, message: QueuedMessage) -> Deferred[None] | None:
        """A committed message: log it and schedule what it still has to do.
        A Deferred when that waits for ``confirmRemote``: it fires once the
        message is scheduled."""
        if message.msgid in self.messages or message.msgid in self._classifying:
            return None
        channels = [self.classify(r) for r in message.recipients]
        doubtful = frozenset(
            r.domain.lower()
            for r, channel in zip(message.recipients, channels, strict=True)
            if channel == "remote"
        )
        if not doubtful or self.confirmRemote is None:
            self._addClassified(message, channels)
            return None
        self._classifying.add(message.msgid)
        d = self.confirmRemote(doubtful)

        def confirmed(local: frozenset[str]) -> None:
            for i, r in enumerate(message.recipients):
                if channels[i] == "remote" and r.domain.lower() in local:
                    channels[i] = "local"

        def unconfirmed(failure: Failure) -> None:
            log.failure(
                "msg {msgid}: cannot ask the user database which domains are hosted;"
                " delivering as classified",
                failure,
                msgid=message.msgid,
            )

        def classified(_: object) -> None:
            self._classifying.discard(message.msgid)
            if not self._stopping:
                self._addClassified(message, channels)

        done: Deferred[None] = d.addCallbacks(confirmed, unconfirmed)
        done.addCallback(classified).addErrback(self._bug, message.msgid)
        return done

    def _addClassified(self, message: QueuedMessage, channels: list[str]) -> None:
        if message.msgid in self.messages:
            return
        state = _MessageState(message, channels)
        self.messages[message.msgid] = state
        log.info("new msg {msgid}", msgid=message.msgid)
        log.info(
            "info msg {msgid}: bytes {bytes} from <{sender}> qp {qp} uid {uid}",
            msgid=message.msgid,
            bytes=message.messageLength,
            sender=str(message.sender),
            qp=message.info.get("s", "-"),
            uid=os.getuid(),
        )
        if not message.pending():
            Deferred.fromCoroutine(self._finish(state)).addErrback(self._bug, message.msgid)
            return
        now = self.reactor.seconds()
        when = max(now, message.nextAttempt or now)
        for channel in sorted(set(channels[i] for i in message.pending())):
            self._schedule(state, channel, when)

    def pickUp(self, msgids: AbstractSet[str] | None) -> None:
        """Messages another process linked into the queue: schedule those not
        known yet. ``None``: look through the whole queue for them.

        Looks wait for the start-up scan (which sees everything linked
        before it) and run one at a time; a message that ends while a look
        is running is not taken up again from that look's findings.
        """
        if msgids is None:
            self._lookEverywhere = True
        else:
            self._arrivals.update(m for m in msgids if m not in self.messages)
        self._pickUpNext()

    def _pickUpNext(self) -> None:
        if self._picking or self._stopping or not self._recoveryDone:
            return
        self._arrivals.difference_update(self.messages)
        self._arrivals.difference_update(self._classifying)
        if not self._lookEverywhere and not self._arrivals:
            return
        wanted = None if self._lookEverywhere else frozenset(self._arrivals)
        self._arrivals.clear()
        self._lookEverywhere = False
        self._picking = True
        self._endedWhilePicking = set()
        d = self.store.loadNew(wanted, frozenset(self.messages) | self._classifying)
        d.addCallbacks(self._pickedUp, self._pickUpFailed)
        d.addErrback(self._bug, "-")
        d.addBoth(self._pickUpDone)

    def _pickedUp(self, found: tuple[list[QueuedMessage], list[tuple[str, str]]]) -> None:
        messages, problems = found
        for name, reason in problems:
            log.warn("queue file {msgid} cannot be read ({reason})", msgid=name, reason=reason)
        for message in messages:
            if message.msgid not in self._endedWhilePicking:
                self.add(message)

    def _pickUpFailed(self, failure: Failure) -> None:
        log.failure("looking for newly queued messages failed", failure)

    def _pickUpDone(self, _: object) -> None:
        self._picking = False
        self._endedWhilePicking = set()
        self._pickUpNext()

    # -- scheduling -----------------------------------------------------------

    def _schedule(self, state: _MessageState, channel: str, when: float) -> None:
        state.nextAttempt[channel] = when
        if self._stopping:
            return
        if when <= self.reactor.seconds():
            self._startAttempt(state, channel)
            return
        heapq.heappush(self._heap, (when, next(self._seq), state.message.msgid, channel))
        self._armTimer()

    def _armTimer(self) -> None:
        if not self._heap or self._stopping:
            return
        when = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        delay = max(0.0, when - self.reactor.seconds())
        self._timer = self.reactor.callLater(delay, self._timerFired)

    def _timerFired(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        while self._heap and self._heap[0][0] <= now:
            when, _, msgid, channel = heapq.heappop(self._heap)
            state = self.messages.get(msgid)
            if state is not None and state.nextAttempt.get(channel) == when:
                self._startAttempt(state, channel)
        self._armTimer()

    def retryNow(self) -> None:
        """Try every deferred message now (qmail-send's SIGALRM), and look
        through the queue for files not taken up yet."""
        self.pickUp(None)
        now = self.reactor.seconds()
        for state in list(self.messages.values()):
            for channel in list(state.nextAttempt):
                self._schedule(state, channel, now)

    # -- delivery -------------------------------------------------------------

    def _startAttempt(self, state: _MessageState, channel: str) -> None:
        if channel in state.busy or self._stopping:
            return
        message = state.message
        pending = [i for i in message.pending() if state.channels[i] == channel]
        if not pending:
            return
        state.nextAttempt.pop(channel, None)
        state.busy.add(channel)
        agent = self.agents[channel]
        batches: dict[Hashable, list[int]] = {}
        for i in pending:
            batches.setdefault(agent.batchKey(message.recipients[i]), []).append(i)
        attempt = _Attempt(state, channel, outstanding=len(batches))
        slots = self._slots[channel]
        for key, indices in batches.items():
            slots.add(key, _Job(attempt, key, indices))
        self._pump(channel)

    def _pump(self, channel: str) -> None:
        """Start the waiting jobs that have room, oldest first; each takes a
        channel slot and one of its key's, kept until ``_releaseSlot``."""
        slots = self._slots[channel]
        while not self._stopping:
            taken = slots.take()
            if taken is None:
                return
            self._runJob(taken[1])

    def _runJob(self, job: _Job) -> None:
        attempt = job.attempt
        message = attempt.state.message
        delivery = next(self._deliveryIds)
        recipients = [message.recipients[i] for i in job.indices]
        log.info(
            "starting delivery {delivery}: msg {msgid} to {channel} {rcpt}",
            delivery=delivery,
            msgid=message.msgid,
            channel=attempt.channel,
            rcpt=",".join(str(r) for r in recipients),
        )
        agent = self.agents[attempt.channel]
        whenDelivered = None
        state = attempt.state
        if (
            attempt.outstanding == 1
            and state.busy == {attempt.channel}
            and len(job.indices) == len(message.pending())
        ):
            # This job finishes the message if it succeeds: let the agent
            # remove the queue file in the same worker trip.
            def whenDelivered() -> None:
                self.store.disk.remove(message)
                attempt.removed = True

        d = maybeDeferred(agent.deliver, message, recipients, whenDelivered)

        def crashed(failure: Failure) -> list[DeliveryResult]:
            log.failure(
                "delivery {delivery} of msg {msgid} crashed",
                failure,
                delivery=delivery,
                msgid=message.msgid,
            )
            return [temporary("Internal error in delivery; will try again. (#4.3.0)")] * len(
                recipients
            )

        d.addErrback(crashed)
        d.addCallback(self._jobDone, job, delivery)
        d.addErrback(self._bug, message.msgid)

    def _jobDone(self, results: list[DeliveryResult], job: _Job, delivery: int) -> None:
        """Record a job's results, then free its slots.

        The slots (the channel's and the key's) stay taken until the
        deliveries the job made are on disk (their recipients marked done,
        or the message removed), so a crash repeats at most as many
        deliveries as the channel's concurrency allows, and to one key at
        most as many as its ``batchLimit``.
        """
        attempt = job.attempt
        state = attempt.state
        if len(results) != len(job.indices):
            results = [temporary("Delivery agent gave no result. (#4.3.0)")] * len(job.indices)
        for index, result in zip(job.indices, results, strict=True):
            attempt.results[index] = result
            log.info(
                "delivery {delivery}: {outcome}: {text}",
                delivery=delivery,
                outcome=result.outcome.value,
                text=logsafe(result.text),
                msgid=attempt.state.message.msgid,
                rcpt=str(attempt.state.message.recipients[index]),
            )
        attempt.outstanding -= 1
        done = [i for i in job.indices if attempt.results[i].outcome is Outcome.DELIVERED]
        if attempt.outstanding == 0 and attempt.removed and not state.lock.locked:
            # The common case, done without Deferreds: every recipient
            # delivered and the agent removed the queue file already.
            for index in done:
                state.message.states[index] = DELIVERED
            state.busy.discard(attempt.channel)
            self._ended(state)
            self._releaseSlot(None, job)
            return
        if attempt.outstanding == 0:
            d = state.lock.run(self._finishAttempt, attempt)
        elif done:
            d = state.lock.run(self._markDelivered, state, done)
        else:
            d = succeed(None)
        d.addErrback(self._bug, state.message.msgid)
        d.addBoth(self._releaseSlot, job)

    def _releaseSlot(self, _: object, job: _Job) -> None:
        channel = job.attempt.channel
        self._slots[channel].release(job.key)
        self._pump(channel)
        self._checkIdle()

    def _markDelivered(self, state: _MessageState, indices: list[int]) -> Deferred[None]:
        message = state.message
        changes = {i: DELIVERED for i in indices if message.states[i] == TODO}
        for index in changes:
            message.states[index] = DELIVERED

        def failed(failure: Failure) -> None:
            log.failure(
                "could not record delivery state of msg {msgid}", failure, msgid=message.msgid
            )

        return self.store.mark(message, changes, None).addErrback(failed)

    def _finishAttempt(self, attempt: _Attempt) -> Deferred[None]:
        return Deferred.fromCoroutine(self._finishAttemptAsync(attempt))

    async def _finishAttemptAsync(self, attempt: _Attempt) -> None:
        state = attempt.state
        message = state.message
        now = self.reactor.seconds()
        final = isFinalAttempt(message.birth, now, self.settings.lifetime)
        changes: dict[int, str] = {}
        failed: list[tuple[int, str]] = []
        retry = False
        for index, result in sorted(attempt.results.items()):
            if result.outcome is Outcome.DELIVERED:
                if message.states[index] == TODO:
                    changes[index] = DELIVERED
            elif result.outcome is Outcome.PERMANENT:
                failed.append((index, result.text))
            elif final:
                failed.append((index, f"{result.text}\n{GIVE_UP}"))
            else:
                retry = True
        if failed:
            try:
                await self._bounce(message, failed, now)
            except QueueRefused as e:
                log.warn(
                    "bounce of msg {msgid} not queued: the queue filter said {reply};"
                    " will try again",
                    msgid=message.msgid,
                    reply=str(e.reply),
                )
                retry = True
            except Exception:
                # Could not queue the bounce (disk trouble): keep the recipients
                # to do, so the failure is found and bounced again later.
                log.failure("could not queue a bounce for msg {msgid}", msgid=message.msgid)
                retry = True
            else:
                changes.update((index, FAILED) for index, _ in failed)
        for index, letter in changes.items():
            message.states[index] = letter
        state.busy.discard(attempt.channel)
        nextTime = None
        if retry:
            nextTime = nextRetry(message.birth, now, attempt.channel, self.settings.lifetime)
        if not message.pending() and not state.busy:
            await self._finish(state, removed=attempt.removed)
            return
        if changes or nextTime is not None:
            try:
                await self.store.mark(message, changes, nextTime or now)
            except Exception:
                log.failure("could not record delivery state of msg {msgid}", msgid=message.msgid)
        if nextTime is not None:
            self._schedule(state, attempt.channel, nextTime)

    async def _finish(self, state: _MessageState, removed: bool = False) -> None:
        message = state.message
        if not removed:
            try:
                await self.store.remove(message)
            except Exception:
                log.failure("could not remove finished msg {msgid}", msgid=message.msgid)
        self._ended(state)

    def _ended(self, state: _MessageState) -> None:
        self.messages.pop(state.message.msgid, None)
        if self._picking:
            self._endedWhilePicking.add(state.message.msgid)
        log.info("end msg {msgid}", msgid=state.message.msgid)

    async def _bounce(
        self, message: QueuedMessage, failed: list[tuple[int, str]], now: float
    ) -> None:
        kind = bounceKind(message.sender)
        if kind == "triple":
            log.warn(
                "triple bounce: discarding msg {msgid}",
                msgid=message.msgid,
                rcpt=",".join(str(message.recipients[i]) for i, _ in failed),
            )
            return
        settings = self.settings.bounce
        header, _ = await self.store.readHeader(message, HEADER_LIMIT)
        whole = None
        if settings.bodyBytes and message.messageLength <= settings.bodyBytes:
            whole = await self.store.readMessage(message, settings.bodyBytes)
        bounce = buildBounce(
            settings,
            message.sender,
            [FailedRecipient(message.recipients[i], text) for i, text in failed],
            header,
            whole,
            arrival=message.birth,
            now=now,
        )
        try:
            queued = await self.store.inject(
                now, bounce.sender, bounce.recipients, bounce.content, {"b": message.msgid}
            )
        except QueueRefused as e:
            if not e.permanent:
                raise
            # The filter's final word: the bounce is dropped, as a filter that
            # discards mail would drop it (qmail-send would retry forever).
            log.warn(
                "bounce of msg {msgid} refused by the queue filter ({reply}); discarded",
                msgid=message.msgid,
                reply=str(e.reply),
            )
            return
        log.info("bounce msg {msgid} qp {bounce}", msgid=message.msgid, bounce=queued.msgid)

    def _bug(self, failure: Failure, msgid: str) -> None:
        log.failure("queue manager error on msg {msgid}", failure, msgid=msgid)
