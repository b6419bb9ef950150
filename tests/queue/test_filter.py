"""QMAILQUEUE filters run by the queue store, with real processes and a real reactor."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from qmailtx.address import Address
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.filter import (
    QueueFilter,
    QueueRefused,
    filterCommand,
    findInjector,
    makeQueueFilter,
)
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.store import Filtered, QueueStore, synchronousRunner
from qmailtx.queue.trigger import pull, triggerPath
from qmailtx.queue.triggerservice import QueueTriggerService
from qmailtx.testing import makeTestConfig
from tests.queue.test_inject import WORKTREE

SENDER = Address.fromStored("a@b.example")
RECIPIENTS = [Address.fromStored("u@mx.test"), Address.fromStored("v@mx.test")]
INJECT = (
    f"PYTHONPATH={shlex.quote(WORKTREE)} exec {shlex.quote(sys.executable)} -m qmailtx.queue.inject"
)


class FilterStoreTests(TestCase):
    def setUp(self) -> None:
        self.data = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.data, "queue")
        self.disk = QueueDisk(self.root)
        self.disk.create()
        self.arrivals: list[object] = []
        self.committed: list[QueuedMessage] = []
        self.logs: list[LogEvent] = []
        observer = cast(ILogObserver, self.logs.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def store(self, body: str, timeout: float = 60, injector: str | None = None) -> QueueStore:
        """A store whose filter is a /bin/sh script with ``body``."""
        path = os.path.join(self.data, "filter")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body + "\n")
        os.chmod(path, 0o700)
        return self.storeWith([path], timeout, injector)

    def storeWith(
        self, argv: list[str], timeout: float = 60, injector: str | None = None
    ) -> QueueStore:
        queueFilter = QueueFilter(
            reactor, argv, self.data, self.root, {"PATH": "/usr/bin:/bin"}, injector, timeout
        )
        store = QueueStore(self.disk, synchronousRunner, queueFilter)
        store.addListener(self.committed.append)
        store.addArrivalListener(self.arrivals.append)
        return store

    def path(self, name: str) -> str:
        return os.path.join(self.data, name)

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    async def receive(
        self,
        store: QueueStore,
        message: bytes = b"Subject: t\n\nbody\n",
        sender: Address = SENDER,
        info: dict[str, str] | None = None,
    ) -> Any:
        spool = store.openSpool(1000.0, sender, RECIPIENTS, info or {})
        spool.write(message[:5])
        spool.write(message[5:])
        return await spool.commit()

    async def refusal(self, store: QueueStore, **kw: Any) -> QueueRefused:
        try:
            await self.receive(store, **kw)
        except QueueRefused as e:
            return e
        raise AssertionError("the filter did not refuse the message")

    def assertNothingQueued(self) -> None:
        self.assertEqual(self.disk.scan().messages, [])
        self.assertEqual(os.listdir(self.disk.tmpDir), [])
        self.assertEqual(self.committed, [])

    async def test_filterGetsMessageAndEnvelopeAndRefuses(self) -> None:
        """P10 test 1: a filter that records fd 0 and fd 1 and exits 31."""
        store = self.store(
            f"cat >{self.path('message')}; cat <&1 >{self.path('envelope')}; exit 31"
        )
        message = b"Subject: t\n\n" + b"line\n" * 20000
        refused = await self.refusal(store, message=message)
        self.assertEqual(str(refused.reply), "554 5.3.0 mail server permanently rejected message")
        self.assertTrue(refused.permanent)
        self.assertEqual(self.read("message"), message)
        self.assertEqual(self.read("envelope"), b"Fa@b.example\0Tu@mx.test\0Tv@mx.test\0\0")
        self.assertNothingQueued()
        self.assertEqual(self.arrivals, [])

    async def test_temporaryRefusal(self) -> None:
        refused = await self.refusal(self.store("exit 71"))
        self.assertEqual(str(refused.reply), "451 4.3.0 mail server temporarily rejected message")
        self.assertFalse(refused.permanent)
        self.assertNothingQueued()

    async def test_missingProgram(self) -> None:
        """P10 test 2: a missing file is qmail's exit 120."""
        refused = await self.refusal(self.storeWith([self.path("nonexistent")]))
        self.assertEqual(str(refused.reply), "451 4.3.0 unable to exec qq")
        self.assertNothingQueued()

    async def test_crashedFilter(self) -> None:
        refused = await self.refusal(self.store("kill -9 $$"))
        self.assertEqual(str(refused.reply), "451 4.3.0 qq crashed")

    async def test_slowFilterIsKilled(self) -> None:
        store = self.store("sleep 30 & wait", timeout=0.5)
        refused = await self.refusal(store)
        self.assertEqual(str(refused.reply), "451 4.3.0 qq timeout")

    async def test_filterWritingNothingAndExitingZeroDropsTheMessage(self) -> None:
        queued = await self.receive(self.store("exit 0"))
        self.assertIsInstance(queued, Filtered)
        self.assertEqual(self.disk.scan().messages, [])

    async def test_acceptedThroughTheInjector(self) -> None:
        store = self.store(INJECT)
        queued = await self.receive(store, info={"c": "192.0.2.7", "s": "3.1"})
        self.assertIsInstance(queued, Filtered)
        [message] = self.disk.scan().messages
        self.assertEqual(message.msgid, queued.msgid)
        self.assertEqual(self.disk.readMessage(message, 100), b"Subject: t\n\nbody\n")
        self.assertEqual([str(r) for r in message.recipients], ["u@mx.test", "v@mx.test"])
        self.assertEqual(message.info, {"c": "192.0.2.7", "s": "3.1"})
        self.assertEqual(self.arrivals, [{queued.msgid}])
        self.assertEqual(self.committed, [])  # the manager hears of it as an arrival

    async def test_injectedMailGoesThroughTheFilterToo(self) -> None:
        """Bounces, forwards and auto-replies use inject()."""
        store = self.store(f"{{ echo 'X-Filtered: yes'; cat; }} | {INJECT}")
        queued = await store.inject(2000.0, Address.null(), RECIPIENTS[:1], b"bounce\n", {"b": "1"})
        self.assertIsInstance(queued, Filtered)
        [message] = self.disk.scan().messages
        self.assertEqual(str(message.sender), "")
        self.assertEqual(message.info, {"b": "1"})
        self.assertEqual(self.disk.readMessage(message, 100), b"X-Filtered: yes\nbounce\n")

    async def test_injectRefused(self) -> None:
        store = self.store("exit 32")
        with self.assertRaises(QueueRefused) as caught:
            await store.inject(2000.0, Address.null(), RECIPIENTS[:1], b"bounce\n", {})
        self.assertEqual(str(caught.exception.reply), "554 5.3.0 qq permanent problem")
        self.assertNothingQueued()

    async def test_environment(self) -> None:
        store = self.store(f"env >{self.path('env')}", injector="/opt/qmailtx/bin/qmailtx-queue")
        queued = await self.receive(store, info={"c": "192.0.2.7", "s": "3.1"})
        lines = self.read("env").decode().splitlines()
        self.assertIn(f"QMAILTX_QUEUE={self.root}", lines)
        self.assertIn(f"QMAILTX_QUEUE_MSGID={queued.msgid}", lines)
        self.assertIn("QMAILTX_QUEUE_PROGRAM=/opt/qmailtx/bin/qmailtx-queue", lines)
        self.assertIn("QMAILQUEUE=/opt/qmailtx/bin/qmailtx-queue", lines)
        self.assertIn('QMAILTX_QUEUE_INFO={"c": "192.0.2.7", "s": "3.1"}', lines)
        self.assertIn("TCPREMOTEIP=192.0.2.7", lines)

    async def test_relayClientAndAuthUserAsQmailSetThem(self) -> None:
        store = self.store(f"env >{self.path('env')}")
        await self.receive(store, info={"c": "192.0.2.7", "r": "1", "u": "alice@example.com"})
        lines = self.read("env").decode().splitlines()
        self.assertIn("RELAYCLIENT=", lines)
        self.assertIn("TCPREMOTEINFO=alice@example.com", lines)

    async def test_serverEnvironmentNeverMakesAStrangerARelayClient(self) -> None:
        queueFilter = QueueFilter(
            reactor,
            ["/bin/sh", "-c", f"env >{self.path('env')}; exit 0"],
            self.data,
            self.root,
            {"PATH": "/usr/bin:/bin", "RELAYCLIENT": "", "TCPREMOTEINFO": "root"},
            None,
        )
        env = queueFilter.environmentFor("1.2", {"c": "192.0.2.8"})
        self.assertNotIn("RELAYCLIENT", env)
        self.assertNotIn("TCPREMOTEINFO", env)
        self.assertEqual(env["TCPREMOTEIP"], "192.0.2.8")

    async def test_runsInTheDataFolder(self) -> None:
        store = self.store(f"pwd >{self.path('pwd')}")
        await self.receive(store)
        self.assertEqual(self.read("pwd").decode().strip(), os.path.realpath(self.data))

    async def test_shellMetacharactersStayData(self) -> None:
        """threats.md S5: the envelope never reaches a shell."""
        marker = self.path("marker")
        sender = Address.fromStored(
            f"x;touch${{IFS}}{marker};`touch {marker}`$(touch {marker})@b.example"
        )
        store = self.store(f"cat >/dev/null; cat <&1 >{self.path('envelope')}; exit 31")
        await self.refusal(store, sender=sender)
        self.assertFalse(os.path.exists(marker))
        self.assertTrue(self.read("envelope").startswith(b"F" + str(sender).encode() + b"\0"))

    async def test_stderrIsLogged(self) -> None:
        await self.refusal(self.store("echo 'virus found: Eicar' >&2; exit 31"))
        text = [formatEvent(e) for e in self.logs]
        self.assertTrue(any("said: virus_found:_Eicar" in t for t in text), text)
        self.assertTrue(any("refused msg" in t and "exit 31" in t for t in text), text)


