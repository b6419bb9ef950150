"""A streaming MIME walker for content checks: bounded memory, no recursion.

Feed it a message (LF line ends, any chunking) with ``feed()`` and call
``close()`` at the end. It follows the structure line by line, as
qmail-smtpd-viruscan does (patches.md P20), and tells its sink about the
start of every body: each header section's first non-empty body line and the
first ``headLimit`` bytes of that body with its transfer encoding undone
(base64, quoted-printable, or none). It never holds a part's body.

Structure followed:

* header sections (with continuation lines) of the message, of each MIME
  part and of each embedded ``message/rfc822`` (or ``message/global``)
  message, also the default type of a ``multipart/digest`` part;
* ``boundary=`` of ``multipart/*`` types, on a stack; a delimiter line
  (``--b`` then only white space, RFC 2046 section 5.1.1) of any level on
  the stack starts a new part there, closing the deeper levels, and
  ``--b--`` closes that level;
* QSBMF and Exim bounces: when a plain body starts with ``Hi. This is the``
  or ``This message was created automatically by mail delivery software``,
  the bounce text is skipped up to a line starting with ``---`` and what
  follows is parsed as the returned message's header section, so its
  attachments are seen too (qmail-smtpd-viruscan's rule);
* uuencoded files in plain bodies and bounce texts (``begin 644 name`` then
  data): reported as a part of their own with the first data line decoded.

A header section ends at an empty line or, as in Python's email package, at
the first line that is neither a field nor a continuation (that line begins
the body); a line of white space is a continuation. The first of repeated
Content-* fields counts.

Limits, each a fixed bound on memory whatever the input:

* a line is examined up to ``lineLimit`` bytes (the rest is skipped up to its
  end: a 10 MB line costs no more memory than a short one);
* the Content-Type, Content-Transfer-Encoding and Content-Disposition of a
  section are kept up to ``headerLimit`` bytes each, other headers not at all;
* ``maxDepth`` open multipart levels. Deeper nesting is not legitimate mail
  (Postfix refuses mail nested deeper than its mime_nesting_limit; GMime
  calls it "very likely an attempt to exploit the MIME parser"), and parts
  we cannot follow are parts we cannot check, so the walker stops and sets
  ``problem`` rather than passing them unchecked (threats.md S17);
* boundaries longer than ``MAX_BOUNDARY`` bytes (RFC 2046 allows 70) and
  more than ``maxParts`` header sections are refused the same way.

Time: lines that cannot matter in the current state (the rest of a body once
its head is known, headers other than Content-*, blank lines) are passed
over with ``bytes.find`` and one regular expression, not a Python step per
line; a 10 MB attachment costs one Python step per chunk. Lines that may
matter (those starting with ``--`` inside a multipart, ``begin `` in a plain
body, Content-* headers) cost one step each, about what an SMTP command line
costs the server.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Protocol

LINE_LIMIT = 8192
HEADER_LIMIT = 4096
HEAD_LIMIT = 1024
MAX_DEPTH = 32
MAX_BOUNDARY = 256
MAX_PARTS = 10000

_BASE64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(c for c in range(256) if c not in _BASE64_CHARS)
_BOUNCE_STARTS = (
    b"Hi. This is the ",
    b"This message was created automatically by mail delivery software",
)
_UUBEGIN = re.compile(rb"begin [0-7]{3,4} +(\S.*)")
# A header field line (as Python's email package has it, but allowing white
# space before the colon as RFC 5322's obsolete syntax does) or an mbox From_.
_FIELD = re.compile(rb"(?i)[\x21-\x39\x3b-\x7e]*[ \t]*:|from ")
# A line that matters in a header section, at a line start (re.M "^"): the
# fields we keep, a possible delimiter, the empty line ending the section, and
# any line that is neither a field nor a continuation, which ends it too.
_HEADER_OF_INTEREST = re.compile(
    rb"(?mi)^(?:content-(?:type|transfer-encoding|disposition)[ \t]*:|--|\r?$"
    rb"|(?![ \t]|[\x21-\x39\x3b-\x7e]*[ \t]*:|from ))"
)
_ENCODED = ("base64", "quoted-printable")
_WANTED = {
    b"content-type": "type",
    b"content-transfer-encoding": "encoding",
    b"content-disposition": "disposition",
}

# walker states
_HEADERS = 0  # in a header section
_PREBODY = 1  # header section ended; waiting for the first non-empty body line
_BODY = 2  # in a body whose start has been seen (head may still be decoding)
_BOUNCE = 3  # in a bounce's text, up to the "---" line before the returned message
_PASSIVE = 4  # between parts (epilogue) or past what interests us: boundaries only
_UUDATA = 5  # after a uuencode "begin" line: the next line is the data
_STOPPED = 6  # found what the sink wanted, or gave up (``problem``)


@dataclass(frozen=True)
class Part:
    """What is known of one body: from its header section, never its content."""

    depth: int  # multipart levels above it (0: the message itself)
    contentType: str  # lowercased media type, e.g. "application/octet-stream"
    encoding: str  # lowercased transfer encoding ("7bit" when none is given)
    filename: str | None  # Content-Disposition filename= or Content-Type name=

    @property
    def isMultipart(self) -> bool:
        return self.contentType.startswith("multipart/")

    @property
    def isText(self) -> bool:
        return self.contentType.startswith("text/")


class PartSink(Protocol):
    def partHead(self, part: Part, firstLine: bytes, head: bytes) -> bool:
        """A body has started: ``firstLine`` is its first non-empty line as
        sent (at most ``lineLimit`` bytes, "" when the body is empty), ``head``
        its first bytes decoded (empty for a multipart's preamble and for a
        bounce's text). Answer True to stop walking (the sink has decided)."""


_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"?|(;)|\((?:[^()\\]|\\.)*\)?|([^";(]+)', re.S)
_ESCAPE = re.compile(rb"\\(.)", re.S)


