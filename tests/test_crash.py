"""Crash consistency, end to end (threats.md D1-D3 and section 3).

A real qmailtx runs under twistd in its own process group on a scratch data
folder; it is SIGKILLed at a bad moment, restarted on the same folder, and
the Maildirs are compared with what the clients sent and were told.

The kill moments come from a seeded generator; the seed is printed and is in
every failure message. Replay with ``QMAILTX_CRASH_SEED=<seed>``; loop the
burst test by hand with ``QMAILTX_CRASH_ITERATIONS=20``.
"""

from __future__ import annotations

import glob
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "crash.test"
USERS = ("alice", "bob", "carol")
SENDER = f"sender@{DOMAIN}"
CONCURRENCY_LOCAL = 10  # qmail's default concurrencylocal: deliveries in flight at once
CLIENTS = 6
ITERATIONS = int(os.environ.get("QMAILTX_CRASH_ITERATIONS") or 3)
SETTLE = 30.0  # seconds for a restarted server to empty its queue


def chooseSeed() -> int:
    fixed = os.environ.get("QMAILTX_CRASH_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**32)


def waitFor(
    what: str, check: Callable[[], bool], timeout: float, details: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{details()}")
        time.sleep(0.02)


class Server:
    """One qmailtx process group on a data folder that outlives it; start() again after kill()."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.data = os.path.join(base, "data")
        self.config = os.path.join(base, "qmailtx.toml")
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[str] = []
        self.port = 0
        os.makedirs(base)
        with open(self.config, "w") as f:
            f.write(
                f'[paths]\ndata = "{self.data}"\n'
                '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                f'[control]\nlocals = ["localhost", "{DOMAIN}"]\n'
            )
        for user in USERS:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(self.data, "domains", DOMAIN, user, "Maildir", sub))

    def start(self) -> None:
        """Start and wait until it listens and its start-up recovery is done."""
        log = os.path.join(self.base, f"server{len(self.logs) + 1}.log")
        self.logs.append(log)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from twisted.scripts.twistd import run; run()",
                    "-n",
                    "--pidfile=",
                    "qmailtx",
                    "--config",
                    self.config,
                ],
                cwd=self.base,
                env={**os.environ, "PYTHONPATH": ROOT},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"qmailtx exited at start-up:\n{self.log()}")
            return re.search(r"recovery: \d+ message", self.log()) is not None

        waitFor("qmailtx to start", ready, 20, self.log)
        match = re.search(r"SMTPServerFactory starting on (\d+)", self.log())
        assert match, self.log()
        self.port = int(match.group(1))

    def kill(self) -> None:
        """SIGKILL the whole process group, no warning."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def log(self, index: int = -1) -> str:
        with open(self.logs[index], errors="replace") as f:
            return f.read()

    def queueFiles(self) -> list[str]:
        """Every file under queue/ (tmp/, mess/N/, corrupt/)."""
        queue = os.path.join(self.data, "queue")
        return sorted(
            os.path.relpath(os.path.join(folder, name), queue)
            for folder, _, names in os.walk(queue)
            for name in names
        )

    def mailFiles(self, subs: str = "new,cur") -> dict[str, bytes]:
        """Path -> content of every file in the given Maildir subfolders of every mailbox."""
        found = {}
        for sub in subs.split(","):
            for path in glob.glob(
                os.path.join(self.data, "domains", "*", "*", "Maildir", sub, "*")
            ):
                with open(path, "rb") as f:
                    found[path] = f.read()
        return found

    def waitUntilQueueEmpty(self) -> None:
        waitFor(
            "the queue to empty",
            lambda: not self.queueFiles(),
            SETTLE,
            lambda: f"queue: {self.queueFiles()}\nlog:\n{self.log()[-3000:]}",
        )

    def assertCleanLogs(self) -> None:
        for i in range(len(self.logs)):
            bad = [
                line
                for line in self.log(i).splitlines()
                if re.search(r"Traceback|Unhandled|#critical|#error|damaged", line)
            ]
            assert not bad, f"errors in {self.logs[i]}:\n" + "\n".join(bad[:20])


@dataclass
class Sent:
    token: str
    recipients: list[str]
    content: bytes  # the message as it must be stored: LF line ends, not dot-stuffed
    acked: bool = False


def makeLines(rng: random.Random, count: int) -> list[bytes]:
    """Body lines, some needing dot-stuffing and some with 8-bit bytes."""
    lines = []
    for _ in range(count):
        words = " ".join(
            "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 9)))
            for _ in range(rng.randint(0, 14))
        ).encode()
        kind = rng.random()
        if kind < 0.05:
            words = b"." + words  # dot-stuffed on the wire
        elif kind < 0.07:
            words = b".."
        elif kind < 0.10:
            words += bytes(rng.choices(range(0x80, 0x100), k=5))
        lines.append(words)
    return lines


LINES = makeLines(random.Random(0), 1000)
MEAN_LINE = sum(len(line) + 1 for line in LINES) / len(LINES)


def makeMessage(rng: random.Random, token: str, recipients: list[str], size: int) -> Sent:
    """A message of about ``size`` bytes; its body starts and ends with its token."""
    header = (
        f"From: <{SENDER}>\nTo: {', '.join(f'<{r}>' for r in recipients)}\n"
        f"Subject: crash {token}\nMessage-ID: <{token}@{DOMAIN}>\n\n"
    ).encode()
    lines = [token.encode(), *rng.choices(LINES, k=int(size / MEAN_LINE)), token.encode()]
    return Sent(token, recipients, header + b"\n".join(lines) + b"\n")


def wire(content: bytes) -> bytes:
    """CRLF line ends, for smtplib (which dot-stuffs bytes but does not fix line ends)."""
    return content.replace(b"\n", b"\r\n")


def stuffed(content: bytes) -> bytes:
    """The DATA body as a raw client sends it, end marker included."""
    return re.sub(rb"(?m)^\.", b"..", wire(content)) + b".\r\n"


def mailboxCopies(server: Server, sent: dict[str, Sent]) -> Counter[tuple[str, str]]:
    """Count copies per (token, recipient); fail on any file that is not an exact copy."""
    copies: Counter[tuple[str, str]] = Counter()
    problems = []
    for path, data in sorted(server.mailFiles().items()):
        user = path.split(os.sep)[-4]
        match = re.search(rb"^Message-ID: <([^@>]+)@", data, re.MULTILINE)
        message = sent.get(match.group(1).decode()) if match else None
        parts = data.split(b"\n", 4)
        rcpt = f"{user}@{DOMAIN}"
        if message is None or len(parts) < 5:
            problems.append(f"{path}: unknown or partial file, starts {data[:300]!r}")
        elif rcpt not in message.recipients:
            problems.append(f"{path}: {message.token} was not sent to {rcpt}")
        elif (
            parts[0] != f"Return-Path: <{SENDER}>".encode()
            or parts[1] != f"Delivered-To: {rcpt}".encode()
            or not parts[2].startswith(b"Received: from ")
            or not parts[3].startswith(b"  by ")
        ):
            problems.append(f"{path}: bad trace lines {parts[:4]!r}")
        elif parts[4] != message.content:
            problems.append(
                f"{path}: {message.token} differs from what was sent "
                f"({len(parts[4])} bytes stored, {len(message.content)} sent)"
            )
        else:
            copies[message.token, rcpt] += 1
    assert not problems, "\n".join(problems)
    return copies


class RawClient:
    """Just enough SMTP over a plain socket to stop at exact moments."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buffer = b""
        self.expect(220)

    def expect(self, code: int) -> None:
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed, waiting for {code}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] != b"-":
                assert line[:3] == str(code).encode(), f"expected {code}, got {line!r}"
                return

    def command(self, line: str, code: int) -> None:
        self.sock.sendall(line.encode() + b"\r\n")
        self.expect(code)

    def beginData(self, recipients: list[str]) -> None:
        self.command("EHLO crash.client", 250)
        self.command(f"MAIL FROM:<{SENDER}>", 250)
        for rcpt in recipients:
            self.command(f"RCPT TO:<{rcpt}>", 250)
        self.command("DATA", 354)

    def close(self) -> None:
        self.sock.close()


def smtpClient(
    port: int, rng: random.Random, index: int, record: list[Sent], errors: list[str]
) -> None:
    """Send messages one after the other until the connection dies; mark each 250."""
    try:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=15)
    except OSError as e:
        errors.append(f"client {index} could not connect: {e!r}")
        return
    try:
        for n in range(1000):
            # One, two or three recipients: more deliveries than messages, so
            # the queue is still draining when the kill comes.
            users = USERS[index % 3 :] + USERS[: index % 3]
            recipients = [f"{user}@{DOMAIN}" for user in users[: 1 + n % 3]]
            token = f"c{index}n{n}x{rng.getrandbits(32):08x}"
            message = makeMessage(rng, token, recipients, rng.randint(8000, 20000))
            record.append(message)
            refused = smtp.sendmail(SENDER, recipients, wire(message.content))
            if refused:
                errors.append(f"{token}: recipients refused: {refused}")
                return
            message.acked = True
    except smtplib.SMTPResponseException as e:
        errors.append(f"client {index}: unexpected reply {e.smtp_code} {e.smtp_error!r}")
    except smtplib.SMTPRecipientsRefused as e:
        errors.append(f"client {index}: recipients refused: {e.recipients}")
    except (OSError, smtplib.SMTPServerDisconnected):
        pass  # the kill
    finally:
        smtp.close()


class CrashTests(TestCase):
    timeout = 120 + 30 * ITERATIONS
    server: Server

    def newServer(self) -> Server:
        server = self.server = Server(os.path.abspath(self.mktemp()))
        self.addCleanup(server.kill)
        return server

    def deliverFresh(self, server: Server, token: str, sent: dict[str, Sent]) -> None:
        """The restarted server accepts a new message and delivers it, byte-exact."""
        message = makeMessage(random.Random(token), token, [f"carol@{DOMAIN}"], 3000)
        sent[token] = message
        smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=15)
        try:
            self.assertEqual(smtp.sendmail(SENDER, message.recipients, wire(message.content)), {})
            smtp.quit()
        finally:
            smtp.close()
        server.waitUntilQueueEmpty()
        n = mailboxCopies(server, sent)[token, f"carol@{DOMAIN}"]
        self.assertEqual(n, 1, f"{token}, sent after the restart: {n} copies delivered")

    def test_killDuringBurst(self) -> Deferred[None]:
        """D3: parallel clients, SIGKILL at a random moment, restart: every 250 is
        delivered byte-exact, nothing partial, duplicates bounded by the
        deliveries that can be in flight."""
        seed = chooseSeed()
        print(f"\ntest_killDuringBurst: QMAILTX_CRASH_SEED={seed} iterations={ITERATIONS}")

        def run() -> None:
            rng = random.Random(seed)
            for i in range(ITERATIONS):
                try:
                    self.burstOnce(rng, i)
                except Exception as e:
                    raise self.failureException(
                        f"QMAILTX_CRASH_SEED={seed} iteration {i} (logs: {self.server.base}): {e}"
                    ) from e

        return deferToThread(run)

    def burstOnce(self, rng: random.Random, iteration: int) -> None:
        server = self.newServer()
        server.start()
        records: list[list[Sent]] = [[] for _ in range(CLIENTS)]
        errors: list[str] = []
        threads = [
            threading.Thread(
                target=smtpClient,
                args=(server.port, random.Random(rng.getrandbits(64)), c, records[c], errors),
                daemon=True,
            )
            for c in range(CLIENTS)
        ]

        def joinClients() -> None:
            for t in threads:
                t.join(20)

        self.addCleanup(joinClients)
        delay = rng.uniform(0.2, 1.5)
        for t in threads:
            t.start()
        time.sleep(delay)
        server.kill()
        for t in threads:
            t.join(20)
            assert not t.is_alive(), "an SMTP client hangs after the kill"
        assert not errors, "\n".join(errors)

        server.start()
        recovered = re.search(r"recovery: (\d+) message", server.log())
        server.waitUntilQueueEmpty()
        sent = {m.token: m for record in records for m in record}
        copies = mailboxCopies(server, sent)
        acked = [m for m in sent.values() if m.acked]
        lost = [f"{m.token} to {r}" for m in acked for r in m.recipients if not copies[m.token, r]]
        assert not lost, f"{len(lost)} acknowledged deliveries lost: {lost[:20]}"
        # Queued at all (even without its 250) means queued for every recipient.
        partial = [
            m.token
            for m in sent.values()
            if any(copies[m.token, r] for r in m.recipients)
            and not all(copies[m.token, r] for r in m.recipients)
        ]
        assert not partial, f"delivered to only some of their recipients: {partial[:20]}"
        extra = sum(n - 1 for n in copies.values())
        assert extra <= CONCURRENCY_LOCAL, (
            f"{extra} duplicate copies, more than concurrencylocal ({CONCURRENCY_LOCAL}) "
            f"deliveries in flight: {sorted(k for k, n in copies.items() if n > 1)[:20]}"
        )
        unacked = sum(
            1
            for m in sent.values()
            if not m.acked and any(copies[m.token, r] for r in m.recipients)
        )
        summary = (
            f"  iteration {iteration}: kill after {delay:.3f}s; {len(sent)} sent, "
            f"{len(acked)} got 250, {unacked} delivered without 250, "
            f"{recovered.group(1) if recovered else '?'} recovered from the queue, "
            f"{extra} duplicate(s)"
        )
        self.deliverFresh(server, f"fresh{iteration}x{rng.getrandbits(32):08x}", sent)
        server.kill()
        server.assertCleanLogs()
        print(summary)

    def test_killMidData(self) -> Deferred[None]:
        """D1: SIGKILL while two clients are half-way through DATA (one small body
        held in memory, one large enough to be spooled to queue/tmp): after the
        restart neither appears in a Maildir and the queue holds no trace."""

        def run() -> None:
            server = self.newServer()
            server.start()
            rng = random.Random(1)
            clients = []
            for token, size in (("midsmall", 12_000), ("midlarge", 400_000)):
                message = makeMessage(rng, token, [f"alice@{DOMAIN}", f"bob@{DOMAIN}"], size)
                client = RawClient(server.port)
                self.addCleanup(client.close)
                client.beginData(message.recipients)
                body = stuffed(message.content)
                client.sock.sendall(body[: len(body) // 2])
                clients.append(client)

            named: list[str] = []

            def spooled() -> bool:
                """The large message is being written: under a queue/tmp name, or as
                an unnamed O_TMPFILE file the server holds open in queue/tmp."""
                for name in server.queueFiles():
                    with open(os.path.join(server.data, "queue", name), "rb") as f:
                        if b"midlarge" in f.read():
                            named.append(name)
                            return name.startswith("tmp" + os.sep)
                assert server.process is not None
                fds = f"/proc/{server.process.pid}/fd"
                tmp = os.path.join(server.data, "queue", "tmp") + os.sep
                for fd in os.listdir(fds):
                    try:
                        if os.readlink(os.path.join(fds, fd)).startswith(tmp):
                            with open(os.path.join(fds, fd), "rb") as f:
                                if b"midlarge" in f.read():
                                    return True
                    except OSError:
                        continue
                return False

            # The large message must be on disk, or recovery is not being tested.
            waitFor("a spool file in queue/tmp", spooled, 10, lambda: str(server.queueFiles()))
            server.kill()
            for client in clients:
                client.close()

            server.start()
            self.assertEqual(server.queueFiles(), [])
            if named:  # no O_TMPFILE here: start-up recovery had a file to remove
                self.assertIn("recovery: removed 1 unfinished file(s) from queue/tmp", server.log())
            self.deliverFresh(server, "midafter", {})
            for path, data in server.mailFiles("tmp,new,cur").items():
                self.assertNotIn(b"midsmall", data, path)
                self.assertNotIn(b"midlarge", data, path)
            self.assertEqual(server.queueFiles(), [])
            server.kill()
            server.assertCleanLogs()

        return deferToThread(run)

    def test_killRightAfter250(self) -> Deferred[None]:
        """D2: SIGKILL the moment the client has read the 250 after DATA: after
        the restart the message is there, byte-exact, once (twice at most).
        Once with a small message (committed in one go) and once with one
        spooled while it arrives."""

        def run() -> None:
            server = self.newServer()
            server.start()
            rng = random.Random(2)
            sent: dict[str, Sent] = {}
            for token, size in (("aftersmall", 12_000), ("afterlarge", 300_000)):
                message = sent[token] = makeMessage(rng, token, [f"alice@{DOMAIN}"], size)
                client = RawClient(server.port)
                self.addCleanup(client.close)
                client.beginData(message.recipients)
                client.sock.sendall(stuffed(message.content))
                client.expect(250)
                server.kill()
                client.close()
                server.start()
                server.waitUntilQueueEmpty()
                copies = mailboxCopies(server, sent)
                n = copies[token, f"alice@{DOMAIN}"]
                self.assertIn(n, (1, 2), f"{token}: {n} copies after the restart")
            server.kill()
            server.assertCleanLogs()

        return deferToThread(run)
