"""SMTP command and ESMTP parameter parsing (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmailtx.address import Address, AddressError, parseMailbox, splitPath
from qmailtx.reply import SMTPRejection, SMTPReply

SYNTAX_ERROR = SMTPReply(555, "5.5.4", "syntax error")
MAX_PARAMETERS = 10
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


@dataclass(frozen=True)
class Command:
    verb: str  # upper case
    argument: str  # the rest of the line, leading spaces removed


@dataclass(frozen=True)
class PathCommand:
    """A parsed MAIL FROM or RCPT TO."""

    address: Address
    parameters: dict[str, str | None]


def parseCommand(line: bytes) -> Command:
    """Split a command line (without its line ending) into verb and argument.

    Raises SMTPRejection for lines that cannot be a command at all: NUL, a CR
    inside the line, or bytes outside ASCII.
    """
    if b"\0" in line or b"\r" in line:
        raise SMTPRejection(SMTPReply(501, "5.5.2", "syntax error: control character"))
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as e:
        raise SMTPRejection(SMTPReply(501, "5.5.2", "syntax error: 8-bit command")) from e
    verb, _, argument = text.strip(" ").partition(" ")
    return Command(verb.upper(), argument.lstrip(" "))


def parseParameters(text: str) -> dict[str, str | None]:
    """Parse ``KEY[=VALUE] ...`` (RFC 5321 esmtp-param); keys are upper-cased."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise SMTPRejection(SYNTAX_ERROR)
        if any(ord(c) < 33 or ord(c) > 126 or c == "=" for c in value):
            raise SMTPRejection(SYNTAX_ERROR)
        key = key.upper()
        if key in params:
            raise SMTPRejection(SMTPReply(555, "5.5.4", f"duplicate parameter {key}"))
        params[key] = value if eq else None
        if len(params) > MAX_PARAMETERS:
            raise SMTPRejection(SMTPReply(555, "5.5.4", "too many parameters"))
    return params


def parsePathCommand(argument: str, keyword: str, allowNull: bool) -> PathCommand:
    """Parse ``FROM:<path> params`` (keyword "FROM") or ``TO:<path> params``."""
    head = argument[: len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise SMTPRejection(SYNTAX_ERROR)
    try:
        path, rest = splitPath(argument[len(keyword) + 1 :])
        address = parseMailbox(path, allowNull=allowNull)
    except AddressError as e:
        raise SMTPRejection(SYNTAX_ERROR) from e
    return PathCommand(address, parseParameters(rest))
