"""End to end on loopback: the embedded service's POP3 and POP3S listeners read by
poplib, curl and openssl s_client, as a mail client would."""

from __future__ import annotations

import os
import poplib
import shutil
import smtplib
import socket
import ssl
import warnings
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from qmailtx import makeMailService
from qmailtx.config import Config
from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.pop3.mailbox import convertAll
from qmailtx.testing import makeTestCertificate, makeTestConfig, makeTestUsers
from qmailtx.vdomain.records import QuotaLimit
from qmailtx.vdomain.sqlite import SQLiteUserStore

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
ALICE, PASSWORD = "alice@example.com", "alice-Secr3t"

MESSAGES = [
    b"From: a@example.net\nSubject: first\n\nHello.\n.dot line\n..two dots\n",
    b"From: b@example.net\r\nSubject: second\r\n\r\nCRLF body\r\nno final newline",
    b"Subject: third\n\n" + b"".join(b"line %d\n" % i for i in range(20000)),
]


class Server:
    def __init__(self, test: TestCase, extra: str = "", smtp: bool = False) -> None:
        folder = os.path.abspath(test.mktemp())
        self.certPath, keyPath = makeTestCertificate(os.path.join(folder, "tls"), "mx.test")
        # Only POP3, unless the test delivers too: no fixed SMTP port to collide on.
        listen = '["tcp:0:interface=127.0.0.1"]' if smtp else "[]"
        toml = (
            f"[smtp]\nlisten = {listen}\n"
            '[pop3]\nlisten = ["tcp:0:interface=127.0.0.1"]\napop = true\n' + extra + "\n"
            '[pop3s]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            f'[tls]\ncertificate = "{self.certPath}"\nkey = "{keyPath}"\n'
        )
        self.config: Config = makeTestConfig(folder, toml)
        makeTestUsers(self.config.users.database, {ALICE: PASSWORD}).close()
        self.maildir = os.path.join(
            self.config.paths.data, "domains", "example.com", "alice", "Maildir"
        )
        makeMaildir(FileSystem(), self.maildir)
        self.names: list[str] = []
        for i, data in enumerate(MESSAGES):
            name = f"{1_700_000_000 + i}.M{i}P1.mx.test,S={len(data)}"
            path = os.path.join(self.maildir, "new", name)
            with open(path, "wb") as f:
                f.write(data)
            os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
            self.names.append(name)
        self.service = makeMailService(reactor, self.config)
        self.pop3 = self.pop3s = self.smtp = 0

    async def start(self, test: TestCase) -> Server:
        self.service.startService()
        test.addCleanup(self.service.stopService)
        listeners = list(cast(MultiService, self.service.getServiceNamed("pop3")))
        ports: list[IListeningPort] = [await listener._waitingForPort for listener in listeners]
        self.pop3, self.pop3s = (int(p.getHost().port) for p in ports)  # type: ignore[attr-defined]
        if "smtp" in self.service.namedServices:
            [smtp] = list(cast(MultiService, self.service.getServiceNamed("smtp")))
            port = await smtp._waitingForPort
            self.smtp = int(port.getHost().port)
        return self

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.certPath)

    def files(self, subdir: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.maildir, subdir)))


def fromPoplib(lines: list[bytes]) -> bytes:
    """poplib's RETR lines back into the CRLF message (it un-stuffs dots)."""
    return b"".join(line + b"\r\n" for line in lines)


def expected(data: bytes) -> bytes:
    """The message as RETR sends it, un-stuffed, without the terminating dot."""
    sent = convertAll(data)[:-3]
    return b"".join(
        (line[1:] if line.startswith(b".") else line) + b"\r\n" for line in sent.split(b"\r\n")[:-1]
    )