def parameters(value: bytes) -> tuple[str, dict[str, str]]:
    """A Content-Type-like value's lowercased media type and its parameters
    (names lowercased, the first of repeated names kept; quoted values
    unquoted; comments dropped)."""
    fields: list[bytes] = []
    current: list[bytes] = []
    for match in _TOKEN.finditer(value):
        quoted, semicolon, text = match.groups()
        if quoted is not None:
            current.append(_ESCAPE.sub(rb"\1", quoted))
        elif semicolon is not None:
            fields.append(b"".join(current))
            current = []
        elif text is not None:
            current.append(text)
    fields.append(b"".join(current))
    mediaType = fields[0].strip().lower().decode("latin-1")
    params: dict[str, str] = {}
    for item in fields[1:]:
        name, eq, val = item.partition(b"=")
        if eq:
            key = name.strip().lower().decode("latin-1")
            params.setdefault(key, val.strip().decode("latin-1"))
    return mediaType, params


def _lastLine(chunk: bytes, start: int) -> int:
    """The start of the last, unfinished line of ``chunk[start:]``."""
    return chunk.rfind(b"\n", start) + 1 or start


def _nextLine(chunk: bytes, start: int, prefix: bytes) -> int:
    """The start of the first line at or after ``start`` beginning with
    ``prefix``, else of the unfinished last line."""
    if chunk.startswith(prefix, start):
        return start
    found = chunk.find(b"\n" + prefix, start)
    return found + 1 if found >= 0 else _lastLine(chunk, start)


def _nextNotBlank(chunk: bytes, start: int, blanks: bytes | None) -> int:
    """The start of the first line holding something besides ``blanks``
    (default: ASCII white space), else of the unfinished last line."""
    rest = chunk[start:]
    first = start + len(rest) - len(rest.lstrip(blanks))
    if first == len(chunk):
        return _lastLine(chunk, start)
    return chunk.rfind(b"\n", start, first) + 1 or start


