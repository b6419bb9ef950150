"""QueueManager with a fake clock and scripted delivery agents."""

from __future__ import annotations

import email
import email.policy
import errno
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, capturedLogs, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qmailtx.address import Address
from qmailtx.control import buildControl
from qmailtx.delivery.interfaces import (
    DeliveryResult,
    IDeliveryAgent,
    Outcome,
    delivered,
    permanent,
    temporary,
)
from qmailtx.queue.bounce import BounceSettings, FailedRecipient, buildBounce
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import DELIVERED, FAILED, TODO, QueuedMessage
from qmailtx.queue.manager import RELOOK_DELAY, QueueManager, QueueSettings
from qmailtx.queue.store import Queued, QueueStore, synchronousRunner
from qmailtx.testing import ManualRunner, RecordingFileSystem

Script = Callable[[QueuedMessage, Address], DeliveryResult | Deferred[DeliveryResult]]


@implementer(IDeliveryAgent)
class ScriptedAgent:
    """Answers each recipient with ``script(message, recipient)``; records the calls."""

    def __init__(
        self,
        clock: MemoryReactorClock,
        script: Script,
        byDomain: bool = False,
        perKey: int | None = None,
    ) -> None:
        """``byDomain``: batch by domain (as remote delivery does), not by
        recipient; ``perKey``: what ``batchLimit`` answers."""
        self.clock = clock
        self.script = script
        self.byDomain = byDomain
        self.perKey = perKey
        self.calls: list[tuple[float, str, str]] = []
        self.active = 0
        self.maxActive = 0
        self.activeByKey: dict[object, int] = {}
        self.maxByKey: dict[object, int] = {}
        self.finalized = 0  # times the agent removed a finished queue file

    def batchKey(self, recipient: Address) -> object:
        return recipient.domain if self.byDomain else recipient

    def batchLimit(self, key: object) -> int | None:
        return self.perKey

    def deliver(
        self,
        message: QueuedMessage,
        recipients: list[Address],
        whenDelivered: Callable[[], None] | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        [recipient] = recipients
        self.calls.append((self.clock.seconds(), message.msgid, str(recipient)))
        result = self.script(message, recipient)

        def done(r: DeliveryResult) -> list[DeliveryResult]:
            if r.outcome is Outcome.DELIVERED and whenDelivered is not None:
                self.finalized += 1
                whenDelivered()
            return [r]

        if isinstance(result, Deferred):
            key = self.batchKey(recipient)
            self.active += 1
            self.maxActive = max(self.maxActive, self.active)
            self.activeByKey[key] = self.activeByKey.get(key, 0) + 1
            self.maxByKey[key] = max(self.maxByKey.get(key, 0), self.activeByKey[key])

            def left(r: DeliveryResult) -> DeliveryResult:
                self.active -= 1
                self.activeByKey[key] -= 1
                return r

            return result.addCallback(left).addCallback(done)
        return succeed(done(result))


def bounceSettings() -> BounceSettings:
    return BounceSettings(
        me="mx.test",
        bouncefrom="MAILER-DAEMON",
        bouncehost="mx.test",
        doublebounceto="postmaster",
        doublebouncehost="mx.test",
        bouncesubject="failure notice",
        bouncemessage="Hi. This is the qmail-send program at {host}.\nSorry.\n",
        doublebouncesubject="failure notice",
        doublebouncemessage="Hi. This is the qmail-send program at {host}.\nBounce bounced!\n",
    )


class ManagerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        # Real time: queue files carry real mtimes, read back as next-attempt times.
        # (whole seconds: the queue stores birth times in seconds)
        self.clock.advance(int(time.time()))
        self.events: list[tuple[str, str]] = []
        self.fs = RecordingFileSystem(self.events)
        self.disk = QueueDisk(self.mktemp(), self.fs)
        self.disk.create()
        self.store = QueueStore(self.disk, synchronousRunner)
        self.logs: list[LogEvent] = []
        observer = cast(ILogObserver, self.logs.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def makeManager(
        self,
        local: Script,
        remote: Script | None = None,
        concurrency: int = 10,
        lifetime: float = 604800,
        remoteConcurrency: int | None = None,
        remoteByDomain: bool = False,
        remotePerDomain: int | None = None,
        confirmRemote: Callable[[frozenset[str]], Deferred[frozenset[str]]] | None = None,
    ) -> QueueManager:
        self.local = ScriptedAgent(self.clock, local)
        self.remote = ScriptedAgent(
            self.clock,
            remote or (lambda m, r: temporary("later (#4.4.1)")),
            byDomain=remoteByDomain or remotePerDomain is not None,
            perKey=remotePerDomain,
        )
        verifyObject(IDeliveryAgent, self.local)
        manager = QueueManager(
            self.clock,
            self.store,
            {"local": self.local, "remote": self.remote},
            lambda r: "local" if r.domain in ("mx.test", "localhost") else "remote",
            QueueSettings(
                {"local": concurrency, "remote": remoteConcurrency or concurrency},
                lifetime,
                bounceSettings(),
            ),
            confirmRemote,
        )
        manager.startService()
        self.addCleanup(manager.stopService)
        return manager

    def inject(self, sender: str, *recipients: str, body: bytes = b"Subject: t\n\nbody\n") -> str:
        message = self.store.inject(
            self.clock.seconds(),
            Address.fromStored(sender),
            [Address.fromStored(r) for r in recipients],
            body,
            {},
        )
        result: list[Queued] = []
        message.addCallback(result.append)
        return result[0].msgid

    def queuedMessages(self) -> list[QueuedMessage]:
        return self.disk.scan().messages

    def logText(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logs]


def held() -> tuple[list[Deferred[DeliveryResult]], Script]:
    """A script whose deliveries wait until the test fires their Deferreds."""
    pending: list[Deferred[DeliveryResult]] = []

    def hold(m: QueuedMessage, r: Address) -> Deferred[DeliveryResult]:
        d: Deferred[DeliveryResult] = Deferred()
        pending.append(d)
        return d

    return pending, hold


def parseBounce(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


class DeliveryTests(ManagerTestCase):
    def test_newMessageDeliveredAtOnceAndRemoved(self) -> None:
        manager = self.makeManager(lambda m, r: delivered("did 0+0+1/"))
        msgid = self.inject("a@b.example", "u@mx.test")
        self.assertEqual(self.local.calls, [(self.clock.seconds(), msgid, "u@mx.test")])
        self.assertEqual(self.queuedMessages(), [])
        self.assertEqual(self.local.finalized, 1)  # removed in the delivery's own trip
        self.assertNotIn(msgid, manager.messages)
        text = self.logText()
        self.assertIn(f"new msg {msgid}", text)
        self.assertIn("delivery 1: success: did_0+0+1/", text)
        self.assertIn(f"end msg {msgid}", text)

    def test_temporaryFailuresFollowTheQmailSchedule(self) -> None:
        self.makeManager(lambda m, r: temporary("busy (#4.2.1)"))
        birth = self.clock.seconds()
        self.inject("a@b.example", "u@mx.test")
        for _ in range(5):
            self.clock.advance(self.remainingToNextCall())
        self.assertEqual(
            [t - birth for t, _, _ in self.local.calls], [0, 100, 400, 900, 1600, 2500]
        )
        [message] = self.queuedMessages()
        self.assertEqual(message.states, [TODO])

    def remainingToNextCall(self) -> float:
        calls = self.clock.getDelayedCalls()
        return min(c.getTime() for c in calls) - self.clock.seconds()

    def test_remoteScheduleUsesItsOwnSkip(self) -> None:
        self.makeManager(lambda m, r: delivered("ok"))
        birth = self.clock.seconds()
        self.inject("a@b.example", "u@remote.example")
        for _ in range(3):
            self.clock.advance(self.remainingToNextCall())
        self.assertEqual([t - birth for t, _, _ in self.remote.calls], [0, 400, 1600, 3600])

    def test_concurrencyLimitIsNeverExceeded(self) -> None:
        pending, hold = held()
        self.makeManager(hold, concurrency=3)
        for i in range(10):
            self.inject("a@b.example", f"u{i}@mx.test")
        self.assertEqual(len(pending), 3)
        while pending:
            pending.pop(0).callback(delivered("ok"))
        self.assertEqual(self.local.maxActive, 3)
        self.assertEqual(len(self.local.calls), 10)
        self.assertEqual(self.queuedMessages(), [])

    def test_stopWaitsForRunningDeliveries(self) -> None:
        pending, hold = held()
        manager = self.makeManager(hold)
        self.inject("a@b.example", "u@mx.test")
        stopped: list[None] = []
        manager.stopService().addCallback(stopped.append)
        self.assertEqual(stopped, [])
        pending[0].callback(delivered("ok"))
        self.assertEqual(stopped, [None])


class BounceTests(ManagerTestCase):
    def bounces(self) -> list[QueuedMessage]:
        return [m for m in self.queuedMessages() if m.info.get("b")]

    def test_permanentFailureBouncesToTheSender(self) -> None:
        def script(m: QueuedMessage, r: Address) -> DeliveryResult:
            if r.local == "nobody":
                return permanent("Sorry, no mailbox here by that name. (#5.1.1)")
            return delivered("ok") if r.domain == "mx.test" else temporary("no route (#4.4.1)")

        # the sender is remote, so its bounce stays queued where we can read it
        self.makeManager(script)
        msgid = self.inject(
            "a@b.example",
            "u@mx.test",
            "nobody@mx.test",
            "r@remote.example",
            body=b"Subject: original\n\nsecret body\n",
        )
        [bounce] = self.bounces()
        self.assertEqual(bounce.sender, Address.null())
        self.assertEqual(bounce.recipients, [Address("a", "b.example")])
        parsed = parseBounce(self.disk.readMessage(bounce, 100000))
        self.assertEqual(parsed["To"], "a@b.example")
        self.assertEqual(parsed["Subject"], "failure notice")
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed.get_param("report-type"), "delivery-status")
        human, status, original = parsed.iter_parts()
        text = human.get_content()
        self.assertTrue(text.startswith("Hi. This is the qmail-send program at mx.test.\n"))
        self.assertIn("<nobody@mx.test>:\nSorry, no mailbox here by that name. (#5.1.1)\n", text)
        self.assertIn("\n--- Below this line is the header of the message.\n", text)
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        fields = str(status)
        self.assertIn("Final-Recipient: rfc822; nobody@mx.test", fields)
        self.assertIn("Status: 5.1.1", fields)
        self.assertIn("Action: failed", fields)
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        self.assertIn(b"Subject: original", original.as_bytes())
        self.assertNotIn(b"secret body", original.as_bytes())
        [orig] = [m for m in self.queuedMessages() if m.msgid == msgid]
        self.assertEqual(orig.states, [DELIVERED, FAILED, TODO])
        self.assertIn(f"bounce msg {msgid} qp {bounce.msgid}", self.logText())

    def test_bounceIsDurableBeforeTheOriginalIsMarked(self) -> None:
        def script(m: QueuedMessage, r: Address) -> DeliveryResult:
            return permanent("no (#5.1.1)") if r.local == "x" else temporary("later (#4.2.1)")

        self.makeManager(script)
        del self.events[:]
        msgid = self.inject("a@b.example", "x@mx.test", "y@mx.test")
        ops = [(op, path) for op, path in self.events if op in ("link", "fsyncdir", "fsync")]
        bounceLink = next(i for i, (op, p) in enumerate(ops) if op == "link" and msgid not in p)
        bounceDirSync = next(
            i for i, (op, _) in enumerate(ops) if op == "fsyncdir" and i > bounceLink
        )
        markSync = max(i for i, (op, p) in enumerate(ops) if op == "fsync" and msgid in p)
        self.assertLess(bounceDirSync, markSync)

    def test_nullSenderFailureGoesToThePostmaster(self) -> None:
        self.makeManager(
            lambda m, r: permanent("no (#5.1.1)") if r.local == "x" else temporary("x (#4.3.0)")
        )
        self.inject("", "x@mx.test")
        [bounce] = self.bounces()
        self.assertEqual(bounce.sender, Address("#", "[]"))
        self.assertEqual(bounce.recipients, [Address("postmaster", "mx.test")])
        text = self.disk.readMessage(bounce, 100000)
        self.assertIn(b"Bounce bounced!", text)
        self.assertIn(b"--- Below this line is the original bounce.", text)

    def test_doubleBounceFailureIsDiscarded(self) -> None:
        self.makeManager(lambda m, r: permanent("no (#5.1.1)"))
        msgid = self.inject("#@[]", "postmaster@mx.test")
        self.assertEqual(self.queuedMessages(), [])
        self.assertIn(f"triple bounce: discarding msg {msgid}", self.logText())

    def test_bounceToANullSenderNeverLoops(self) -> None:
        """A failing bounce makes one double bounce; a failing double bounce ends it."""
        self.makeManager(lambda m, r: permanent("no (#5.1.1)"))
        self.inject("a@mx.test", "x@mx.test")
        self.assertEqual(self.queuedMessages(), [])
        # x, then a (the bounce), then postmaster (the double bounce), then nothing
        self.assertEqual(
            [r for _, _, r in self.local.calls], ["x@mx.test", "a@mx.test", "postmaster@mx.test"]
        )
        self.assertEqual(sum("triple bounce" in t for t in self.logText()), 1)

    def test_queueLifetimeTurnsDeferralsIntoOneBounce(self) -> None:
        self.makeManager(lambda m, r: temporary("Sorry, busy. (#4.2.1)"), lifetime=3600)
        birth = self.clock.seconds()
        msgid = self.inject("a@b.example", "u@mx.test")
        while msgid in [m.msgid for m in self.queuedMessages()]:
            self.clock.advance(self.remainingToNextCall())
        times = [t - birth for t, m, _ in self.local.calls if m == msgid]
        self.assertEqual(times, [0, 100, 400, 900, 1600, 2500, 3600])
        [bounce] = self.bounces()
        text = self.disk.readMessage(bounce, 100000)
        self.assertIn(
            b"Sorry, busy. (#4.2.1)\nI'm not going to try again; "
            b"this message has been in the queue too long.\n",
            text,
        )

    def remainingToNextCall(self) -> float:
        return min(c.getTime() for c in self.clock.getDelayedCalls()) - self.clock.seconds()

    def test_bounceThatCannotBeQueuedIsRetried(self) -> None:
        held: list[Deferred[DeliveryResult]] = []

        def script(m: QueuedMessage, r: Address) -> Deferred[DeliveryResult]:
            held.append(Deferred())
            return held[-1]

        self.makeManager(script)
        msgid = self.inject("a@b.example", "x@mx.test")
        self.fs.failOn["fsyncdir"] = errno.ENOSPC
        held.pop().callback(permanent("no (#5.1.1)"))
        self.flushLoggedErrors(OSError)
        [message] = self.queuedMessages()
        self.assertEqual((message.msgid, message.states), (msgid, [TODO]))
        self.clock.advance(100)
        held.pop().callback(permanent("no (#5.1.1)"))
        [bounce] = self.queuedMessages()
        self.assertEqual(bounce.info.get("b"), msgid)


class RecoveryTests(ManagerTestCase):
    def test_startupPicksUpQueuedMessages(self) -> None:
        waiting = [
            self.disk.inject(
                self.clock.seconds(),
                Address("a", "b.example"),
                [Address("u", "mx.test"), Address("v", "mx.test")],
                b"x\n",
                {},
            )
            for _ in range(3)
        ]
        self.disk.mark(waiting[0], {0: DELIVERED}, self.clock.seconds())
        for message in waiting[1:]:
            self.disk.setNextAttempt(message, self.clock.seconds())
        self.makeManager(lambda m, r: delivered("ok"))
        self.assertEqual(len(self.local.calls), 5)
        self.assertEqual(self.queuedMessages(), [])

    def test_fileUnreadableAtStartUpIsLookedForAgain(self) -> None:
        self.disk.inject(
            self.clock.seconds(), Address("a", "b.example"), [Address("u", "mx.test")], b"x\n", {}
        )
        self.fs.failOn["openRead"] = errno.EIO
        with capturedLogs() as events:
            self.makeManager(lambda m, r: delivered("ok"))
        self.assertEqual(self.local.calls, [])
        self.assertTrue(
            any("cannot be read now" in formatEvent(e) for e in events),
            [formatEvent(e) for e in events],
        )
        self.clock.advance(RELOOK_DELAY)
        self.assertEqual(len(self.local.calls), 1)
        self.assertEqual(self.queuedMessages(), [])

    def test_nextAttemptSurvivesARestart(self) -> None:
        message = self.disk.inject(
            self.clock.seconds(), Address("a", "b.example"), [Address("u", "mx.test")], b"x\n", {}
        )
        self.disk.mark(message, {}, self.clock.seconds() + 500)
        self.makeManager(lambda m, r: delivered("ok"))
        self.assertEqual(self.local.calls, [])
        self.clock.advance(500)
        self.assertEqual(len(self.local.calls), 1)


class CrashWindowTests(ManagerTestCase):
    def test_slotIsHeldUntilTheDeliveryIsRecorded(self) -> None:
        """Finished-but-unrecorded deliveries count against the concurrency limit,
        so a crash can repeat at most `concurrency` deliveries."""
        runner = ManualRunner()
        self.store = QueueStore(self.disk, runner)
        manager = self.makeManager(lambda m, r: delivered("ok"), concurrency=2)
        for i in range(3):
            message = self.disk.inject(
                self.clock.seconds(),
                Address("a", "b.example"),
                [Address(f"u{i}", "mx.test"), Address(f"v{i}", "mx.test")],
                b"x\n",
                {},
            )
            manager.add(message)
        self.assertEqual(len(self.local.calls), 2)  # both slots busy recording
        while runner.pending:
            runner.runOne()
            deliveredTo = {rcpt for _, _, rcpt in self.local.calls}
            stillToDo = {
                str(r)
                for m in self.disk.scan().messages
                for r, state in zip(m.recipients, m.states, strict=True)
                if state == TODO
            }
            self.assertLessEqual(len(deliveredTo & stillToDo), 2)
        self.assertEqual(len(self.local.calls), 6)
        self.assertEqual(self.disk.scan().messages, [])


class PerKeyLimitTests(ManagerTestCase):
    """The agent's ``batchLimit`` is enforced by the queue manager: a job
    waiting for a saturated key holds none of the channel's slots."""

    def slowThenFast(
        self, slow: int = 6
    ) -> tuple[QueueManager, list[Deferred[DeliveryResult]], list[str]]:
        pending, hold = held()
        manager = self.makeManager(
            lambda m, r: delivered("ok"), hold, remoteConcurrency=4, remotePerDomain=1
        )
        msgids = [self.inject("a@mx.test", f"u{i}@slow.example") for i in range(slow)]
        msgids.append(self.inject("a@mx.test", "u@fast.example"))
        return manager, pending, msgids

    def started(self) -> list[tuple[str, str]]:
        return [(msgid, rcpt.split("@")[1]) for _, msgid, rcpt in self.remote.calls]

    def test_slowDomainDoesNotStarveTheOthers(self) -> None:
        _, pending, msgids = self.slowThenFast()
        # slow.example's first delivery is still running, fast.example's started
        self.assertEqual(
            self.started(), [(msgids[0], "slow.example"), (msgids[-1], "fast.example")]
        )
        self.assertEqual(self.remote.activeByKey, {"slow.example": 1, "fast.example": 1})
        pending[1].callback(delivered("ok"))  # fast.example done: slow.example still waits
        self.assertEqual(len(self.remote.calls), 2)
        self.assertEqual(self.remote.maxByKey["slow.example"], 1)

    def test_nextJobOfTheDomainStartsInOrder(self) -> None:
        _, pending, msgids = self.slowThenFast()
        pending.pop(1).callback(delivered("ok"))  # fast.example
        while pending:
            self.assertEqual(self.remote.activeByKey["slow.example"], 1)
            pending.pop(0).callback(delivered("ok"))
        slow = [msgid for msgid, domain in self.started() if domain == "slow.example"]
        self.assertEqual(slow, msgids[:-1])
        self.assertEqual(self.remote.maxByKey["slow.example"], 1)
        self.assertEqual(self.queuedMessages(), [])

    def test_oldestStartableJobTakesAFreedSlot(self) -> None:
        _, pending, msgids = self.slowThenFast()
        others = [self.inject("a@mx.test", f"u@d{i}.example") for i in range(3)]
        # 4 slots: slow.example, fast.example and the first two others
        self.assertEqual(
            self.started(),
            [
                (msgids[0], "slow.example"),
                (msgids[-1], "fast.example"),
                (others[0], "d0.example"),
                (others[1], "d1.example"),
            ],
        )
        pending[0].callback(delivered("ok"))  # slow.example's next is older than d2's
        self.assertEqual(self.started()[-1], (msgids[1], "slow.example"))
        pending[1].callback(delivered("ok"))  # fast.example: slow.example is busy, d2 goes
        self.assertEqual(self.started()[-1], (others[2], "d2.example"))
        self.assertEqual(self.remote.active, 4)

    def test_withoutAKeyLimitOnlyTheChannelLimitCounts(self) -> None:
        pending, hold = held()
        self.makeManager(
            lambda m, r: delivered("ok"), hold, remoteConcurrency=4, remoteByDomain=True
        )
        msgids = [self.inject("a@mx.test", f"u{i}@slow.example") for i in range(6)]
        fast = self.inject("a@mx.test", "u@fast.example")
        self.assertEqual(self.remote.activeByKey, {"slow.example": 4})
        while pending:
            pending.pop(0).callback(delivered("ok"))
        self.assertEqual([msgid for _, msgid, _ in self.remote.calls], [*msgids, fast])
        self.assertEqual(self.remote.maxActive, 4)
        self.assertEqual(self.queuedMessages(), [])

    def test_stopWaitsForRunningJobsOnly(self) -> None:
        manager, pending, msgids = self.slowThenFast()
        stopped: list[None] = []
        manager.stopService().addCallback(stopped.append)
        pending[0].callback(delivered("ok"))
        self.assertEqual(stopped, [])
        pending[1].callback(delivered("ok"))
        self.assertEqual(stopped, [None])
        self.assertEqual(len(self.remote.calls), 2)  # the waiting ones stay queued
        self.assertEqual(len(self.queuedMessages()), len(msgids) - 2)

    def test_slotsAreHeldUntilTheDeliveryIsRecorded(self) -> None:
        """A finished-but-unrecorded delivery keeps its domain's slot (and
        its channel slot), so a crash repeats at most ``batchLimit``
        deliveries to one domain."""
        runner = ManualRunner()
        self.store = QueueStore(self.disk, runner)
        manager = self.makeManager(
            lambda m, r: delivered("ok"),
            lambda m, r: delivered("ok"),
            remoteConcurrency=4,
            remotePerDomain=1,
        )
        for i in range(3):
            # two jobs per message: its file is marked, not removed, by the agent
            message = self.disk.inject(
                self.clock.seconds(),
                Address("a", "b.example"),
                [Address(f"u{i}", "slow.example"), Address(f"v{i}", f"d{i}.example")],
                b"x\n",
                {},
            )
            manager.add(message)
        # slow.example's first ran and the others' (which wait for the disk
        # holding their slots); slow.example's next two wait holding none
        self.assertEqual(
            [rcpt for _, _, rcpt in self.remote.calls],
            ["u0@slow.example", "v0@d0.example", "v1@d1.example", "v2@d2.example"],
        )
        while runner.pending:
            runner.runOne()
            calls = [rcpt for _, _, rcpt in self.remote.calls]
            stillToDo = {
                str(r)
                for m in self.disk.scan().messages
                for r, state in zip(m.recipients, m.states, strict=True)
                if state == TODO
            }
            unrecorded = set(calls) & stillToDo
            self.assertLessEqual(len(unrecorded), 4)
            self.assertLessEqual(len({r for r in unrecorded if r.endswith("@slow.example")}), 1)
        self.assertEqual(len(self.remote.calls), 6)
        self.assertEqual(self.disk.scan().messages, [])


class RetryNowTests(ManagerTestCase):
    def test_retryNowTriesDeferredMessagesAtOnce(self) -> None:
        manager = self.makeManager(lambda m, r: temporary("busy (#4.2.1)"))
        self.inject("a@b.example", "u@mx.test")
        self.clock.advance(10)
        self.assertEqual(len(self.local.calls), 1)
        manager.retryNow()
        self.assertEqual(len(self.local.calls), 2)

    def test_retryNowLooksForFilesNotTakenUpYet(self) -> None:
        manager = self.makeManager(lambda m, r: delivered("ok"))
        # Linked by another process whose wake-up got lost.
        self.disk.inject(
            self.clock.seconds(), Address("a", "b.example"), [Address("u", "mx.test")], b"x\n", {}
        )
        self.assertEqual(self.local.calls, [])
        manager.retryNow()
        self.assertEqual(len(self.local.calls), 1)

    def test_sigalrmHandlerCallsRetryNow(self) -> None:
        from qmailtx.tap import flushOnSignal

        calls: list[object] = []

        class FakeReactor:
            def callFromThread(self, f: Callable[[], None]) -> None:
                calls.append(f)

        def retry() -> None:
            pass

        flushOnSignal(FakeReactor(), retry)(14, None)  # type: ignore[arg-type]
        self.assertEqual(calls, [retry])


class ConfirmRemoteTests(ManagerTestCase):
    """A domain the in-memory classification calls remote may be hosted after
    all (added a moment ago, or not loaded yet): the database is asked."""

    def test_domainFoundHostedIsDeliveredLocally(self) -> None:
        asked: list[frozenset[str]] = []

        def confirm(domains: frozenset[str]) -> Deferred[frozenset[str]]:
            asked.append(domains)
            return succeed(frozenset({"new.example"}))

        self.makeManager(lambda m, r: delivered("ok"), confirmRemote=confirm)
        self.inject("a@b.example", "u@new.example", "v@far.example", "w@mx.test")
        self.assertEqual(asked, [frozenset({"new.example", "far.example"})])
        self.assertEqual(sorted(r for _, _, r in self.local.calls), ["u@new.example", "w@mx.test"])
        self.assertEqual([r for _, _, r in self.remote.calls], ["v@far.example"])

    def test_onlyLocalRecipientsNeedNoQuestion(self) -> None:
        asked: list[frozenset[str]] = []

        def confirm(domains: frozenset[str]) -> Deferred[frozenset[str]]:
            asked.append(domains)
            return succeed(frozenset())

        self.makeManager(lambda m, r: delivered("ok"), confirmRemote=confirm)
        self.inject("a@b.example", "w@mx.test")
        self.assertEqual((asked, len(self.local.calls)), ([], 1))

    def test_nothingIsScheduledUntilTheAnswerAndNothingTwice(self) -> None:
        answers: list[Deferred[frozenset[str]]] = []

        def confirm(domains: frozenset[str]) -> Deferred[frozenset[str]]:
            d: Deferred[frozenset[str]] = Deferred()
            answers.append(d)
            return d

        manager = self.makeManager(lambda m, r: delivered("ok"), confirmRemote=confirm)
        msgid = self.inject("a@b.example", "u@new.example")
        manager.pickUp(None)  # a look through the queue meanwhile
        manager.add(self.disk.scan().messages[0])  # announced twice
        self.assertEqual((self.local.calls, self.remote.calls, len(answers)), ([], [], 1))
        self.assertNotIn(msgid, manager.messages)
        answers[0].callback(frozenset({"new.example"}))
        self.assertEqual(len(self.local.calls), 1)
        self.assertEqual(self.remote.calls, [])

    def test_unansweredQuestionKeepsTheClassification(self) -> None:
        def confirm(domains: frozenset[str]) -> Deferred[frozenset[str]]:
            return fail(RuntimeError("database down"))

        self.makeManager(lambda m, r: delivered("ok"), confirmRemote=confirm)
        self.inject("a@b.example", "u@far.example")
        self.assertEqual(len(self.remote.calls), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class PickUpTests(ManagerTestCase):
    """Messages another process (qmailtx-queue) linked into the queue."""

    def linked(self, *recipients: str) -> QueuedMessage:
        """A message on disk that the manager was not told about."""
        message = self.disk.inject(
            self.clock.seconds(),
            Address("a", "b.example"),
            [Address.fromStored(r) for r in recipients],
            b"x\n",
            {},
        )
        self.disk.setNextAttempt(message, self.clock.seconds())  # due now on the test clock
        return message

    def test_arrivalByIdIsDelivered(self) -> None:
        self.makeManager(lambda m, r: delivered("ok"))
        message = self.linked("u@mx.test")
        self.assertEqual(self.local.calls, [])
        self.store.arrived({message.msgid})
        self.assertEqual([c[1:] for c in self.local.calls], [(message.msgid, "u@mx.test")])
        self.assertEqual(self.queuedMessages(), [])

    def test_lookEverywhere(self) -> None:
        self.makeManager(lambda m, r: delivered("ok"))
        first, second = self.linked("u@mx.test"), self.linked("v@mx.test")
        self.store.arrived(None)
        self.assertEqual(
            sorted(c[1] for c in self.local.calls), sorted([first.msgid, second.msgid])
        )

    def test_knownAndUnknownIdsAreSkipped(self) -> None:
        pending, hold = held()
        manager = self.makeManager(hold)
        msgid = self.inject("a@b.example", "u@mx.test")
        self.store.arrived({msgid, "66aa0000000000", "../../etc"})
        self.store.arrived(None)
        self.assertEqual(len(self.local.calls), 1)
        self.assertEqual(list(manager.messages), [msgid])
        pending[0].callback(delivered("ok"))

    def test_waitsForTheStartupScan(self) -> None:
        runner = ManualRunner()
        self.store = QueueStore(self.disk, runner)
        message = self.linked("u@mx.test")
        manager = self.makeManager(lambda m, r: delivered("ok"))
        self.store.arrived({message.msgid})
        self.assertEqual(len(runner.pending), 1)  # the start-up scan only
        runner.runOne()
        while runner.pending:
            runner.runOne()
        self.assertEqual(len(self.local.calls), 1)
        self.assertEqual(manager.messages, {})

    def test_oneLookAtATimeLaterRequestsFolded(self) -> None:
        runner = ManualRunner()
        self.store = QueueStore(self.disk, runner)
        self.makeManager(lambda m, r: temporary("later"))
        runner.runOne()  # start-up scan
        a, b, c = self.linked("u@mx.test"), self.linked("v@mx.test"), self.linked("w@mx.test")
        self.store.arrived({a.msgid})
        self.store.arrived({b.msgid})
        self.store.arrived({c.msgid})
        [(f, args, _)] = runner.pending
        self.assertEqual(args[0], frozenset({a.msgid}))
        runner.runOne()
        loads = [args for f, args, _ in runner.pending if f == self.disk.loadNew]
        self.assertEqual([args[0] for args in loads], [frozenset({b.msgid, c.msgid})])
        while runner.pending:
            runner.runOne()
        self.assertEqual(
            sorted(call[1] for call in self.local.calls), sorted([a.msgid, b.msgid, c.msgid])
        )

    def test_messageThatEndedDuringALookIsNotTakenUpAgain(self) -> None:
        """The look read the file before the delivery removed it: no second delivery."""
        runner = ManualRunner()
        self.store = QueueStore(self.disk, runner)
        manager = self.makeManager(lambda m, r: delivered("ok"))
        runner.runOne()  # start-up scan
        message = self.linked("u@mx.test")
        self.store.arrived(None)
        look = runner.pending.pop(0)
        found = look[0](*look[1])  # the look reads the file...
        manager.add(message)  # ...while the message is being delivered through another path
        while runner.pending:
            runner.runOne()
        self.assertEqual(manager.messages, {})
        self.assertEqual(self.queuedMessages(), [])
        look[2].callback(found)
        self.assertEqual(len(self.local.calls), 1)
        self.assertEqual(manager.messages, {})


class BounceDateTests(SynchronousTestCase):
    def test_datesInTheConfiguredZone(self) -> None:
        control = buildControl({"me": "mx.test"}, {}, "test")
        settings = BounceSettings.fromControl(control, 0, "Asia/Kolkata")
        bounce = buildBounce(
            settings,
            Address("a", "b.example"),
            [FailedRecipient(Address("x", "mx.test"), "Sorry. (#5.1.1)")],
            b"Subject: hi\n",
            None,
            arrival=0.0,
            now=0.0,
        )
        self.assertIn(b"Date: Thu, 01 Jan 1970 05:30:00 +0530\n", bounce.content)
        self.assertIn(b"Arrival-Date: Thu, 01 Jan 1970 05:30:00 +0530\n", bounce.content)


class BounceAppearanceTests(SynchronousTestCase):
    """P8 (bounce subject and text from the control settings) and P16 (the body left out)."""

    def bounce(self, control: dict[str, object], whole: bytes | None) -> list[EmailMessage]:
        settings = BounceSettings.fromControl(buildControl({"me": "mx.test", **control}, {}, "t"))
        made = buildBounce(
            settings,
            Address("a", "b.example"),
            [FailedRecipient(Address("x", "mx.test"), "Sorry. (#5.1.1)")],
            b"Subject: hi\nFrom: a@b.example\n",
            whole,
            arrival=0.0,
            now=0.0,
        )
        parsed = email.message_from_bytes(made.content, policy=email.policy.default)
        self.subject = str(parsed["Subject"])
        return cast(list[EmailMessage], parsed.get_payload())

    def test_subjectAndIntroductionFromTheControlSettings(self) -> None:
        parts = self.bounce(
            {"bouncesubject": "Undeliverable", "bouncemessage": "This is {host}. No luck.\n"},
            None,
        )
        self.assertEqual(self.subject, "Undeliverable")
        text = parts[0].get_content()
        self.assertTrue(text.startswith("This is mx.test. No luck.\n"), text)

    def test_headersOnlyUnlessTheWholeMessageIsGiven(self) -> None:
        headersOnly = self.bounce({}, None)[2]
        self.assertEqual(headersOnly.get_content_type(), "text/rfc822-headers")
        self.assertNotIn("body text", headersOnly.as_string())
        original = self.bounce({}, b"Subject: hi\nFrom: a@b.example\n\nbody text\n")[2]
        self.assertEqual(original.get_content_type(), "message/rfc822")
        self.assertIn("body text", original.as_string())
