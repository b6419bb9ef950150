"""End to end: STARTTLS, SMTPS and AUTH on the embedded service, with smtplib,
swaks and signals, as a mail client and an administrator would use them."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import time
from typing import Any, cast

from cryptography import x509
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort, IReactorFromThreads
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from qmailtx import makeMailService
from qmailtx.config import Config, ConfigError
from qmailtx.tap import installReloadHandler
from qmailtx.testing import makeTestCertificate, makeTestConfig, makeTestUsers

SWAKS = shutil.which("swaks")
ALICE, ALICE_PASSWORD = "alice@example.com", "alice-Secr3t"
BOB, BOB_PASSWORD = "bob@example.com", "bob-Secr3t"
MESSAGE = b"Subject: submitted\r\n\r\nHello, Bob.\r\n"

LISTENERS = """
[smtp]
listen = ["tcp:0:interface=127.0.0.1"]
relay_clients = []
policies = ["relay"]
cram_md5 = true
[submission]
listen = ["tcp:0:interface=127.0.0.1"]
policies = ["relay"]
[smtps]
listen = ["tcp:0:interface=127.0.0.1"]
policies = ["relay"]
"""


def readReply(sock: socket.socket | ssl.SSLSocket) -> list[str]:
    """One whole reply, read a byte at a time (nothing past it is consumed)."""
    lines: list[str] = []
    line = b""
    while True:
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"closed after {lines!r}")
        line += byte
        if line.endswith(b"\r\n"):
            text = line[:-2].decode("ascii")
            lines.append(text)
            line = b""
            if len(text) < 4 or text[3] == " ":
                return lines


class Server:
    """A started makeMailService with TLS, users and all three listeners."""

    def __init__(self, test: TestCase, extra: str = "", cramMD5: bool = True) -> None:
        folder = os.path.abspath(test.mktemp())
        self.certPath, self.keyPath = makeTestCertificate(
            os.path.join(folder, "tls"), "mx.test", serial=1111
        )
        tls = f'[tls]\ncertificate = "{self.certPath}"\nkey = "{self.keyPath}"\n'
        listeners = LISTENERS if cramMD5 else LISTENERS.replace("cram_md5 = true\n", "")
        self.config: Config = makeTestConfig(folder, listeners + tls + extra)
        users = makeTestUsers(
            self.config.users.database, {ALICE: ALICE_PASSWORD, BOB: BOB_PASSWORD}
        )
        users.close()
        self.service = makeMailService(reactor, self.config)
        self.ports: dict[str, int] = {}

    async def start(self, test: TestCase) -> Server:
        self.service.startService()
        test.addCleanup(self.service.stopService)
        for name in ("smtp", "submission", "smtps"):
            listener = list(cast(MultiService, self.service.getServiceNamed(name)))[0]
            port: IListeningPort = await listener._waitingForPort
            self.ports[name] = int(port.getHost().port)  # type: ignore[attr-defined]
        return self

    def trusting(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.certPath)

    async def mailFor(self, address: str, count: int = 1) -> list[bytes]:
        name, _, domain = address.partition("@")
        new = os.path.join(self.config.paths.data, "domains", domain, name, "Maildir", "new")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = sorted(os.listdir(new)) if os.path.isdir(new) else []
            if len(names) >= count:
                found = []
                for entry in names:
                    with open(os.path.join(new, entry), "rb") as f:
                        found.append(f.read())
                return found
            await deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"no mail for {address} after 10 s")


def authenticate(client: smtplib.SMTP, mechanism: str, user: str, password: str) -> Any:
    client.user, client.password = user, password
    method = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
    return client.auth(mechanism, method)


class StartTLSAndAuthTests(TestCase):
    async def test_eachMechanismAfterSTARTTLSRelaysAndDelivers(self) -> None:
        server = await Server(self).start(self)
        port = server.ports["smtp"]

        def submit(mechanism: str) -> tuple[list[str], list[str], Any, dict[str, Any]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("laptop.example")
                before = sorted(client.esmtp_features)
                client.starttls(context=server.trusting())
                client.ehlo("laptop.example")
                after = sorted(client.esmtp_features)
                reply = authenticate(client, mechanism, ALICE, ALICE_PASSWORD)
                refused = client.sendmail(ALICE, [BOB, "friend@elsewhere.example"], MESSAGE)
            return before, after, reply, refused

        for mechanism in ["PLAIN", "LOGIN", "CRAM-MD5"]:
            before, after, reply, refused = await deferToThread(submit, mechanism)
            self.assertIn("starttls", before)
            self.assertNotIn("starttls", after)
            self.assertEqual(reply, (235, b"2.7.0 ok, go ahead"))
            self.assertEqual(refused, {})
        delivered = await server.mailFor(BOB, 3)
        for message in delivered:
            received = message.split(b"\n")[2:4]
            self.assertEqual(
                received[0],
                b"Received: from unknown (HELO laptop.example) (alice@example.com@127.0.0.1)",
            )
            self.assertRegex(
                received[1], rb"^  by mx\.test with ESMTPSA \(TLSv1\.[23] \S+ encrypted\); "
            )
            self.assertTrue(message.endswith(b"Subject: submitted\n\nHello, Bob.\n"))

    async def test_relayRefusedBeforeAuth(self) -> None:
        server = await Server(self).start(self)

        def attempt() -> tuple[Any, Any, Any]:
            with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as client:
                client.starttls(context=server.trusting())
                client.ehlo("laptop.example")
                client.mail(ALICE)
                outside = client.rcpt("friend@elsewhere.example")
                local = client.rcpt(BOB)
                client.rset()
                authenticate(client, "PLAIN", ALICE, ALICE_PASSWORD)
                client.mail(ALICE)
                return outside, local, client.rcpt("friend@elsewhere.example")

        outside, local, afterAuth = await deferToThread(attempt)
        self.assertEqual(
            outside, (553, b"5.7.1 sorry, that domain isn't in my list of allowed rcpthosts")
        )
        self.assertEqual(local[0], 250)
        self.assertEqual(afterAuth[0], 250)

    async def test_badLoginsAreRefusedAndSecretsStayOutOfTheLogs(self) -> None:
        server = await Server(self).start(self)

        def attempt(user: str, password: str, mechanism: str) -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=40) as client:
                client.starttls(context=server.trusting())
                client.ehlo("laptop.example")
                try:
                    return cast(tuple[int, bytes], authenticate(client, mechanism, user, password))
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, cast(bytes, e.smtp_error)

        with capturedLogs() as events:
            started = time.monotonic()
            results = [
                await deferToThread(attempt, ALICE, "Wr0ng-guess", "PLAIN"),
                await deferToThread(attempt, "nobody@example.com", ALICE_PASSWORD, "LOGIN"),
                await deferToThread(attempt, ALICE, "Wr0ng-guess", "CRAM-MD5"),
                await deferToThread(attempt, ALICE, ALICE_PASSWORD, "PLAIN"),
            ]
            elapsed = time.monotonic() - started
        failed = (535, b"5.7.8 authorization failed")
        self.assertEqual(results, [failed, failed, failed, (235, b"2.7.0 ok, go ahead")])
        self.assertGreaterEqual(elapsed, 1 + 2 + 4)  # the penalty grows per address
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        for secret in [ALICE_PASSWORD, "Wr0ng-guess"]:
            self.assertNotIn(secret, text)
        self.assertIn("AUTH PLAIN as alice@example.com from 127.0.0.1", text)


class SubmissionTests(TestCase):
    async def test_mailBeforeAuthIsRefused(self) -> None:
        server = await Server(self).start(self)

        def attempt() -> tuple[Any, Any, Any]:
            with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
                client.ehlo("laptop.example")
                early = client.mail(ALICE)
                client.starttls(context=server.trusting())
                client.ehlo("laptop.example")
                still = client.mail(ALICE)
                authenticate(client, "LOGIN", BOB, BOB_PASSWORD)
                return early, still, client.mail(BOB)

        early, still, late = await deferToThread(attempt)
        self.assertEqual(early, (530, b"5.7.0 authentication required"))
        self.assertEqual(still, (530, b"5.7.0 authentication required"))
        self.assertEqual(late[0], 250)

    async def test_cramMD5OnlyWhenConfigured(self) -> None:
        server = await Server(self, cramMD5=False).start(self)

        def offered() -> str:
            with smtplib.SMTP_SSL(
                "127.0.0.1", server.ports["smtps"], timeout=10, context=server.trusting()
            ) as client:
                client.ehlo("laptop.example")
                return str(client.esmtp_features["auth"])

        # smtplib joins the "AUTH" and "AUTH=" lines
        self.assertEqual(set((await deferToThread(offered)).split()), {"LOGIN", "PLAIN"})

    async def test_smtpsWithCramMD5(self) -> None:
        server = await Server(self).start(self)

        def submit() -> tuple[bool, dict[str, Any]]:
            with smtplib.SMTP_SSL(
                "127.0.0.1", server.ports["smtps"], timeout=10, context=server.trusting()
            ) as client:
                client.ehlo("laptop.example")
                offered = client.has_extn("starttls")
                self.assertIn("CRAM-MD5", client.esmtp_features["auth"])
                client.login(BOB, BOB_PASSWORD)  # smtplib prefers CRAM-MD5
                return offered, client.sendmail(BOB, [ALICE], MESSAGE)

        self.assertEqual(await deferToThread(submit), (False, {}))
        [message] = await server.mailFor(ALICE)
        self.assertIn(b"(bob@example.com@127.0.0.1)\n  by mx.test with ESMTPSA (TLSv1.", message)

    async def test_smtpsNeedsTLSConfigured(self) -> None:
        config = makeTestConfig(self.mktemp(), LISTENERS)
        with self.assertRaises(ConfigError) as caught:
            makeMailService(reactor, config)
        self.assertIn("[smtps]", str(caught.exception))
        self.assertIn("[tls]", str(caught.exception))


class SwaksTests(TestCase):
    async def swaks(self, *args: str) -> tuple[bytes, int]:
        if SWAKS is None:
            raise AssertionError("swaks is not installed (apt-get install swaks)")
        out, err, code = await getProcessOutputAndValue(SWAKS, list(args), env=os.environ)
        return out + err, code

    async def test_swaksAuthMechanisms(self) -> None:
        server = await Server(self).start(self)
        for mechanism in ["PLAIN", "LOGIN", "CRAM-MD5"]:
            out, code = await self.swaks(
                "--server",
                f"127.0.0.1:{server.ports['submission']}",
                "--tls",
                "--auth",
                mechanism,
                "--auth-user",
                ALICE,
                "--auth-password",
                ALICE_PASSWORD,
                "--from",
                ALICE,
                "--to",
                BOB,
                "--header",
                f"Subject: swaks {mechanism}",
            )
            self.assertEqual(code, 0, out)
            self.assertIn(b"<~  235 2.7.0 ok, go ahead", out)
            self.assertIn(b"<~  250 2.0.0 ok ", out)  # "~": inside TLS
        delivered = await server.mailFor(BOB, 3)
        subjects = sorted(line for m in delivered for line in m.split(b"\n") if b"Subject:" in line)
        self.assertEqual(
            subjects, [b"Subject: swaks CRAM-MD5", b"Subject: swaks LOGIN", b"Subject: swaks PLAIN"]
        )

    async def test_swaksBadPasswordAndSMTPS(self) -> None:
        server = await Server(self).start(self)
        out, code = await self.swaks(
            "--server",
            f"127.0.0.1:{server.ports['smtp']}",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            ALICE,
            "--auth-password",
            "not-it",
            "--from",
            ALICE,
            "--to",
            "friend@elsewhere.example",
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"535 5.7.8 authorization failed", out)
        out, code = await self.swaks(
            "--server",
            f"127.0.0.1:{server.ports['smtps']}",
            "--tls-on-connect",
            "--auth",
            "LOGIN",
            "--auth-user",
            BOB,
            "--auth-password",
            BOB_PASSWORD,
            "--from",
            BOB,
            "--to",
            "friend@elsewhere.example",
        )
        self.assertEqual(code, 0, out)
        self.assertIn(b"~> RCPT TO:<friend@elsewhere.example>\n<~  250 2.1.5 ok", out)


class ReloadTests(TestCase):
    def test_noHandlerWithoutTLS(self) -> None:
        config = makeTestConfig(self.mktemp(), '[smtp]\nlisten = []\npolicies = ["relay"]\n')
        service = makeMailService(reactor, config)
        previous = signal.getsignal(signal.SIGHUP)
        self.assertFalse(installReloadHandler(cast(IReactorFromThreads, reactor), service))
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)

    async def test_sighupSwapsTheCertificateAndOpenConnectionsKeepWorking(self) -> None:
        server = await Server(self).start(self)
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.assertTrue(installReloadHandler(cast(IReactorFromThreads, reactor), server.service))
        port = server.ports["smtp"]

        def connect() -> tuple[ssl.SSLSocket, int]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            readReply(sock)
            sock.sendall(b"EHLO laptop.example\r\nSTARTTLS\r\n")
            readReply(sock)
            self.assertEqual(readReply(sock), ["220 2.0.0 ready for tls"])
            # Both certificates are self-signed: look at them, trust neither.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            wrapped = context.wrap_socket(sock, server_hostname="mx.test")
            der = wrapped.getpeercert(binary_form=True)
            assert der is not None
            return wrapped, x509.load_der_x509_certificate(der).serial_number

        old, serial = await deferToThread(connect)
        self.assertEqual(serial, 1111)
        makeTestCertificate(os.path.dirname(server.certPath), "mx.test", serial=2222)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            new, serial = await deferToThread(connect)
            new.close()
            if serial == 2222 or time.monotonic() > deadline:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(serial, 2222)

        def noopAndQuit(sock: ssl.SSLSocket) -> list[list[str]]:
            sock.sendall(b"NOOP\r\nQUIT\r\n")
            replies = [readReply(sock), readReply(sock)]
            sock.close()
            return replies

        self.assertEqual(
            await deferToThread(noopAndQuit, old), [["250 2.0.0 ok"], ["221 2.0.0 mx.test"]]
        )
