"""The auto-responder's decisions and its reply message (pure: no I/O, no clock).

``shouldAnswer`` decides whether a message may be answered, following RFC 3834
("Recommendations for Automatic Responses to Electronic Mail") section 2,
RFC 5230 (Sieve vacation) section 4.6 and the classic vacation(1) program;
``buildReply`` writes the answer following RFC 3834 section 3. Deciding "at
most once per sender per period" (RFC 3834 section 2) needs state and is the
caller's job; so is queueing the reply with the null envelope sender ``<>``
(RFC 3834 section 3.3; RFC 5321 section 4.5.5), which keeps a failed answer
from bouncing and a second responder from answering it.

Never answered (``shouldAnswer`` returns ``(False, reason)``):

- the null sender ``<>`` (RFC 3834 section 2: MUST NOT) and qmail's
  double-bounce sender ``#@[]``;
- senders whose local part, case-insensitively and ignoring a ``+detail``,
  is one of ``AUTOMATED_LOCAL_PARTS`` (mailer-daemon, postmaster, listserv,
  majordomo, noreply, ...), starts with ``owner-`` or ends with ``-request``,
  ``-owner``, ``-bounces`` or ``-relay``: vacation(1)'s ignore list, RFC 5230
  section 4.6's examples, Mailman's and ezmlm's list addresses, and the common
  do-not-reply names;
- an ``Auto-Submitted`` field with any value other than ``no`` (RFC 3834
  section 2: SHOULD NOT; an empty value counts as "not no");
- ``Precedence: bulk``, ``list`` or ``junk`` (RFC 3834 section 2 leaves
  Precedence to the responder; vacation(1) has always honoured it);
- any ``List-*`` field (RFC 2369, RFC 2919, RFC 8058; RFC 3834 section 2: MAY
  ignore; RFC 5230 section 4.6: MUST NOT respond), ezmlm's ``Mailing-List`` and
  ``X-Mailing-List``;
- ``X-Auto-Response-Suppress`` naming ``All``, ``OOF`` or ``AutoReply``
  (Microsoft's convention, MS-OXCMAIL 2.2.3.2.20);
- mail whose envelope sender is one of the user's own addresses;
- mail that does not name one of the user's addresses in ``To``, ``Cc``,
  ``Bcc``, ``Resent-To``, ``Resent-Cc`` or ``Resent-Bcc`` (RFC 3834 section 2:
  absence notices SHOULD NOT be sent otherwise; vacation(1) without ``-j``):
  mail reaching the user through a list, a Bcc or a forward is not answered.

The header is parsed by ``_parseFields``, a small linear parser (folded lines,
any case, bytes that are not UTF-8 replaced, garbage lines skipped) that reads
at most ``MAX_HEADER_BYTES``; addresses in recipient fields are found by a
linear scanner rather than ``email.utils.getaddresses``, which recurses once
per nested comment and so can be crashed by one header line.
"""

from __future__ import annotations

import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header

from qmailtx.address import Address, AddressError, parseMailbox
from qmailtx.queue.bounce import rfc5322Date
from qmailtx.vdomain.records import Vacation

MAX_HEADER_BYTES = 256 * 1024
"""How much of the original header is looked at; the rest is ignored."""

AUTOMATED_LOCAL_PARTS = frozenset(
    {
        "mailer-daemon",
        "mailer",
        "postmaster",
        "uucp",
        "listserv",
        "majordomo",
        "noreply",
        "no-reply",
        "donotreply",
        "do-not-reply",
    }
)
"""Local parts (lower case) of senders that are programs, never answered."""

AUTOMATED_PREFIXES = ("owner-",)
AUTOMATED_SUFFIXES = ("-request", "-owner", "-bounces", "-relay")

_LIST_FIELDS = frozenset({"mailing-list", "x-mailing-list"})
_RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"})
_PRECEDENCE_REFUSED = frozenset({"bulk", "list", "junk"})
_SUPPRESS_REFUSED = frozenset({"all", "oof", "autoreply"})

_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 ftext: printable ASCII but ":"
_MSGID = re.compile(r"<[!-;=?-~]{1,250}>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_NOT_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]+")
_WSP = re.compile(r"\s+")

MAX_SUBJECT = 200
"""Characters of a subject kept in the reply."""

MAX_REFERENCES = 20
"""Message ids kept in ``References:`` (the first and the latest ones)."""

NO_SUBJECT = "(no subject)"


@dataclass(frozen=True)
class _Field:
    name: str  # lower case
    value: str  # unfolded, without the leading white space


def _parseFields(header: bytes) -> list[_Field]:
    """The fields of a header block, in order; never raises.

    Stops at the first empty line. Lines that are neither a field nor a
    continuation (an mbox ``From`` line, garbage) are skipped together with
    their continuations.
    """
    text = header[:MAX_HEADER_BYTES].decode("utf-8", "replace")
    fields: list[_Field] = []
    name: str | None = None
    parts: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line:
            break
        if line[0] in " \t":
            if name is not None:
                parts.append(line)
            continue
        if name is not None:
            fields.append(_Field(name, "".join(parts).strip()))
            name = None
        fieldName, colon, value = line.partition(":")
        fieldName = fieldName.rstrip(" \t")  # obsolete "Subject :" form
        if colon and _FIELD_NAME.match(fieldName):
            name = fieldName.lower()
            parts = [value]
    if name is not None:
        fields.append(_Field(name, "".join(parts).strip()))
    return fields


