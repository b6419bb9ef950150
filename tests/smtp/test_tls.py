"""STARTTLS and SMTPS: state reset, plaintext injection, handshakes, reloads.

The first tests drive the protocol on a StringTransport (``startTLS`` is only
recorded there); the rest run a real server on a loopback port against
Python's ``ssl``, ``smtplib`` and ``openssl s_client``.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import warnings
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from qmailtx.config import ConfigError
from qmailtx.domains import DomainTable
from qmailtx.policy.relay import RelayControl
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.store import QueueStore, synchronousRunner
from qmailtx.smtp.factory import SMTPServerFactory, SMTPSettings
from qmailtx.smtp.server import ESMTPServer
from qmailtx.smtp.tls import ServerTLS, TLSLoadError, TLSService, loadTLS
from qmailtx.testing import SMTPServerHarness, makeTestCertificate

OPENSSL = shutil.which("openssl")


class StartTLSProtocolTests(SynchronousTestCase):
    def harness(self, tls: bool = True, **kw: Any) -> SMTPServerHarness:
        self.tls = ServerTLS("/nonexistent/cert.pem")  # never loaded: nothing encrypts here
        h = SMTPServerHarness(self.mktemp(), tls=self.tls if tls else None, **kw)
        h.clear()
        return h

    def test_advertisedOnlyWithTLSAndOnlyBeforeIt(self) -> None:
        h = self.harness(tls=False)
        h.send(b"EHLO c\r\nSTARTTLS\r\n")
        self.assertNotIn("250-STARTTLS", h.replies())
        self.assertEqual(h.replies()[-1], "502 5.5.1 unimplemented")
        h = self.harness()
        h.send(b"EHLO c\r\n")
        self.assertEqual(h.replies()[1], "250-STARTTLS")
        h.send(b"STARTTLS\r\n")
        h.send(b"EHLO c\r\n")
        h.send(b"STARTTLS\r\n")
        self.assertNotIn(
            "250-STARTTLS", h.replies()[h.replies().index("220 2.0.0 ready for tls") :]
        )
        self.assertEqual(h.replies()[-1], "502 5.5.1 unimplemented")
        self.assertEqual(h.transport.tlsStarted, [self.tls])

    def test_parametersRefused(self) -> None:
        h = self.harness()
        h.send(b"STARTTLS now\r\n")
        self.assertEqual(h.replies(), ["501 5.5.4 syntax error (no parameters allowed)"])
        self.assertEqual(h.transport.tlsStarted, [])

    def test_pipelinedPlaintextIsDiscarded(self) -> None:
        """CVE-2011-0411: nothing sent after STARTTLS in the same packet runs."""
        h = self.harness()
        h.send(
            b"EHLO c\r\nMAIL FROM:<before@example.org>\r\nSTARTTLS\r\n"
            b"RSET\r\nMAIL FROM:<injected@example.org>\r\nRCPT TO:<u@mx.test>\r\n"
        )
        self.assertEqual(h.replies()[-2:], ["250 2.1.0 ok", "220 2.0.0 ready for tls"])
        self.assertEqual(h.transport.tlsStarted, [self.tls])
        session = h.protocol.session
        self.assertEqual((session.helo, session.sender, session.recipients), (None, None, []))
        self.assertTrue(session.secure)
        # The first bytes after the handshake are the first command inside TLS.
        h.clear()
        h.send(b"NOOP\r\n")
        self.assertEqual(h.replies(), ["250 2.0.0 ok"])

    def test_discardingIsLogged(self) -> None:
        h = self.harness()
        with capturedLogs() as events:
            h.send(b"STARTTLS\r\nRSET\r\n")
        self.assertTrue(any(e.get("count") == 6 for e in events), events)

    def test_sessionIsForgotten(self) -> None:
        h = self.harness(peerHost="192.0.2.1", settings={"authBeforeTLS": True})
        before = h.protocol.session
        before.notes["policy"] = "x"
        before.authenticatedAs = "alice@example.com"  # as after AUTH before TLS
        h.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nSTARTTLS\r\n")
        after = h.protocol.session
        self.assertIsNot(after, before)
        self.assertEqual(after.sessionId, before.sessionId)
        self.assertEqual((after.peerHost, after.listener), (before.peerHost, before.listener))
        self.assertEqual(
            (after.helo, after.esmtp, after.sender, after.recipients, after.authenticatedAs),
            (None, False, None, [], None),
        )
        self.assertEqual(after.notes, {})
        self.assertFalse(after.relayAllowed)

    def test_transactionAfterTLSWorks(self) -> None:
        h = self.harness()
        h.send(b"EHLO c\r\nSTARTTLS\r\n")
        h.clear()
        h.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        h.send(b"hi\r\n.\r\n")
        self.assertEqual(h.codes(), [250, 250, 250, 354, 250])
        [message] = h.committed
        received = h.messageBytes(message).split(b"\n")[1]
        self.assertTrue(received.startswith(b"  by mx.test with ESMTPS; "), received)

    def test_implicitTLSSessionIsSecureFromTheStart(self) -> None:
        h = self.harness(settings={"implicitTLS": True})
        h.send(b"EHLO c\r\nSTARTTLS\r\n")
        self.assertNotIn("250-STARTTLS", h.replies())
        self.assertTrue(h.protocol.session.secure)
        self.assertEqual(h.replies()[-1], "502 5.5.1 unimplemented")


class LoadTests(SynchronousTestCase):
    def test_loadsCertificateAndKey(self) -> None:
        cert, key = makeTestCertificate(self.mktemp(), "mx.test", serial=4242)
        loaded = loadTLS(cert, key)
        self.assertEqual((loaded.subject, loaded.serial), ("CN=mx.test", 4242))

    def test_oneFileHoldingBoth(self) -> None:
        folder = self.mktemp()
        cert, key = makeTestCertificate(folder)
        both = os.path.join(folder, "servercert.pem")
        with open(both, "wb") as out:
            for path in (cert, key):
                with open(path, "rb") as f:
                    out.write(f.read())
        self.assertEqual(loadTLS(both).subject, "CN=mx.test")

    def test_problemsNameTheFile(self) -> None:
        folder = self.mktemp()
        cert, key = makeTestCertificate(folder)
        otherCert, otherKey = makeTestCertificate(self.mktemp())
        cases = [
            (lambda: loadTLS(os.path.join(folder, "missing.pem"), key), "missing.pem"),
            (lambda: loadTLS(key, key), "no PEM certificate"),
            (lambda: loadTLS(cert, cert), "no PEM private key"),
            (lambda: loadTLS(cert, otherKey), "do not fit together"),
        ]
        for attempt, expected in cases:
            with self.assertRaises(TLSLoadError) as caught:
                attempt()
            self.assertIn(expected, str(caught.exception))

    def test_serviceRefusesToStartWithABadCertificate(self) -> None:
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write("not a certificate\n")
        service = TLSService(ServerTLS(path), synchronousRunner)
        with self.assertRaises(ConfigError) as caught:
            service.privilegedStartService()
        self.assertIn(path, str(caught.exception))


# -- on a loopback port ------------------------------------------------------------


def trustingContext(certPath: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certPath)
    return context


def readReply(sock: socket.socket | ssl.SSLSocket) -> list[str]:
    """One whole reply, read a byte at a time (no bytes past it are taken)."""
    lines: list[str] = []
    line = b""
    while True:
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"closed after {lines!r} {line!r}")
        line += byte
        if line.endswith(b"\r\n"):
            text = line[:-2].decode("ascii")
            lines.append(text)
            line = b""
            if len(text) < 4 or text[3] == " ":
                return lines


def certificateSerial(sock: ssl.SSLSocket) -> int:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class TrackingFactory(SMTPServerFactory):
    """Remembers its connections so a test can close them all at the end."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.connections: list[tuple[ESMTPServer, Deferred[None]]] = []

    def buildProtocol(self, addr: Any) -> ESMTPServer:
        protocol = super().buildProtocol(addr)
        lost: Deferred[None] = Deferred()
        original = protocol.connectionLost

        def connectionLost(reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
            original(reason)
            if not lost.called:
                lost.callback(None)

        protocol.connectionLost = connectionLost  # type: ignore[method-assign]
        self.connections.append((protocol, lost))
        return protocol

    async def closeAll(self) -> None:
        for protocol, lost in self.connections:
            if not lost.called and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        await gatherResults([lost for _, lost in self.connections])


class LoopbackTestCase(TestCase):
    def setUp(self) -> None:
        folder = self.mktemp()
        self.certPath, self.keyPath = makeTestCertificate(
            os.path.join(folder, "tls"), "mx.test", serial=1111
        )
        self.tls = ServerTLS(self.certPath, self.keyPath)
        self.tls.load()
        disk = QueueDisk(os.path.join(folder, "queue"))
        disk.create()
        self.store = QueueStore(disk, synchronousRunner)
        self.committed: list[QueuedMessage] = []
        self.store.addListener(self.committed.append)
        self.disk = disk

    def listen(self, implicit: bool = False) -> int:
        settings = SMTPSettings(
            me="mx.test", greeting="mx.test", envnoathost="mx.test", implicitTLS=implicit
        )
        table = DomainTable(frozenset({"mx.test"}), frozenset({"mx.test"}), {})
        factory = TrackingFactory(
            reactor, settings, self.store, (), [RelayControl(table)], tls=self.tls
        )
        self.addCleanup(factory.closeAll)
        serving: Any = TLSMemoryBIOFactory(self.tls, False, factory) if implicit else factory
        port: IListeningPort = reactor.listenTCP(0, serving, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)  # type: ignore[attr-defined]

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def startTLS(self, sock: socket.socket) -> ssl.SSLSocket:
        """Greeting, EHLO, STARTTLS, handshake: the TLS socket."""
        self.assertEqual(readReply(sock), ["220 mx.test ESMTP"])
        sock.sendall(b"EHLO client.example\r\n")
        self.assertIn("250-STARTTLS", readReply(sock))
        sock.sendall(b"STARTTLS\r\n")
        self.assertEqual(readReply(sock), ["220 2.0.0 ready for tls"])
        wrapped = trustingContext(self.certPath).wrap_socket(sock, server_hostname="mx.test")
        self.addCleanup(wrapped.close)
        return wrapped


class StartTLSLoopbackTests(LoopbackTestCase):
    async def test_smtplibStartTLSAndMessage(self) -> None:
        port = self.listen()

        def client() -> tuple[bool, bool, dict[str, Any]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.example")
                offered = smtp.has_extn("starttls")
                smtp.starttls(context=trustingContext(self.certPath))
                smtp.ehlo("client.example")
                again = smtp.has_extn("starttls")
                refused = smtp.sendmail("a@example.org", ["u@mx.test"], b"Subject: x\r\n\r\nhi\r\n")
            return offered, again, refused

        offered, again, refused = await deferToThread(client)
        self.assertEqual((offered, again, refused), (True, False, {}))
        [message] = self.committed
        content = bytes(self.disk.readMessage(message, message.messageLength))
        self.assertRegex(
            content.split(b"\n")[1],
            rb"^  by mx\.test with ESMTPS \(TLSv1\.[23] [A-Z0-9_-]+ encrypted\); ",
        )

    async def test_injectedCommandsAreNeverAnswered(self) -> None:
        """CVE-2011-0411, on a real socket: STARTTLS and RSET and MAIL in one packet."""
        port = self.listen()

        def attack() -> list[list[str]]:
            sock = self.connect(port)
            readReply(sock)
            sock.sendall(b"EHLO client.example\r\n")
            readReply(sock)
            sock.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@example.org>\r\n")
            replies = [readReply(sock)]
            wrapped = trustingContext(self.certPath).wrap_socket(sock, server_hostname="mx.test")
            # NOOP's "ok" and RSET's "flushed" tell the two apart; a MAIL that
            # survived would make the next MAIL a 503.
            for command in [b"NOOP", b"MAIL FROM:<a@example.org>", b"QUIT"]:
                wrapped.sendall(command + b"\r\n")
                replies.append(readReply(wrapped))
            return replies

        replies = await deferToThread(attack)
        self.assertEqual(
            replies,
            [
                ["220 2.0.0 ready for tls"],
                ["250 2.0.0 ok"],
                ["250 2.1.0 ok"],
                ["221 2.0.0 mx.test"],
            ],
        )

    async def test_garbageHandshakeHurtsOnlyItsConnection(self) -> None:
        port = self.listen()

        def garbage() -> bytes:
            sock = self.connect(port)
            readReply(sock)
            sock.sendall(b"STARTTLS\r\n")
            readReply(sock)
            sock.sendall(os.urandom(4096) + b"\r\nQUIT\r\n")
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
            return received

        for _ in range(3):
            await deferToThread(garbage)

        def goodClient() -> list[str]:
            wrapped = self.startTLS(self.connect(port))
            wrapped.sendall(b"EHLO again\r\nQUIT\r\n")
            return readReply(wrapped) + readReply(wrapped)

        replies = await deferToThread(goodClient)
        self.assertEqual(replies[0], "250-mx.test")
        self.assertEqual(replies[-1], "221 2.0.0 mx.test")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_tlsBelow12Refused(self) -> None:
        port = self.listen()

        def oldClient() -> str:
            sock = self.connect(port)
            readReply(sock)
            sock.sendall(b"STARTTLS\r\n")
            readReply(sock)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = ssl.TLSVersion.TLSv1_1
                context.set_ciphers("DEFAULT:@SECLEVEL=0")
            try:
                context.wrap_socket(sock)
            except ssl.SSLError as e:
                return str(e)
            return "handshake succeeded"

        error = await deferToThread(oldClient)
        # An alert from the server: the client did offer TLS 1.0/1.1.
        self.assertIn("PROTOCOL_VERSION", error)

    async def test_reloadSwapsTheCertificateForNewConnectionsOnly(self) -> None:
        port = self.listen()
        service = TLSService(self.tls, synchronousRunner)

        def open_() -> tuple[ssl.SSLSocket, int]:
            wrapped = self.startTLS(self.connect(port))
            return wrapped, certificateSerial(wrapped)

        first, serial = await deferToThread(open_)
        self.assertEqual(serial, 1111)
        makeTestCertificate(os.path.dirname(self.certPath), "mx.test", serial=2222)
        with capturedLogs() as events:
            self.assertTrue(await service.reload())
        self.assertIn("serial 8ae", "\n".join(formatEvent(e) for e in events))
        second, serial = await deferToThread(open_)
        self.assertEqual(serial, 2222)

        def stillWorks(sock: ssl.SSLSocket) -> list[str]:
            sock.sendall(b"NOOP\r\n")
            return readReply(sock)

        self.assertEqual(await deferToThread(stillWorks, first), ["250 2.0.0 ok"])
        self.assertEqual(certificateSerial(first), 1111)

        # A broken file: the reload fails, says so, and the last good one stays.
        with open(self.keyPath, "w") as f:
            f.write("garbage\n")
        with capturedLogs() as events:
            self.assertFalse(await service.reload())
        self.assertIn(
            "TLS reload failed, keeping the certificate in use",
            "\n".join(formatEvent(e) for e in events),
        )
        third, serial = await deferToThread(open_)
        self.assertEqual(serial, 2222)
        for sock in (first, second, third):
            self.assertEqual(await deferToThread(stillWorks, sock), ["250 2.0.0 ok"])

    async def test_opensslClient(self) -> None:
        if OPENSSL is None:
            raise AssertionError("openssl is not installed")
        port = self.listen()
        out, err, code = await getProcessOutputAndValue(
            OPENSSL,
            [
                "s_client",
                "-starttls",
                "smtp",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "mx.test",
                "-CAfile",
                self.certPath,
                "-crlf",
                "-ign_eof",
            ],
            env=os.environ,
            stdinBytes=b"EHLO x\nQUIT\n",
        )
        self.assertEqual(code, 0, err)
        text = out.decode("utf-8", "replace")
        self.assertRegex(text, r"subject=\s*CN\s*=\s*mx\.test")
        self.assertIn("Verify return code: 0 (ok)", text)
        self.assertIn("250-mx.test", text)
        self.assertNotIn("250-STARTTLS", text.split("250-mx.test", 1)[1])
        self.assertIn("221 2.0.0 mx.test", text)


class SMTPSLoopbackTests(LoopbackTestCase):
    async def test_smtplibSMTPSAndMessage(self) -> None:
        port = self.listen(implicit=True)

        def client() -> tuple[bool, dict[str, Any]]:
            context = trustingContext(self.certPath)
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context) as smtp:
                smtp.ehlo("client.example")
                offered = smtp.has_extn("starttls")
                refused = smtp.sendmail("a@example.org", ["u@mx.test"], b"Subject: x\r\n\r\nhi\r\n")
            return offered, refused

        self.assertEqual(await deferToThread(client), (False, {}))
        [message] = self.committed
        content = bytes(self.disk.readMessage(message, message.messageLength))
        self.assertRegex(content.split(b"\n")[1], rb"with ESMTPS \(TLSv1\.[23] \S+ encrypted\)")

    async def test_plaintextOnTheSMTPSPortGoesNowhere(self) -> None:
        port = self.listen(implicit=True)

        def plaintext() -> bytes:
            sock = self.connect(port)
            sock.sendall(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
            return received

        received = await deferToThread(plaintext)
        self.assertNotIn(b"220 mx.test", received)
        self.assertNotIn(b"250", received)
        self.assertEqual(self.committed, [])