class TriggerServiceTests(TestCase):
    async def test_wakeUps(self) -> None:
        data = os.path.abspath(self.mktemp())
        root = os.path.join(data, "queue")
        os.makedirs(root)
        with open(triggerPath(root), "w") as f:
            f.write("not a fifo")
        heard: list[object] = []
        waiter: list[Deferred[None]] = []

        def arrived(ids: object) -> None:
            heard.append(ids)
            if waiter:
                waiter.pop().callback(None)

        async def next() -> None:
            d: Deferred[None] = Deferred()
            waiter.append(d)
            await d.addTimeout(10, reactor)

        service = QueueTriggerService(reactor, triggerPath(root), arrived)
        service.startService()
        self.addCleanup(service.stopService)
        waiting = next()
        self.assertTrue(pull(root, "6611d79f105d0abc"))
        await waiting
        self.assertEqual(heard, [{"6611d79f105d0abc"}])
        # The writer has closed; the FIFO is not left at end of file (no busy loop).
        waiting = next()
        fd = os.open(triggerPath(root), os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"x")  # a qmail-style byte
        os.close(fd)
        await waiting
        self.assertEqual(heard, [{"6611d79f105d0abc"}, None])
        service.stopService()
        self.assertFalse(pull(root, "6611d79f105d0abc"))  # nobody listens any more