def _withoutComments(value: str) -> str:
    """``value`` with RFC 5322 comments (nested, outside quotes) removed."""
    out = []
    depth = 0
    escaped = False
    inQuote = False
    for ch in value:
        if escaped:
            escaped = False
            if not depth:
                out.append(ch)
        elif ch == "\\" and (depth or inQuote):
            escaped = True
            if not depth:
                out.append(ch)
        elif depth:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif inQuote:
            inQuote = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth = 1
            out.append(" ")
        else:
            inQuote = ch == '"'
            out.append(ch)
    return "".join(out)


def _firstToken(value: str) -> str:
    """The keyword that starts a structured value, lower case ("" if none)."""
    words = _withoutComments(value).split(";", 1)[0].split()
    return words[0].lower() if words else ""


def _mailboxes(value: str) -> Iterator[str]:
    """The addr-specs in an address-list field value, as written (linear scan).

    Display names, comments and group names are dropped: for
    ``"Alice" <alice@example.com>, bob@example.com (Bob), team: carol@x;`` this
    yields ``alice@example.com``, ``bob@example.com`` and ``carol@x``. White
    space outside quotes is removed, which also joins the obsolete
    ``a @ example . com`` form.
    """
    bare: list[str] = []
    angle: list[str] = []
    found: str | None = None
    inAngle = inQuote = escaped = False
    depth = 0
    for ch in value:
        target = angle if inAngle else bare
        if depth:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif inQuote:
            target.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inQuote = False
        elif ch == '"':
            inQuote = True
            target.append(ch)
        elif ch == "(":
            depth = 1
        elif ch == "<":
            inAngle = True
            angle.clear()
        elif ch == ">" and inAngle:
            inAngle = False
            found = "".join(angle)
        elif ch in ",;" and not inAngle:
            text = found if found is not None else "".join(bare)
            if text:
                yield text
            bare.clear()
            found = None
        elif ch == ":" and not inAngle:
            bare.clear()  # a group's display name
        elif not ch.isspace():
            target.append(ch)
    text = found if found is not None else "".join(bare)
    if text:
        yield text


def _addressedTo(fields: list[_Field], recipients: frozenset[str]) -> bool:
    for field in fields:
        if field.name not in _RECIPIENT_FIELDS:
            continue
        for text in _mailboxes(field.value):
            try:
                address = parseMailbox(text)
            except AddressError:
                continue
            if address.domain and address.lowered() in recipients:
                return True
    return False


def _shown(value: str, limit: int = 60) -> str:
    """A header value made safe and short enough for a log line."""
    value = _CONTROL.sub(" ", value).strip()
    return value if len(value) <= limit else value[:limit] + "..."


def isAutomatedSender(sender: Address) -> bool:
    """Whether the envelope sender's local part names a program (see module doc)."""
    local = sender.local.lower().split("+", 1)[0]
    return (
        local in AUTOMATED_LOCAL_PARTS
        or local.startswith(AUTOMATED_PREFIXES)
        or local.endswith(AUTOMATED_SUFFIXES)
    )


def shouldAnswer(sender: Address, header: bytes, recipients: Iterable[str]) -> tuple[bool, str]:
    """Whether to send the vacation reply for one delivered message.

    ``sender`` is the envelope sender, ``header`` the message's header block
    (LF line endings, possibly truncated), ``recipients`` every address the
    user is known by (``user@domain``, alias domains included). Answers
    ``(True, "")`` or ``(False, reason)``, the reason being meant for a log.
    The rules, in the order applied, are listed in the module docstring.
    """
    if sender.isNull:
        return False, "null sender"
    if sender.isDoubleBounce:
        return False, "double-bounce sender"
    if isAutomatedSender(sender):
        return False, f"automated sender {_shown(sender.local)}"
    fields = _parseFields(header)
    for field in fields:
        name = field.name
        if name == "auto-submitted" and _firstToken(field.value) != "no":
            return False, f"Auto-Submitted: {_shown(field.value)}"
        if name == "precedence" and _firstToken(field.value) in _PRECEDENCE_REFUSED:
            return False, f"Precedence: {_shown(field.value)}"
        if name.startswith("list-") or name in _LIST_FIELDS:
            return False, f"mailing list field {_shown(name, 40)}"
        if name == "x-auto-response-suppress":
            tokens = {t.strip().lower() for t in _withoutComments(field.value).split(",")}
            if tokens & _SUPPRESS_REFUSED:
                return False, f"X-Auto-Response-Suppress: {_shown(field.value)}"
    own = frozenset(r.lower() for r in recipients)
    if sender.lowered() in own:
        return False, "sender is the user"
    if not _addressedTo(fields, own):
        return False, "user not named in To or Cc"
    return True, ""