class _Head:
    """The first ``limit`` bytes of a body with its transfer encoding undone,
    fed whole lines (with their LF) one or many at a time; holds at most
    ``limit`` bytes plus 3 base64 characters."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        self.data = bytearray()
        self.pending = b""
        self.full = False

    def feed(self, text: bytes) -> None:
        room = self.limit - len(self.data)
        if self.encoding == "base64":
            # RFC 2045 6.8: characters outside the alphabet are ignored, so
            # line width and white space do not matter.
            chars = text.translate(None, _NOT_BASE64)
            end = chars.find(b"=")
            if end >= 0:
                chars = chars[:end]
                self.full = True  # padding: the encoded data ends here
            chars = self.pending + chars
            usable = len(chars) - len(chars) % 4
            usable = min(usable, (room + 2) // 3 * 4)
            self.data += binascii.a2b_base64(chars[:usable])
            self.pending = chars[usable : usable + 3]
            if self.full:
                self._flush()
        elif self.encoding == "quoted-printable":
            self.data += binascii.a2b_qp(text[: room * 3 + 2])
        else:
            self.data += text[:room]
        if len(self.data) >= self.limit:
            del self.data[self.limit :]
            self.full = True

    def _flush(self) -> None:
        if len(self.pending) >= 2:
            padded = self.pending + b"=" * (-len(self.pending) % 4)
            self.data += binascii.a2b_base64(padded)
        self.pending = b""

    def finish(self) -> bytes:
        if self.encoding == "base64":
            self._flush()
        return bytes(self.data[: self.limit])


class MimeWalker:
    """See the module docstring. ``problem`` names why it gave up, if it did."""

    def __init__(
        self,
        sink: PartSink,
        headLimit: int = HEAD_LIMIT,
        maxDepth: int = MAX_DEPTH,
        maxParts: int = MAX_PARTS,
        lineLimit: int = LINE_LIMIT,
        headerLimit: int = HEADER_LIMIT,
    ) -> None:
        self.sink = sink
        self.headLimit = headLimit
        self.maxDepth = maxDepth
        self.maxParts = maxParts
        self.lineLimit = lineLimit
        self.headerLimit = headerLimit
        self.problem: str | None = None
        self.sections = 0  # header sections seen: the message, parts, embedded messages
        self.linesExamined = 0  # lines handled one by one (the rest went by at C speed)
        self._line = bytearray()  # the current line, up to lineLimit bytes
        # open multipart levels, outermost first: (delimiter "--b", is a digest)
        self._stack: list[tuple[bytes, bool]] = []
        self._delimiters: dict[bytes, int] = {}  # delimiter -> how many levels use it
        self._state = _STOPPED
        self._skipEmpty = False  # before a returned message's headers
        self._headers: dict[str, bytearray] = {}
        self._headerName: str | None = None  # the field a continuation line extends
        self._inDigest = False  # the section's default type is message/rfc822
        self._container = False  # the current body is a multipart's, with a boundary
        self._part: Part | None = None  # the current body's; None: boundaries only
        self._head: _Head | None = None
        self._firstLine = b""
        self._uuName = ""
        self._uuReturn = _BODY  # the state a uuencoded file's first line returns to
        self._startSection(inDigest=False)

    # -- input -----------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        start, size = 0, len(chunk)
        limit = self.lineLimit
        while start < size and self._state != _STOPPED:
            if not self._line:  # at a line start: skip what cannot matter
                start = self._skip(chunk, start)
                if start >= size:
                    return
            end = chunk.find(b"\n", start)
            if end < 0:
                room = limit - len(self._line)
                if room > 0:
                    self._line += chunk[start : start + room]
                return
            if self._line:
                room = limit - len(self._line)
                if room > 0:
                    self._line += chunk[start : min(end, start + room)]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = chunk[start : min(end, start + limit)]
            start = end + 1
            self._lineReceived(line[:-1] if line.endswith(b"\r") else line)

    def close(self) -> None:
        """The message has ended (a last line without LF counts)."""
        if self._line and self._state != _STOPPED:
            line = bytes(self._line)
            self._line.clear()
            self._lineReceived(line)
        if self._state == _HEADERS:
            self._endHeaders()
        self._endSection()

    def bufferedBytes(self) -> int:
        """Bytes held now (for tests of the bounds)."""
        held = len(self._line) + len(self._firstLine)
        held += sum(len(v) for v in self._headers.values())
        held += sum(len(d) for d, _ in self._stack) * 2
        if self._head is not None:
            held += len(self._head.data) + len(self._head.pending)
        return held

    # -- lines -------------------------------------------------------------------

    def _skip(self, chunk: bytes, start: int) -> int:
        """Where the next line that matters starts, at or after ``start`` (a
        line start). Whole lines before it are passed over at C speed or,
        while a head is being decoded, decoded in one go; an unfinished last
        line is never passed over."""
        state = self._state
        if state == _BODY and self._head is not None:
            end = _nextLine(chunk, start, b"--")
            if self._head.encoding not in _ENCODED:
                end = min(end, _nextLine(chunk, start, b"begin "))
            if end > start:
                self._head.feed(chunk[start:end])
                if self._head.full:
                    self._deliverHead()
            return end
        if state == _HEADERS:
            if self._headerName is not None:
                return start  # continuation lines may extend a field we keep
            if self._skipEmpty:
                return _nextNotBlank(chunk, start, b"\r\n")
            match = _HEADER_OF_INTEREST.search(chunk, start)
            return match.start() if match is not None else _lastLine(chunk, start)
        if state == _PREBODY:
            return _nextNotBlank(chunk, start, None)
        uuencode = state == _BOUNCE or (state == _BODY and self._part is not None)
        if state == _BOUNCE or (self._stack and state in (_BODY, _PASSIVE)):
            end = _nextLine(chunk, start, b"--")
            if uuencode:
                end = min(end, _nextLine(chunk, start, b"begin "))
            return end
        if uuencode:
            return _nextLine(chunk, start, b"begin ")
        if state in (_BODY, _PASSIVE):
            return _lastLine(chunk, start)  # no open boundary: nothing matters
        return start

    def _lineReceived(self, line: bytes) -> None:
        self.linesExamined += 1
        if self._stack and line.startswith(b"--") and self._boundary(line):
            return
        state = self._state
        if state == _HEADERS:
            self._headerLine(line)
        elif state == _PREBODY:
            if line.strip():
                self._firstBodyLine(line)
        elif state == _BODY:
            if self._head is not None:
                if not (line.startswith(b"begin ") and self._head.encoding not in _ENCODED):
                    self._head.feed(line + b"\n")
                    if self._head.full:
                        self._deliverHead()
                    return
                self._deliverHead()  # a plain head ends where a uuencoded file may begin
            if self._part is not None and line.startswith(b"begin "):
                self._uuBegin(line)
        elif state == _UUDATA:
            self._uuData(line)
        elif state == _BOUNCE:
            if line.startswith(b"---"):
                self._startSection(inDigest=False, skipEmpty=True)
            elif line.startswith(b"begin "):
                self._uuBegin(line)

    def _boundary(self, line: bytes) -> bool:
        """Handle a delimiter line of an open level; False if it is not one."""
        text = line.rstrip(b" \t")
        closing = False
        if text not in self._delimiters:
            if not (text.endswith(b"--") and text[:-2] in self._delimiters):
                return False
            text, closing = text[:-2], True
        level = max(i for i, (d, _) in enumerate(self._stack) if d == text)
        if self._state == _HEADERS:
            self._headers = {}  # a part cut off inside its headers
        self._endSection()
        if self._state == _STOPPED:
            return True
        isDigest = self._stack[level][1]
        self._popTo(level + (0 if closing else 1))
        if closing:
            self._state = _PASSIVE
        else:
            self._startSection(inDigest=isDigest)
        return True

    def _popTo(self, depth: int) -> None:
        while len(self._stack) > depth:
            delimiter, _ = self._stack.pop()
            count = self._delimiters[delimiter] - 1
            if count:
                self._delimiters[delimiter] = count
            else:
                del self._delimiters[delimiter]

    # -- header sections ---------------------------------------------------------------

    def _startSection(self, inDigest: bool, skipEmpty: bool = False) -> None:
        self.sections += 1
        if self.sections > self.maxParts:
            self._stop(f"more than {self.maxParts} MIME parts")
            return
        self._state = _HEADERS
        self._headers = {}
        self._headerName = None
        self._inDigest = inDigest
        self._skipEmpty = skipEmpty

    def _headerLine(self, line: bytes) -> None:
        if not line:
            if not self._skipEmpty:
                self._endHeaders()
            return
        self._skipEmpty = False
        if line[:1] in (b" ", b"\t"):
            if self._headerName is not None:
                self._append(self._headerName, line)
            return
        if not _FIELD.match(line):
            # Not a header: the body starts here, without the empty line
            # (so Python's email package and mail readers take it).
            self._endHeaders()
            self._lineReceived(line)
            return
        name, colon, value = line.partition(b":")
        key = _WANTED.get(name.strip().lower()) if colon else None
        if key is not None and key in self._headers:
            key = None  # the first of repeated fields counts
        self._headerName = key
        if key is not None:
            self._headers[key] = bytearray()
            self._append(key, value)

    def _append(self, key: str, text: bytes) -> None:
        value = self._headers[key]
        room = self.headerLimit - len(value)
        value += text[:room]
        if len(value) >= self.headerLimit:
            self._headerName = None  # full: its further continuation lines do not matter

    def _endHeaders(self) -> None:
        """The header section ended: decide what its body is."""
        headers = self._headers
        default = "message/rfc822" if self._inDigest else "text/plain"
        mediaType, params = parameters(bytes(headers.get("type", b"")))
        if "/" not in mediaType:
            mediaType, params = default, {}
        encoding = parameters(bytes(headers.get("encoding", b"")))[0] or "7bit"
        _, disposition = parameters(bytes(headers.get("disposition", b"")))
        filename = disposition.get("filename") or params.get("name")
        if filename is None:
            filename = disposition.get("filename*") or params.get("name*")
        if filename is not None:
            filename = filename[:255]
        self._headers = {}
        self._headerName = None
        part = Part(len(self._stack), mediaType, encoding, filename)
        if mediaType in ("message/rfc822", "message/global") and encoding in (
            "7bit",
            "8bit",
            "binary",
        ):
            self._startSection(inDigest=False)  # the embedded message's headers
            return
        self._container = False
        boundary = params.get("boundary", "").encode("latin-1")
        if part.isMultipart and boundary:  # without one, its body is read as a leaf's
            if len(boundary) > MAX_BOUNDARY:
                self._stop(f"MIME boundary longer than {MAX_BOUNDARY} bytes")
                return
            if len(self._stack) >= self.maxDepth:
                self._stop(f"MIME parts nested more than {self.maxDepth} levels deep")
                return
            delimiter = b"--" + boundary
            self._stack.append((delimiter, mediaType == "multipart/digest"))
            self._delimiters[delimiter] = self._delimiters.get(delimiter, 0) + 1
            self._container = True
        self._part = part
        self._firstLine = b""
        self._head = None
        self._state = _PREBODY

    # -- bodies ------------------------------------------------------------------------

    def _firstBodyLine(self, line: bytes) -> None:
        part = self._part
        assert part is not None
        self._firstLine = line
        self._state = _BODY
        if self._container:
            self._deliver(part, line, b"")  # the preamble: qmail checks it too
            if self._state != _STOPPED:
                self._state = _PASSIVE
            return
        if part.encoding not in _ENCODED and line.startswith(_BOUNCE_STARTS):
            self._deliver(part, line, b"")
            if self._state != _STOPPED:
                self._state = _BOUNCE
            return
        self._head = _Head(part.encoding, self.headLimit)
        self._head.feed(line + b"\n")
        if self._head.full:
            self._deliverHead()

    def _deliverHead(self) -> None:
        assert self._part is not None and self._head is not None
        head, self._head = self._head.finish(), None
        encoded = self._part.encoding in _ENCODED
        self._deliver(self._part, self._firstLine, head)
        self._firstLine = b""
        if encoded and self._state != _STOPPED:
            self._part = None  # no uuencode inside an encoded body: boundaries only

    def _uuBegin(self, line: bytes) -> None:
        match = _UUBEGIN.fullmatch(line.rstrip())
        if match:
            self._uuName = match.group(1)[:255].decode("latin-1")
            self._uuReturn, self._state = self._state, _UUDATA

    def _uuData(self, line: bytes) -> None:
        self._state = self._uuReturn
        try:
            data = binascii.a2b_uu(line)
        except binascii.Error:
            return
        part = Part(len(self._stack), "application/octet-stream", "x-uuencode", self._uuName)
        self._deliver(part, line, data)

    def _deliver(self, part: Part, firstLine: bytes, head: bytes) -> None:
        if self.sink.partHead(part, firstLine, head):
            self._stop(None)

    def _endSection(self) -> None:
        """A body ends (delimiter or end of message): finish what it started."""
        if self._state == _PREBODY and self._part is not None:
            self._deliver(self._part, b"", b"")
        elif self._state == _BODY and self._head is not None:
            self._deliverHead()
        if self._state != _STOPPED:
            self._part = None
            self._head = None
            self._firstLine = b""

    def _stop(self, problem: str | None) -> None:
        self.problem = problem
        self._state = _STOPPED
        self._part = None
        self._head = None
        self._headers = {}
        self._line.clear()
        self._firstLine = b""