class PoplibTests(TestCase):
    async def test_userPassRetrTopUidlDeleQuit(self) -> None:
        server = await Server(self).start(self)

        def session() -> tuple[Any, ...]:
            client = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            client.user(ALICE)
            client.pass_(PASSWORD)
            count, octets = client.stat()
            listing = client.list()[1]
            uidl = client.uidl()[1]
            retrieved = [client.retr(i + 1) for i in range(count)]
            top = client.top(3, 2)[1]
            client.dele(1)
            client.quit()
            return count, octets, listing, uidl, retrieved, top

        count, octets, listing, uidl, retrieved, top = await deferToThread(session)
        self.assertEqual(count, 3)
        sizes = [len(expected(m)) for m in MESSAGES]
        self.assertEqual(octets, sum(sizes))
        self.assertEqual(listing, [f"{i + 1} {s}".encode() for i, s in enumerate(sizes)])
        self.assertEqual(uidl, [f"{i + 1} {n}".encode() for i, n in enumerate(server.names)])
        for data, size, (_, lines, octets) in zip(MESSAGES, sizes, retrieved, strict=True):
            self.assertEqual(fromPoplib(lines), expected(data))
            self.assertEqual(octets, size)  # poplib counts what it read, un-stuffed
        self.assertEqual(
            fromPoplib(retrieved[0][1]),
            b"From: a@example.net\r\nSubject: first\r\n\r\nHello.\r\n.dot line\r\n..two dots\r\n",
        )
        self.assertEqual(fromPoplib(retrieved[1][1]), MESSAGES[1] + b"\r\n")
        self.assertEqual(top, [b"Subject: third", b"", b"line 0", b"line 1"])
        self.assertEqual(server.files("new"), [])
        self.assertEqual(server.files("cur"), [n + ":2,S" for n in server.names[1:]])

        def again() -> list[bytes]:
            client = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            client.user(ALICE)
            client.pass_(PASSWORD)
            uidl = client.uidl()[1]
            client.quit()
            return list(uidl)

        # UIDs stay the same after the move to cur/ and the deletion.
        self.assertEqual(
            await deferToThread(again),
            [f"{i} {n}".encode() for i, n in enumerate(server.names[1:], 1)],
        )
        # The deleted message, renamed into tmp/ at QUIT, is unlinked after it.
        for _ in range(100):
            if not server.files("tmp"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(server.files("tmp"), [])

    async def test_apopRsetAndDroppedConnection(self) -> None:
        server = await Server(self).start(self)

        def session() -> int:
            client = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            client.apop(ALICE, PASSWORD)
            client.dele(1)
            client.dele(2)
            client.rset()
            client.dele(3)
            client.sock.close()  # no QUIT
            client = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            client.apop(ALICE, PASSWORD)
            count = client.stat()[0]
            client.quit()
            return count

        self.assertEqual(await deferToThread(session), 3)
        self.assertEqual(len(server.files("new")), 3)

    async def test_stlsAndPOP3S(self) -> None:
        server = await Server(self, "auth_before_tls = false").start(self)

        def session() -> tuple[bytes, bytes, int]:
            client = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            client.stls(server.context())
            client.user(ALICE)
            client.pass_(PASSWORD)
            first = client.retr(1)[1][0]
            client.quit()
            secure = poplib.POP3_SSL("127.0.0.1", server.pop3s, context=server.context())
            capa = secure.capa()
            secure.user(ALICE)
            secure.pass_(PASSWORD)
            count = secure.stat()[0]
            secure.quit()
            return first, b"STLS" if "STLS" in capa else b"", count

        first, stls, count = await deferToThread(session)
        self.assertEqual(first, b"From: a@example.net")
        self.assertEqual(stls, b"")
        self.assertEqual(count, 3)

    async def test_stlsInjectionNeverAnswered(self) -> None:
        server = await Server(self).start(self)

        def session() -> bytes:
            sock = socket.create_connection(("127.0.0.1", server.pop3), timeout=10)
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"STLS\r\nSTAT\r\n")
            answer = f.readline()
            wrapped = server.context().wrap_socket(sock, server_hostname="mx.test")
            wrapped.sendall(b"NOOP\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                reply += wrapped.recv(100)
            wrapped.close()
            return answer + reply

        self.assertEqual(await deferToThread(session), b"+OK begin TLS negotiation\r\n+OK\r\n")

    async def test_twoSessionsOnOneMailbox(self) -> None:
        server = await Server(self).start(self)

        def sessions() -> tuple[bytes, bytes, bytes]:
            one = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            two = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            for client in (one, two):
                client.user(ALICE)
                client.pass_(PASSWORD)
            one.dele(1)
            one.quit()
            try:
                two.retr(1)
            except poplib.error_proto as e:
                refused = e.args[0]
            else:
                refused = b"+OK?"
            second = two.retr(2)[1][0]
            return refused, second, two.quit()

        refused, second, bye = await deferToThread(sessions)
        self.assertTrue(refused.startswith(b"-ERR [SYS/TEMP]"), refused)
        self.assertEqual(second, b"From: b@example.net")
        self.assertTrue(bye.startswith(b"+OK"))
        self.assertEqual(len(server.files("new")) + len(server.files("cur")), 2)

    async def test_quotaRecoveredAfterDele(self) -> None:
        server = Server(self)
        total = sum(len(m) for m in MESSAGES)
        with open(os.path.join(server.maildir, "maildirsize"), "wb") as f:
            f.write(f"5000000S,100C\n{total} 3\n".encode())
        await server.start(self)

        def session() -> None:
            client = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            client.user(ALICE)
            client.pass_(PASSWORD)
            client.dele(1)
            client.dele(3)
            client.quit()

        await deferToThread(session)
        freed = len(MESSAGES[0]) + len(MESSAGES[2])
        with open(os.path.join(server.maildir, "maildirsize"), "rb") as sizes:
            self.assertEqual(sizes.read().splitlines()[-1], f"-{freed} -2".encode())

    async def test_fullMailboxTakesMailAgainAfterDele(self) -> None:
        """threats.md Q3: a full mailbox refuses mail; once POP3 deletions are
        committed the next message is accepted and delivered at once."""
        server = Server(self, smtp=True)
        total = sum(len(m) for m in MESSAGES)
        users = SQLiteUserStore(server.config.users.database)
        users.setQuota("alice", "example.com", QuotaLimit(bytes=total))  # full
        users.close()
        with open(os.path.join(server.maildir, "maildirsize"), "wb") as f:
            f.write(f"{total}S\n{total} 3\n".encode())
        await server.start(self)
        message = b"Subject: after the clean-up\r\n\r\n" + b"x" * 500 + b"\r\n"

        def send() -> object:
            with smtplib.SMTP("127.0.0.1", server.smtp, timeout=10) as client:
                try:
                    client.sendmail("a@sender.test", [ALICE], message)
                except smtplib.SMTPRecipientsRefused as e:
                    return e.recipients[ALICE]
            return "sent"

        def deleteAll() -> None:
            client = poplib.POP3("127.0.0.1", server.pop3, timeout=10)
            client.user(ALICE)
            client.pass_(PASSWORD)
            for i in range(len(MESSAGES)):
                client.dele(i + 1)
            client.quit()

        self.assertEqual(
            await deferToThread(send), (552, b"5.2.2 sorry, recipient mailbox is full")
        )
        await deferToThread(deleteAll)
        self.assertEqual(await deferToThread(send), "sent")
        for _ in range(100):
            if server.files("new"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        [name] = server.files("new")
        with open(os.path.join(server.maildir, "new", name), "rb") as delivered:
            self.assertIn(b"after the clean-up", delivered.read())


def oldTLSContext() -> ssl.SSLContext:
    """A client offering TLS 1.0 and 1.1 only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def oldHandshake(sock: socket.socket) -> str:
    try:
        oldTLSContext().wrap_socket(sock).close()
    except ssl.SSLError as e:
        return str(e)
    finally:
        sock.close()
    return "handshake succeeded"


class TLSRobustnessTests(TestCase):
    """S18 for POP3: the POP3S and STLS listeners share SMTP's ServerTLS."""

    async def test_tlsBelow12RefusedOnPOP3S(self) -> None:
        server = await Server(self).start(self)

        def attempt() -> str:
            return oldHandshake(socket.create_connection(("127.0.0.1", server.pop3s), timeout=10))

        error = await deferToThread(attempt)
        # An alert from the server: the client did offer TLS 1.0/1.1.
        self.assertIn("PROTOCOL_VERSION", error)

    async def test_tlsBelow12RefusedOnSTLS(self) -> None:
        server = await Server(self).start(self)

        def attempt() -> tuple[bytes, str]:
            sock = socket.create_connection(("127.0.0.1", server.pop3), timeout=10)
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"STLS\r\n")
            answer = f.readline()
            f.close()
            return answer, oldHandshake(sock)

        answer, error = await deferToThread(attempt)
        self.assertEqual(answer, b"+OK begin TLS negotiation\r\n")
        self.assertIn("PROTOCOL_VERSION", error)

    async def test_garbageHandshakeHurtsOnlyItsConnection(self) -> None:
        server = await Server(self).start(self)
        bad: list[Any] = []

        def noteErrors(event: Any) -> None:
            if event.get("log_failure") is not None or event.get("log_level") in (
                LogLevel.error,
                LogLevel.critical,
            ):
                bad.append(event)

        observer = cast(ILogObserver, noteErrors)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        def garbage() -> bytes:
            sock = socket.create_connection(("127.0.0.1", server.pop3s), timeout=10)
            sock.sendall(os.urandom(4096) + b"\r\nUSER x\r\nQUIT\r\n")
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
            sock.close()
            return received

        for _ in range(3):
            self.assertNotIn(b"+OK", await deferToThread(garbage))

        def goodClient() -> tuple[int, bytes]:
            client = poplib.POP3_SSL("127.0.0.1", server.pop3s, context=server.context())
            client.user(ALICE)
            client.pass_(PASSWORD)
            count = client.stat()[0]
            bye = client.quit()
            return count, bye

        count, bye = await deferToThread(goodClient)
        self.assertEqual(count, 3)
        self.assertEqual(bye, b"+OK mx.test bye (0 deleted)")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(bad, [])


class ToolTests(TestCase):
    async def test_curl(self) -> None:
        if CURL is None:
            self.fail("curl is not installed (Debian package curl; .ci/run installs it)")
        server = await Server(self).start(self)
        url = f"pop3://127.0.0.1:{server.pop3}/1"
        out, err, code = await getProcessOutputAndValue(
            CURL, ["-s", "-S", "--user", f"{ALICE}:{PASSWORD}", url], env=os.environ
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, expected(MESSAGES[0]))
        out, err, code = await getProcessOutputAndValue(
            CURL,
            [
                "-s",
                "-S",
                "--ssl-reqd",
                "--cacert",
                server.certPath,
                "--user",
                f"{ALICE}:{PASSWORD}",
                "--login-options",
                "AUTH=PLAIN",
                f"pop3://mx.test:{server.pop3}/",
                "--resolve",
                f"mx.test:{server.pop3}:127.0.0.1",
            ],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split(b"\r\n")[0].split()[0], b"1")

    async def test_opensslStartTLS(self) -> None:
        if OPENSSL is None:
            self.fail("openssl is not installed (Debian package openssl; .ci/run installs it)")
        server = await Server(self).start(self)
        script = f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode()

        def run() -> bytes:
            import subprocess

            done = subprocess.run(
                [
                    OPENSSL,
                    "s_client",
                    "-quiet",
                    "-starttls",
                    "pop3",
                    "-CAfile",
                    server.certPath,
                    "-connect",
                    f"127.0.0.1:{server.pop3}",
                ],
                input=script,
                capture_output=True,
                timeout=20,
                check=False,
            )
            return done.stdout

        out = await deferToThread(run)
        self.assertIn(f"+OK 3 {sum(len(expected(m)) for m in MESSAGES)}".encode(), out)
        self.assertIn(b"+OK mx.test bye", out)