def _decodedText(value: str) -> str:
    """An unstructured field's text with RFC 2047 encoded words decoded."""
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return value


def _oneLine(text: str, limit: int) -> str:
    """``text`` on one line (controls, CR and LF become spaces), at most ``limit`` chars."""
    text = _WSP.sub(" ", _CONTROL.sub(" ", text)).strip()
    return text[:limit].rstrip()


def _encodedSubject(subject: str) -> str:
    """The Subject value: ASCII as is (folded), anything else RFC 2047-encoded."""
    charset = "us-ascii" if subject.isascii() and "=?" not in subject else "utf-8"
    return Header(subject, charset, header_name="Subject").encode(linesep="\n")


def _headerSafe(text: str) -> str:
    """``text`` without control characters (CR and LF included), in ASCII."""
    return _CONTROL.sub("", text).encode("ascii", "replace").decode("ascii")


def _addressText(text: str) -> str:
    """Text for ``<...>`` with nothing that could end the field or the brackets."""
    return _headerSafe(_NOT_ADDRESS.sub("", text))


def _first(fields: list[_Field], name: str) -> str | None:
    for field in fields:
        if field.name == name:
            return field.value
    return None


def _references(fields: list[_Field], parentId: str) -> list[str]:
    """RFC 5322 section 3.6.4: the parent's References (or its one In-Reply-To), then its id."""
    ids = _MSGID.findall(_first(fields, "references") or "")
    if not ids:
        inReplyTo = _MSGID.findall(_first(fields, "in-reply-to") or "")
        if len(inReplyTo) == 1:
            ids = inReplyTo
    ids.append(parentId)
    if len(ids) > MAX_REFERENCES:
        ids = ids[:1] + ids[-(MAX_REFERENCES - 1) :]
    return ids


def _body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, encoded body): 7bit when safe, else quoted-printable."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    raw = text.encode("utf-8")
    plain = all(b in (9, 10) or 32 <= b < 127 for b in raw)
    if plain and all(len(line) <= 998 for line in raw.split(b"\n")):
        return "7bit", raw
    return "quoted-printable", quopri.encodestring(raw)


def buildReply(
    vacation: Vacation,
    userAddress: str,
    sender: Address,
    header: bytes,
    now: float,
    messageId: str,
    timezone: str = "",
) -> bytes:
    """The vacation reply to ``sender`` (LF line endings, ready for the queue).

    Queue it with the null envelope sender (RFC 3834 section 3.3). Header:

    - ``From: <userAddress>`` (section 3.1.1) and ``To: <sender>``, the envelope
      sender, alone (sections 3.1.3 and 4: answer the Return-Path, one recipient);
    - ``Subject:`` the user's ``vacation.subject`` as written; when that is
      empty, ``Auto: `` and the original subject (section 3.1.5). Non-ASCII
      subjects are RFC 2047-encoded; any CR, LF or control character becomes a space;
    - ``Date:`` from ``now``, ``Message-ID: <messageId>``;
    - when the original had a Message-ID, ``In-Reply-To:`` it and
      ``References:`` per RFC 5322 section 3.6.4 (section 3.1.6);
    - ``Auto-Submitted: auto-replied`` (section 3.1.7);
    - ``Precedence: bulk``: not standard (RFC 3834 section 2 recommends
      nothing about it), kept so that older responders which ignore
      Auto-Submitted but honour Precedence, as vacation(1) does, stay quiet;
    - MIME text/plain in UTF-8; the body is 7bit when it is plain ASCII with
      lines of at most 998 octets, else quoted-printable, since 8BITMIME is
      not guaranteed on the way to the sender.

    The body is ``vacation.body`` with CRLF and CR turned into LF and a final
    LF added. Raises ValueError for the null or double-bounce sender, which
    must never be answered (RFC 3834 section 2).
    """
    if sender.isNull or sender.isDoubleBounce:
        raise ValueError("an automatic reply is never sent to the null sender")
    fields = _parseFields(header)
    subject = _oneLine(vacation.subject, MAX_SUBJECT)
    if not subject:
        original = _oneLine(_decodedText(_first(fields, "subject") or ""), MAX_SUBJECT)
        subject = "Auto: " + (original or NO_SUBJECT)
    to = Address(_headerSafe(sender.local), _addressText(sender.domain)).smtpPath()
    ownId = _addressText(messageId.strip().removeprefix("<").removesuffix(">"))
    lines = [
        f"From: <{_addressText(userAddress)}>",
        f"To: {to}",
        f"Subject: {_encodedSubject(subject)}",
        f"Date: {rfc5322Date(now, timezone)}",
        f"Message-ID: <{ownId}>",
    ]
    parentIds = _MSGID.findall(_first(fields, "message-id") or "")
    if parentIds:
        lines.append(f"In-Reply-To: {parentIds[0]}")
        lines.append("References: " + "\n ".join(_references(fields, parentIds[0])))
    encoding, body = _body(vacation.body)
    lines += [
        "Auto-Submitted: auto-replied",
        "Precedence: bulk",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Transfer-Encoding: {encoding}",
    ]
    head = "\n".join(lines) + "\n\n"
    return head.encode("ascii", "replace") + body