class ConfigurationTests(SynchronousTestCase):
    def test_configKeyWins(self) -> None:
        config = makeTestConfig(
            self.mktemp(), f'[queue]\nqmailqueue = ["{sys.executable}", "-x"]\n'
        )
        self.assertEqual(filterCommand(config, {"QMAILQUEUE": "/bin/true"}), (sys.executable, "-x"))

    def test_environmentAsInQmail(self) -> None:
        config = makeTestConfig(self.mktemp())
        self.assertEqual(filterCommand(config, {}), ())
        self.assertEqual(filterCommand(config, {"QMAILQUEUE": ""}), ())
        self.assertEqual(filterCommand(config, {"QMAILQUEUE": "/usr/bin/scan"}), ("/usr/bin/scan",))
        self.assertEqual(
            filterCommand(config, {"QMAILQUEUE": "bin/scan"}),
            (os.path.join(config.paths.data, "bin/scan"),),
        )

    def test_environmentIsLoggedAtStartup(self) -> None:
        logs: list[LogEvent] = []
        observer = cast(ILogObserver, logs.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        config = makeTestConfig(self.mktemp())
        made = makeQueueFilter(reactor, config, {"QMAILQUEUE": "/usr/bin/scan"}, "/x/qmailtx-queue")
        assert made is not None
        self.assertEqual(made.argv, ["/usr/bin/scan"])
        [warning] = [e for e in logs if e["log_level"].name == "warn"]
        self.assertIn("QMAILQUEUE=/usr/bin/scan in the environment", formatEvent(warning))
        self.assertIsNone(makeQueueFilter(reactor, config, {}))

    def test_relativeProgramIsRelativeToTheConfigFile(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "bin"))
        program = os.path.join(folder, "bin", "scan")
        with open(program, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(program, 0o700)
        config = makeTestConfig(folder, '[queue]\nqmailqueue = ["bin/scan", "--fast"]\n')
        self.assertEqual(config.queue.qmailqueue, (program, "--fast"))

    def test_programMustBeExecutable(self) -> None:
        from qmailtx.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            makeTestConfig(self.mktemp(), '[queue]\nqmailqueue = ["/nonexistent/scan"]\n')
        self.assertIn("qmailqueue", str(caught.exception))

    def test_findInjector(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        python = os.path.join(folder, "python")
        self.assertNotEqual(findInjector(python), os.path.join(folder, "qmailtx-queue"))
        injector = os.path.join(folder, "qmailtx-queue")
        with open(injector, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(injector, 0o700)
        self.assertEqual(findInjector(python), injector)
