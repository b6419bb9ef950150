"""exeblock: DOS/Windows executables refused at end of DATA (P20, threats S15, S17)."""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.policy.exeblock import (
    DEFAULT,
    DEFAULT_SIGNATURES,
    ExecutableBlocker,
    Signatures,
    findExecutable,
)
from qmailtx.policy.interfaces import IDataCheck
from qmailtx.policy.mime import HEAD_LIMIT, HEADER_LIMIT, LINE_LIMIT, Part, parameters
from qmailtx.policy.verdict import CONTINUE, Verdict, VerdictKind
from qmailtx.registry import makeRegistry, policyChain
from qmailtx.smtp.session import SMTPSession
from qmailtx.testing import SMTPServerHarness, makeTestConfig

EXECUTABLE = "552 5.3.4 we don't accept email with executable content"


def fakePE(size: int = 4096) -> bytes:
    """A Windows-executable-looking file: MZ header, e_lfanew at 0x80, PE signature."""
    header = bytearray(b"MZx\x00\x01\x00\x00\x00\x04\x00" + b"\x00" * 0x36)
    header[0x3C:0x40] = struct.pack("<I", 0x80)
    body = bytes(header) + b"\x00" * (0x80 - 0x40) + b"PE\x00\x00\x4c\x01"
    return body + bytes(range(256)) * ((size - len(body)) // 256 + 1)


def msStubExe() -> bytes:
    """The start of a file made by Microsoft's linker (its base64 is the classic signature)."""
    return base64.b64decode("TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAA") + b"\x00" * 4000


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 16
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n" + bytes(range(256)) * 16


def b64(data: bytes, width: int = 76) -> bytes:
    """``data`` in base64 with lines of ``width`` characters."""
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + width] + b"\n" for i in range(0, len(encoded), width))


def attachment(
    payload: bytes,
    contentType: str = "application/octet-stream",
    name: str = "setup.exe",
    boundary: str = "XyZ",
) -> bytes:
    return (
        b"From: a@example.org\nTo: u@mx.test\nSubject: hello\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="' + boundary.encode() + b'"\n'
        b"\nThis is a multi-part message in MIME format.\n"
        b"--" + boundary.encode() + b"\n"
        b"Content-Type: text/plain; charset=us-ascii\n\nSee the attached file.\n\n"
        b"--" + boundary.encode() + b"\n"
        b"Content-Type: " + contentType.encode() + b'; name="' + name.encode() + b'"\n'
        b"Content-Transfer-Encoding: base64\n"
        b'Content-Disposition: attachment; filename="'
        + name.encode()
        + b'"\n\n'
        + payload
        + b"--"
        + boundary.encode()
        + b"--\n"
    )


def session() -> SMTPSession:
    return SMTPSession("192.0.2.9", 4000, sessionId="s9")


def judge(
    message: bytes, chunks: Iterable[int] | int = 65536, signatures: Signatures | None = None
) -> Verdict:
    check = ExecutableBlocker(session(), signatures or DEFAULT)
    if isinstance(chunks, int):
        size = chunks
        for i in range(0, len(message), size):
            check.dataReceived(message[i : i + size])
    else:
        start = 0
        for cut in list(chunks) + [len(message)]:
            check.dataReceived(message[start:cut])
            start = cut
    return check.endOfData()


def replyOf(verdict: Verdict | Deferred[Verdict]) -> str:
    assert isinstance(verdict, Verdict)  # exeblock answers at once
    return str(verdict.reply) if verdict.reply else verdict.kind.value


class InterfaceTests(SynchronousTestCase):
    def test_providesIDataCheck(self) -> None:
        self.assertTrue(verifyObject(IDataCheck, ExecutableBlocker(session())))

    def test_emptyMessage(self) -> None:
        self.assertEqual(judge(b""), CONTINUE)

    def test_registeredAsNamedAdapter(self) -> None:
        registry = makeRegistry(makeTestConfig(self.mktemp()), names=["exeblock"])
        chain = policyChain(registry, ["exeblock"])
        self.assertEqual([name for name, _ in chain.data], ["exeblock"])
        _, factory = chain.data[0]
        first, second = factory(session()), factory(session())
        assert isinstance(first, ExecutableBlocker)
        self.assertIsNot(first, second)  # fresh per message
        self.assertEqual(first.signatures, Signatures.fromLines(DEFAULT_SIGNATURES))


