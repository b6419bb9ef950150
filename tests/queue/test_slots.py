"""SlotQueue: FIFO under a global limit and per-key limits."""

from __future__ import annotations

from collections.abc import Hashable

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.queue.slots import SlotQueue


def limits(table: dict[str, int | None]) -> SlotQueue[str]:
    def keyLimit(key: Hashable) -> int | None:
        return table.get(str(key))

    return SlotQueue(4, keyLimit)


def takeAll(queue: SlotQueue[str]) -> list[str]:
    taken = []
    while (found := queue.take()) is not None:
        taken.append(found[1])
    return taken


class SlotQueueTests(SynchronousTestCase):
    def test_withoutKeyLimitsPlainFIFO(self) -> None:
        queue = limits({})
        for i, key in enumerate("aabcaa"):
            queue.add(key, f"{key}{i}")
        self.assertEqual(takeAll(queue), ["a0", "a1", "b2", "c3"])
        self.assertEqual((queue.running, queue.waiting), (4, 2))
        queue.release("a")
        self.assertEqual(takeAll(queue), ["a4"])
        queue.release("b")
        self.assertEqual(takeAll(queue), ["a5"])

    def test_saturatedKeyTakesNoGlobalSlot(self) -> None:
        queue = limits({"slow": 1})
        for i in range(6):
            queue.add("slow", f"slow{i}")
        queue.add("fast", "fast")
        self.assertEqual(takeAll(queue), ["slow0", "fast"])
        self.assertEqual((queue.running, queue.runningFor("slow")), (2, 1))
        queue.release("fast")
        self.assertEqual(takeAll(queue), [])
        queue.release("slow")
        self.assertEqual(takeAll(queue), ["slow1"])

    def test_oldestStartableJobFirst(self) -> None:
        queue = limits({"a": 2})
        for job in ["a0", "a1", "a2", "b0", "a3", "b1"]:
            queue.add(job[0], job)
        self.assertEqual(takeAll(queue), ["a0", "a1", "b0", "b1"])
        queue.release("b")
        queue.add("c", "c0")
        self.assertEqual(takeAll(queue), ["c0"])
        queue.release("a")
        queue.release("c")
        self.assertEqual(takeAll(queue), ["a2"])  # a3 waits for a's second slot
        queue.release("a")
        self.assertEqual(takeAll(queue), ["a3"])

    def test_globalLimitWaitsForAnyRelease(self) -> None:
        queue = limits({})
        for i in range(6):
            queue.add(str(i), f"j{i}")
        self.assertEqual(takeAll(queue), ["j0", "j1", "j2", "j3"])
        queue.release("2")
        self.assertEqual(takeAll(queue), ["j4"])

    def test_idleKeysAreForgotten(self) -> None:
        asked: list[Hashable] = []

        def keyLimit(key: Hashable) -> int | None:
            asked.append(key)
            return 1

        queue: SlotQueue[str] = SlotQueue(4, keyLimit)
        queue.add("a", "a0")
        queue.add("a", "a1")
        takeAll(queue)
        queue.release("a")
        takeAll(queue)
        queue.release("a")
        self.assertEqual(queue._keys, {})
        queue.add("a", "a2")
        self.assertEqual(asked, ["a", "a"])  # asked again once forgotten

    def test_clearKeepsRunningSlots(self) -> None:
        queue = limits({"a": 1})
        for i in range(3):
            queue.add("a", f"a{i}")
        queue.add("b", "b0")
        takeAll(queue)
        queue.clear()
        self.assertEqual((queue.running, queue.waiting), (2, 0))
        queue.release("a")
        queue.release("b")
        self.assertEqual(takeAll(queue), [])
        self.assertEqual((queue.running, queue._keys), (0, {}))

    def test_limitsBelowOneCountAsOne(self) -> None:
        queue: SlotQueue[str] = SlotQueue(0, lambda key: 0)
        queue.add("a", "a0")
        queue.add("a", "a1")
        self.assertEqual(takeAll(queue), ["a0"])
