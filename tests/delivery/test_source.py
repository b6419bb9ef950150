"""Remote delivery from a real queue file: measured and streamed in worker
threads, the next destination reading the message from the start."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, succeed

from qmailtx.address import Address
from qmailtx.delivery.interfaces import Outcome
from qmailtx.delivery.mx import Destination
from qmailtx.delivery.remote import RemoteDeliveryAgent, RemoteSettings
from qmailtx.delivery.routes import Route
from qmailtx.delivery.source import measureQueuedMessage, openQueuedMessage
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.smtp.source import CHUNK_SIZE
from qmailtx.smtp.wire import measureWire, wireMessage
from qmailtx.workers import WorkerPool
from tests.smtp.test_client import ClientTestCase, FakeMX, reactor
from tests.smtp.test_streaming import BigMX, bigMessage

SENDER = Address("alice", "ours.test")
RCPT = Address("bob", "example.org")


class Busy(FakeMX):
    greeting = b"421 4.3.2 busy, try later\r\n"


class QueueFileSourceTests(ClientTestCase):
    def setUp(self) -> None:
        self.disk = QueueDisk(self.mktemp())
        self.disk.create()
        self.pool = WorkerPool(reactor, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def queue(self, content: bytes) -> QueuedMessage:
        return self.disk.inject(1000.0, SENDER, [RCPT], content, {})

    def agent(self, destinations: list[Destination]) -> RemoteDeliveryAgent:
        self.jobs: list[str] = []

        def run(f: Any, *args: Any) -> Deferred[Any]:
            self.jobs.append(f.__name__)
            return self.pool.run(f, *args)

        def find(domain: str, route: Route | None = None) -> Deferred[list[Destination]]:
            return succeed(destinations)

        return RemoteDeliveryAgent(
            reactor,
            lambda m: openQueuedMessage(run, self.disk, m),
            run,
            find,
            RemoteSettings(heloName="mx.ours.test", tls="none", replyTimeout=30),
        )

    def test_measuredChunkByChunk(self) -> None:
        content = bigMessage(300 * 1024)
        message = self.queue(content)
        for size in (1000, CHUNK_SIZE, 10 * 1024 * 1024):
            self.assertEqual(measureQueuedMessage(self.disk, message, size), measureWire(content))
        self.assertEqual(self.disk.readMessageChunk(message, len(content) - 3, 100), content[-3:])
        self.assertEqual(self.disk.readMessageChunk(message, len(content), 100), b"")

    async def test_nextDestinationGetsTheWholeMessage(self) -> None:
        busy = await self.serve(Busy)
        busyPort = self.port
        good = await self.serve(BigMX)
        content = bigMessage(3 * 1024 * 1024)
        message = self.queue(content)
        agent = self.agent(
            [
                Destination("mx1.example.org", "127.0.0.1", busyPort, 10),
                Destination("mx2.example.org", "127.0.0.1", self.port, 20),
            ]
        )
        [result] = await agent.deliver(message, [RCPT])
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        self.assertEqual(busy.messages, [])
        wire = wireMessage(content)
        self.assertEqual(good.messages, [wire])
        self.assertIn(f"SIZE={len(wire) - 3} BODY=8BITMIME", good.commands[1])
        chunks = -(-len(content) // CHUNK_SIZE)
        self.assertEqual(self.jobs, ["_firstPass"] + ["readMessageChunk"] * chunks)

    async def test_smallMessageSentFromTheFirstPass(self) -> None:
        """A message of one chunk at most costs one worker job, as before streaming."""
        good = await self.serve(BigMX)
        content = b"Subject: small\n\n.dot\r\nbare\rcr\nno newline"
        message = self.queue(content)
        agent = self.agent([Destination("mx.example.org", "127.0.0.1", self.port, 10)])
        [result] = await agent.deliver(message, [RCPT])
        self.assertEqual(result.outcome, Outcome.DELIVERED, result.text)
        self.assertEqual(good.messages, [wireMessage(content)])
        self.assertEqual(self.jobs, ["_firstPass"])

    async def test_unreadableQueueFileIsTemporary(self) -> None:
        good = await self.serve(BigMX)
        message = self.queue(b"Subject: gone\n\nbody\n")
        os.unlink(message.path)
        agent = self.agent([Destination("mx.example.org", "127.0.0.1", self.port, 10)])
        results: Any = await agent.deliver(message, [RCPT])
        [result] = results
        self.assertEqual(result.outcome, Outcome.TEMPORARY)
        self.assertEqual(result.text, "Unable to read message: No such file or directory. (#4.3.0)")
        self.assertEqual(good.commands, [])