class AttachmentTests(SynchronousTestCase):
    def test_peAttachment76Refused(self) -> None:
        self.assertEqual(replyOf(judge(attachment(b64(fakePE(), 76)))), EXECUTABLE)

    def test_peAttachment60Refused(self) -> None:
        self.assertEqual(replyOf(judge(attachment(b64(fakePE(), 60)))), EXECUTABLE)

    def test_anyLineWidthAndWhiteSpace(self) -> None:
        """The decoded-bytes check does not depend on how base64 is wrapped."""
        encoded = base64.b64encode(fakePE())
        for payload in (
            b64(fakePE(), 1),
            b64(fakePE(), 3),
            b64(fakePE(), 1000),
            encoded + b"\n",
            b"\n\n  " + b" \t".join(encoded[i : i + 5] for i in range(0, 4000, 5)) + b"\n",
        ):
            self.assertEqual(replyOf(judge(attachment(payload))), EXECUTABLE, payload[:40])

    def test_classicSignatureOnFirstLine(self) -> None:
        message = attachment(b64(msStubExe()))
        self.assertTrue(b"\n\nTVqQAAMAAAAEAAAA//8AALgAAAAA" in message)
        check = ExecutableBlocker(session())
        with capturedLogs() as events:
            check.dataReceived(message)
            self.assertEqual(replyOf(check.endOfData()), EXECUTABLE)
        self.assertEqual(events[0]["rule"], "signature")
        self.assertEqual(events[0]["detail"], "TVqQAAMAAAAEAAAA//8AALgAAAAA")

    def test_renamedAttachmentStillRefused(self) -> None:
        """P20 test 1: the same bytes under a harmless name and type."""
        message = attachment(b64(fakePE()), contentType="image/png", name="cat.png")
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_pngAndPdfAccepted(self) -> None:
        for data, kind, name in ((PNG, "image/png", "cat.png"), (PDF, "application/pdf", "a.pdf")):
            for width in (76, 60):
                self.assertEqual(judge(attachment(b64(data, width), kind, name)), CONTINUE)

    def test_dosOnlyExecutable(self) -> None:
        """An MZ file without a PE header (a DOS program) in a non-text part."""
        self.assertEqual(replyOf(judge(attachment(b64(b"MZ" + b"\x01" * 600)))), EXECUTABLE)

    def test_textPartStartingWithMZWords(self) -> None:
        """Base64 text that happens to start with "MZ" is text, not a program..."""
        text = b"MZ Widgets Ltd\nInvoice 42\n" * 50
        message = attachment(b64(text), contentType="text/plain", name="invoice.txt")
        self.assertEqual(judge(message), CONTINUE)

    def test_peLabelledAsText(self) -> None:
        """... but a real PE file labelled text/plain is refused."""
        message = attachment(b64(fakePE()), contentType="text/plain", name="readme.txt")
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_quotedPrintableExecutable(self) -> None:
        encoded = binascii.b2a_qp(fakePE(300))
        message = attachment(encoded + b"\n").replace(
            b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable"
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_foldedContentType(self) -> None:
        message = attachment(b64(fakePE())).replace(
            b'multipart/mixed; boundary="XyZ"', b"multipart/mixed;\n\tboundary=\n  XyZ"
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_bodyWithoutEmptyLineAfterHeaders(self) -> None:
        """A non-header line ends the headers, so a missing empty line or a
        line of white space in its place hides nothing."""
        for separator in (b"", b" \n", b"\t\n"):
            message = attachment(b64(fakePE())).replace(
                b'filename="setup.exe"\n\n', b'filename="setup.exe"\n' + separator
            )
            self.assertEqual(replyOf(judge(message)), EXECUTABLE, separator)
            self.assertEqual(replyOf(judge(message, 1)), EXECUTABLE, separator)

    def test_singlePartMessage(self) -> None:
        message = (
            b"Subject: x\nContent-Type: application/x-msdownload\n"
            b"Content-Transfer-Encoding: base64\n\n" + b64(fakePE())
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_executableAfterManyParts(self) -> None:
        parts = b"".join(
            b"--XyZ\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\n" + b64(PNG)
            for _ in range(50)
        )
        message = attachment(b64(fakePE())).replace(b"--XyZ\n", parts + b"--XyZ\n", 1)
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_crlfLineEnds(self) -> None:
        message = attachment(b64(fakePE())).replace(b"\n", b"\r\n")
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_uuencodedExecutable(self) -> None:
        data = fakePE(200)
        lines = b"".join(binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45))
        message = b"Subject: x\n\nHere it is:\n\nbegin 644 game.exe\n" + lines + b"`\nend\n"
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)
        harmless = message.replace(lines, binascii.b2a_uu(b"just some text"))
        self.assertEqual(judge(harmless), CONTINUE)


class ChunkingTests(SynchronousTestCase):
    def test_oneByteAtATime(self) -> None:
        self.assertEqual(replyOf(judge(attachment(b64(fakePE(600))), 1)), EXECUTABLE)
        self.assertEqual(replyOf(judge(attachment(b64(msStubExe()[:600])), 1)), EXECUTABLE)
        self.assertEqual(judge(attachment(b64(PNG[:600]), "image/png", "a.png"), 1), CONTINUE)

    def test_signatureSplitAnywhere(self) -> None:
        """Every two-chunk split, including inside the boundary and the signature."""
        message = attachment(b64(msStubExe()[:300]))
        where = message.index(b"TVqQ")
        for cut in range(where - 150, where + 40):
            verdict = judge(message, [cut])
            self.assertEqual(replyOf(verdict), EXECUTABLE, cut)

    def test_threeWaySplits(self) -> None:
        message = attachment(b64(fakePE(300)), boundary="b")
        where = message.index(b"--b\nContent-Type: application")
        for first in range(where - 3, where + 8):
            for second in range(first, first + 70, 7):
                self.assertEqual(replyOf(judge(message, [first, second])), EXECUTABLE)


class StructureTests(SynchronousTestCase):
    def nested(self, inner: bytes) -> bytes:
        return (
            b"Subject: x\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/alternative; boundary="outer"\n\n'
            b"--outer\nContent-Type: text/plain\n\nplain version\n"
            b'--outer\nContent-Type: multipart/mixed; boundary="inner"\n\n'
            b"--inner\nContent-Type: text/html\n\n<p>html</p>\n"
            b"--inner\nContent-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\n\n" + inner + b"--inner--\nepilogue\n"
            b"--outer--\n"
        )

    def test_nestedMultipart(self) -> None:
        check = ExecutableBlocker(session())
        with capturedLogs() as events:
            check.dataReceived(self.nested(b64(fakePE())))
            self.assertEqual(replyOf(check.endOfData()), EXECUTABLE)
        [event] = events
        self.assertEqual(event["policy"], "exeblock")
        self.assertEqual((event["peer"], event["session"]), ("192.0.2.9", "s9"))
        self.assertEqual((event["contentType"], event["depth"]), ("application/octet-stream", 2))
        self.assertEqual(event["rule"], "PE header")
        # The log names the part, never its content.
        body = b64(fakePE()).decode()
        for value in event.values():
            self.assertNotIn(body[:60], str(value))
            self.assertNotIn("plain version", str(value))

    def test_nestedHarmless(self) -> None:
        self.assertEqual(judge(self.nested(b64(PNG))), CONTINUE)

    def test_innerBoundaryNotClosed(self) -> None:
        """An outer delimiter closes the inner levels left open."""
        message = self.nested(b64(PNG)).replace(b"--inner--\nepilogue\n", b"")
        message = message.replace(
            b"--outer--\n",
            b"--outer\nContent-Type: application/x-msdownload\n"
            b"Content-Transfer-Encoding: base64\n\n" + b64(fakePE()) + b"--outer--\n",
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_embeddedMessage(self) -> None:
        """P20 test 2: multipart inside message/rfc822 is followed."""
        message = (
            b'Subject: fwd\nContent-Type: multipart/mixed; boundary="a"\n\n'
            b"--a\nContent-Type: text/plain\n\nForwarded.\n"
            b"--a\nContent-Type: message/rfc822\n\n"
            + attachment(b64(fakePE()), boundary="b")
            + b"--a--\n"
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_digestPartsAreMessages(self) -> None:
        message = (
            b'Subject: digest\nContent-Type: multipart/digest; boundary="d"\n\n'
            b"--d\n\n" + attachment(b64(PNG), "image/png", "a.png", boundary="b1") + b"\n"
            b"--d\n\n" + attachment(b64(fakePE()), boundary="b2") + b"\n--d--\n"
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_deepNestingRefusedAsUncheckable(self) -> None:
        """threats S17: 1000 nested levels cost little and are refused, not recursed."""
        levels = 1000
        message = b"Subject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n"
        for i in range(1, levels):
            message += b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i - 1, i)
        message += b"--b%d\nContent-Type: text/plain\n\nhello\n" % (levels - 1)
        message += b"".join(b"--b%d--\n" % i for i in reversed(range(levels)))
        check = ExecutableBlocker(session())
        with capturedLogs() as events:
            for i in range(0, len(message), 100):
                check.dataReceived(message[i : i + 100])
                self.assertLess(check.walker.bufferedBytes(), 4096)
            verdict = check.endOfData()
        self.assertEqual(
            replyOf(verdict),
            "554 5.6.0 sorry, the MIME structure of this message is too complex to be checked",
        )
        self.assertEqual(events[0]["problem"], "MIME parts nested more than 32 levels deep")

    def test_nestingWithinLimitIsFollowed(self) -> None:
        levels = 31
        message = b"Subject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n"
        for i in range(1, levels):
            message += b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i - 1, i)
        harmless = message + b"--b%d\nContent-Type: text/plain\n\nhello\n" % (levels - 1)
        self.assertEqual(judge(harmless), CONTINUE)
        exe = (
            message + b"--b%d\nContent-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\n\n" % (levels - 1) + b64(fakePE())
        )
        self.assertEqual(replyOf(judge(exe)), EXECUTABLE)

    def test_deeplyEmbeddedMessagesCostNoMemory(self) -> None:
        """message/rfc822 layers hold no state: 1000 of them are followed to the end."""
        wrap = b"Subject: layer\nContent-Type: message/rfc822\n\n" * 1000
        check = ExecutableBlocker(session())
        check.dataReceived(wrap + attachment(b64(fakePE())))
        self.assertLess(check.walker.bufferedBytes(), 4096)
        self.assertEqual(replyOf(check.endOfData()), EXECUTABLE)

    def test_tooManyParts(self) -> None:
        message = b"Content-Type: multipart/mixed; boundary=a\n\n" + b"--a\n\nx\n" * 10001
        self.assertEqual(judge(message).reply.code, 554)  # type: ignore[union-attr]

    def test_overlongBoundary(self) -> None:
        message = b"Content-Type: multipart/mixed; boundary=" + b"a" * 300 + b"\n\nx\n"
        self.assertEqual(judge(message).reply.code, 554)  # type: ignore[union-attr]

    def test_lookalikeBoundaryIsNotADelimiter(self) -> None:
        """A line "--XyZabc" does not start a part when the boundary is "XyZ" (RFC 2046
        5.1.1): what follows is text, as a mail reader shows it."""
        message = attachment(b64(PNG), "image/png", "a.png").replace(
            b"See the attached file.\n",
            b"--XyZabc\nContent-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\n\n" + b64(fakePE()),
        )
        self.assertEqual(judge(message), CONTINUE)
        self.assertEqual(replyOf(judge(message.replace(b"XyZabc", b"XyZ "))), EXECUTABLE)

    def test_parameters(self) -> None:
        self.assertEqual(
            parameters(b' Multipart/Mixed (x; y) ; BOUNDARY="a\\"b;c"; name=x.exe'),
            ("multipart/mixed", {"boundary": 'a"b;c', "name": "x.exe"}),
        )


class BounceTests(SynchronousTestCase):
    """P20 test 2: a bounce's returned message is scanned like any message."""

    bounce = (
        b"From: MAILER-DAEMON@mx.test\nSubject: failure notice\n\n"
        b"Hi. This is the qmail-send program at mx.test.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n\n"
        b"<u@example.org>:\nSorry, no mailbox here by that name.\n\n"
        b"--- Below this line is a copy of the message.\n\n"
    )

    def test_returnedExecutableRefused(self) -> None:
        self.assertEqual(replyOf(judge(self.bounce + attachment(b64(fakePE())))), EXECUTABLE)
        self.assertEqual(replyOf(judge(self.bounce + attachment(b64(msStubExe())))), EXECUTABLE)

    def test_plainBounceAccepted(self) -> None:
        returned = b"Subject: hi\n\nTVqQAAMAAAAEAAAA is the start of a program.\n"
        self.assertEqual(judge(self.bounce + returned), CONTINUE)

    def test_eximBounce(self) -> None:
        exim = (
            b"Subject: Mail delivery failed\n\n"
            b"This message was created automatically by mail delivery software.\n\n"
            b"------ This is a copy of the message, including all the headers. ------\n"
        )
        self.assertEqual(replyOf(judge(exim + attachment(b64(fakePE())))), EXECUTABLE)

    def test_uuencodedInBounceText(self) -> None:
        data = fakePE()[:90]
        lines = binascii.b2a_uu(data[:45]) + binascii.b2a_uu(data[45:])
        message = self.bounce.replace(
            b"Sorry, no mailbox", b"begin 600 x.exe\n" + lines + b"`\nend\nSorry, no mailbox"
        )
        self.assertEqual(replyOf(judge(message + b"Subject: x\n\nhi\n")), EXECUTABLE)

    def test_transferEncodingWithComment(self) -> None:
        message = attachment(b64(fakePE())).replace(
            b"Transfer-Encoding: base64", b"Transfer-Encoding: BASE64 (binary data)"
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_boundaryEndsBounceText(self) -> None:
        """A bounce-like first line does not hide the parts after it."""
        message = attachment(b64(fakePE())).replace(
            b"See the attached file.", b"Hi. This is the qmail-send program."
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)


class PlainTextTests(SynchronousTestCase):
    """Signatures are checked on the first line of each body only (qmail's rule)."""

    def test_signatureInsideTextAccepted(self) -> None:
        message = (
            b"Subject: how to spot a program\n\nIn base64 an exe starts with\n"
            b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAA\n"
            b"and you can see TVqQAAMAAAAEAAAA in the middle of a line too.\n"
        )
        self.assertEqual(judge(message), CONTINUE)

    def test_signatureOnFirstLineOfTextRefused(self) -> None:
        message = b"Subject: x\n\n\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAA\nmore\n"
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)

    def test_signatureOnFirstLineOfTextPartRefused(self) -> None:
        message = attachment(b"").replace(
            b"See the attached file.", b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAA"
        )
        self.assertEqual(replyOf(judge(message)), EXECUTABLE)


class SignatureTests(SynchronousTestCase):
    zip = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(200))

    def test_customSignaturesFromControl(self) -> None:
        config = makeTestConfig(self.mktemp(), '[control]\nsignatures = ["UEsDBBQAAAAIA"]\n')
        registry = makeRegistry(config, names=["exeblock"])
        [(_, factory)] = policyChain(registry, ["exeblock"]).data
        check = factory(session())
        check.dataReceived(attachment(b64(self.zip), "application/zip", "a.zip"))
        self.assertEqual(replyOf(check.endOfData()), EXECUTABLE)
        # The custom list replaces the classic one: this first line is now only text...
        check = factory(session())
        check.dataReceived(b"Subject: x\n\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAA\n")
        self.assertEqual(check.endOfData(), CONTINUE)
        # ...while decoded MZ headers are refused whatever the list.
        check = factory(session())
        check.dataReceived(attachment(b64(fakePE())))
        self.assertEqual(replyOf(check.endOfData()), EXECUTABLE)

    def test_customSignatureMatchesDecodedContentAtAnyWidth(self) -> None:
        signatures = Signatures.fromLines(["UEsDBBQAAAAIA"])
        for width in (76, 60, 7, 1):
            message = attachment(b64(self.zip, width), "application/zip", "a.zip")
            self.assertEqual(replyOf(judge(message, signatures=signatures)), EXECUTABLE)

    def test_nonBase64SignatureMatchesLinesOnly(self) -> None:
        signatures = Signatures.fromLines(["  ", "#!/bin/sh", "#!/bin/sh"])
        self.assertEqual(signatures.encoded, (b"#!/bin/sh",))
        self.assertEqual(signatures.decoded, ())
        self.assertEqual(replyOf(judge(b"\n#!/bin/sh\nrm\n", signatures=signatures)), EXECUTABLE)

    def test_findExecutable(self) -> None:
        sigs = Signatures.fromLines(DEFAULT_SIGNATURES)
        part = Part(0, "application/octet-stream", "base64", None)
        text = Part(0, "text/plain", "7bit", None)
        self.assertEqual(findExecutable(sigs, part, b"", b"MZ\x00"), ("DOS header", ""))
        self.assertEqual(findExecutable(sigs, part, b"", b"ZM\x00"), ("DOS header", ""))
        self.assertIsNone(findExecutable(sigs, text, b"", b"MZ\x00"))
        self.assertEqual(findExecutable(sigs, text, b"", fakePE(200)), ("PE header", ""))
        self.assertIsNone(findExecutable(sigs, part, b"", b""))


class BoundsTests(SynchronousTestCase):
    """A 10 MB line anywhere costs a bounded amount of memory."""

    bound = LINE_LIMIT + HEAD_LIMIT + 3 * HEADER_LIMIT + 1024

    def feedLong(self, before: bytes, line: bytes, after: bytes = b"") -> Verdict:
        check = ExecutableBlocker(session())
        check.dataReceived(before)
        chunk = 64 * 1024
        for i in range(0, len(line), chunk):
            check.dataReceived(line[i : i + chunk])
            self.assertLessEqual(check.walker.bufferedBytes(), self.bound)
        check.dataReceived(after)
        self.assertLessEqual(check.walker.bufferedBytes(), self.bound)
        return check.endOfData()

    def test_longTextLine(self) -> None:
        verdict = self.feedLong(b"Subject: x\n\n", b"a" * 10_000_000, b"\nbye\n")
        self.assertEqual(verdict, CONTINUE)

    def test_longHeaderLine(self) -> None:
        verdict = self.feedLong(
            b"Subject: x\nContent-Type: multipart/mixed; boundary=q; x=",
            b"y" * 10_000_000,
            b"\n\n--q\nContent-Transfer-Encoding: base64\n\n" + b64(fakePE()),
        )
        self.assertEqual(replyOf(verdict), EXECUTABLE)

    def test_longBase64Line(self) -> None:
        encoded = base64.b64encode(fakePE(7_500_000))
        verdict = self.feedLong(attachment(b"").split(b"--XyZ--")[0], encoded, b"\n--XyZ--\n")
        self.assertEqual(replyOf(verdict), EXECUTABLE)
        encoded = base64.b64encode(PNG * 1800)
        verdict = self.feedLong(attachment(b"").split(b"--XyZ--")[0], encoded, b"\n--XyZ--\n")
        self.assertEqual(verdict, CONTINUE)

    def test_longFoldedHeader(self) -> None:
        verdict = self.feedLong(
            b"Subject: x\nContent-Type: text/plain;\n", b" x=y;\n" * 2_000_000, b"\nhello\n"
        )
        self.assertEqual(verdict, CONTINUE)


class CostTests(SynchronousTestCase):
    """Bodies that cannot matter go by without a Python step per line (threats S17)."""

    def test_ordinaryAttachmentExaminesFewLines(self) -> None:
        message = attachment(b64(PNG * 2500), "image/png", "big.png")  # 10 MB encoded
        self.assertGreater(len(message), 10_000_000)
        check = ExecutableBlocker(session())
        for i in range(0, len(message), 65536):
            check.dataReceived(message[i : i + 65536])
        self.assertEqual(check.endOfData(), CONTINUE)
        # One line straddles each chunk; the rest are headers and delimiters.
        self.assertLess(check.walker.linesExamined, len(message) // 65536 + 40)

    def test_textAndBlankLinesExamineFewLines(self) -> None:
        message = b"Subject: x\n" + b"X-Pad: y\n" * 100_000 + b"\n\n" * 100_000
        message += b"hello\n" * 100_000
        check = ExecutableBlocker(session())
        for i in range(0, len(message), 65536):
            check.dataReceived(message[i : i + 65536])
        self.assertEqual(check.endOfData(), CONTINUE)
        self.assertLess(check.walker.linesExamined, len(message) // 65536 + 10)


class EndToEndTests(SynchronousTestCase):
    """Through the SMTP server (threats S15)."""

    def harness(self) -> SMTPServerHarness:
        registry = makeRegistry(makeTestConfig(self.mktemp()), names=["exeblock"])
        chain = policyChain(registry, ["exeblock"])
        h = SMTPServerHarness(self.mktemp(), dataChecks=chain.data)
        h.send(b"EHLO client.example\r\n")
        h.clear()
        return h

    def send(self, h: SMTPServerHarness, message: bytes) -> None:
        data = message.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        h.send(data + b".\r\n")

    def test_executableRefusedNothingQueued(self) -> None:
        h = self.harness()
        self.send(h, attachment(b64(fakePE(50_000))))
        self.assertEqual(h.replies()[-1], EXECUTABLE)
        self.assertEqual(h.committed, [])
        self.assertEqual(h.queuedFiles(), [])
        self.assertEqual(h.tmpFiles(), [])
        self.assertFalse(h.closed)

    def test_ordinaryAttachmentQueued(self) -> None:
        h = self.harness()
        message = attachment(b64(PNG * 20), "image/png", "cat.png")
        self.send(h, message)
        self.assertTrue(h.replies()[-1].startswith("250 2.0.0 ok"), h.replies())
        [queued] = h.committed
        self.assertTrue(h.messageBytes(queued).endswith(message))

    def test_refusalThenNextMessageAccepted(self) -> None:
        h = self.harness()
        self.send(h, b"Content-Transfer-Encoding: base64\n\n" + b64(fakePE()))
        self.assertEqual(h.replies()[-1], EXECUTABLE)
        self.send(h, attachment(b64(PDF), "application/pdf", "a.pdf"))
        self.assertTrue(h.replies()[-1].startswith("250 2.0.0 ok"), h.replies())
        self.assertEqual(len(h.committed), 1)

    def test_smallPacketsEndToEnd(self) -> None:
        h = self.harness()
        h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        data = attachment(b64(fakePE(800))).replace(b"\n", b"\r\n") + b".\r\n"
        for i in range(0, len(data), 7):
            h.send(data[i : i + 7])
        self.assertEqual(h.replies()[-1], EXECUTABLE)
        self.assertEqual(h.committed, [])

    def test_executableVerdictKind(self) -> None:
        verdict = judge(attachment(b64(fakePE())))
        self.assertEqual(verdict.kind, VerdictKind.REPLY)
