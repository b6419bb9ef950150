"""SMTP AUTH (RFC 4954) on twisted.cred: the SASL mechanisms and their replies.

Mechanisms are PLAIN (RFC 4616), LOGIN and CRAM-MD5 (RFC 2195), advertised
in qmail-smtpd-auth 0.31's order (``AUTH LOGIN CRAM-MD5 PLAIN``, plus the
same list after ``AUTH=`` for old clients), and only those the portal can
check: PLAIN and LOGIN need a checker for ``IUsernamePassword``, CRAM-MD5
one for ``IUsernameHashedPassword``. PLAIN and LOGIN carry the password
itself, so they are offered only inside TLS, or to a loopback client, or
where ``[smtp] auth_before_tls`` allows them.

An exchange turns client responses (already base64-decoded) into either a
``Challenge`` to send as ``334`` or the cred credentials to log in with; bad
input raises ``AuthInputError`` holding the reply. Nothing here logs: the
responses hold passwords.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred

from qmailtx.reply import SMTPReply
from qmailtx.vdomain.realm import IMailAccount

R_AUTH_OK = SMTPReply(235, "2.7.0", "ok, go ahead")
R_AUTH_FAILED = SMTPReply(535, "5.7.8", "authorization failed")
R_AUTH_TEMPORARY = SMTPReply(454, "4.7.0", "temporary authentication failure")
R_AUTH_CANCELLED = SMTPReply(501, "5.0.0", "auth exchange cancelled")
R_AUTH_MALFORMED = SMTPReply(501, "5.5.2", "malformed auth input")
R_AUTH_SYNTAX = SMTPReply(501, "5.5.4", "syntax error")
R_AUTH_UNKNOWN = SMTPReply(504, "5.5.4", "auth type unimplemented")
R_AUTH_UNAVAILABLE = SMTPReply(503, "5.3.3", "auth not available")
R_AUTH_AGAIN = SMTPReply(503, "5.5.0", "you're already authenticated")
R_AUTH_IN_MAIL = SMTPReply(503, "5.5.0", "no auth during mail transaction")
R_AUTH_ENCRYPT = SMTPReply(
    538, "5.7.11", "encryption required for requested authentication mechanism"
)
R_AUTH_REQUIRED = SMTPReply(530, "5.7.0", "authentication required")
R_AUTH_TOO_LONG = SMTPReply(500, "5.5.6", "authentication exchange line is too long")

# RFC 4954: an AUTH line may be 12288 octets long.
AUTH_LINE_LIMIT = 12288

ORDER = ("LOGIN", "CRAM-MD5", "PLAIN")
PLAINTEXT = frozenset({"LOGIN", "PLAIN"})

_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


class AuthInputError(Exception):
    """The client's AUTH input cannot be used; ``reply`` answers it."""

    def __init__(self, reply: SMTPReply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class AuthRefused(Exception):
    """Credentials refused before any check (PLAIN with a foreign authzid): a 535."""


@dataclass(frozen=True)
class Challenge:
    """Send ``334 <base64 of data>`` and wait for the client's next line."""

    data: bytes

    def toBytes(self) -> bytes:
        return b"334 " + base64.b64encode(self.data) + b"\r\n"


Credentials = UsernamePassword | CramMD5Credentials
Step = Challenge | Credentials


def decodeResponse(line: bytes) -> bytes:
    """One client line of an exchange: ``*`` cancels, anything else is base64."""
    if line == b"*":
        raise AuthInputError(R_AUTH_CANCELLED)
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AuthInputError(R_AUTH_MALFORMED) from e


def decodeInitialResponse(text: str) -> bytes:
    """The initial response on the AUTH line: ``=`` is an empty one (RFC 4954)."""
    if text == "=":
        return b""
    return decodeResponse(text.encode("ascii"))


class Exchange:
    """One mechanism's conversation; ``start`` then ``respond`` per client line."""

    name = ""

    def start(self, initial: bytes | None) -> Step:
        raise NotImplementedError

    def respond(self, response: bytes) -> Step:
        raise NotImplementedError


class PlainExchange(Exchange):
    """``authzid NUL authcid NUL passwd``; an authzid other than the authcid is refused."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise AuthInputError(R_AUTH_MALFORMED)
        authzid, authcid, password = parts
        if authzid and authzid.lower() != authcid.lower():
            raise AuthRefused()
        return UsernamePassword(authcid, password)


class LoginExchange(Exchange):
    """``334 Username:``, ``334 Password:`` (the username may come as initial response)."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: bytes | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        if not response or b"\0" in response:
            raise AuthInputError(R_AUTH_MALFORMED)
        if self._username is None:
            self._username = response
            return Challenge(b"Password:")
        return UsernamePassword(self._username, response)


class CramMD5Exchange(Exchange):
    """Challenge ``<random.time@host>``; the answer is ``user SP hex-digest``."""

    name = "CRAM-MD5"

    def __init__(self, host: str, now: float) -> None:
        self.credentials = CramMD5Credentials(host)
        self.credentials.challenge = f"<{secrets.randbits(63)}.{int(now)}@{host}>".encode(
            "ascii", "replace"
        )

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:  # the server speaks first (RFC 4954: 501)
            raise AuthInputError(R_AUTH_MALFORMED)
        return Challenge(self.credentials.challenge)

    def respond(self, response: bytes) -> Step:
        username, _, digest = response.partition(b" ")
        if not username or not digest or b"\0" in response:
            raise AuthInputError(R_AUTH_MALFORMED)
        self.credentials.setResponse(response)
        return self.credentials


def isLoopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@dataclass(frozen=True)
class Login:
    """A successful login: the identity and the realm's logout."""

    address: str
    logout: Callable[[], None]


class SMTPAuthenticator:
    """What one listener offers for AUTH, and the portal logins behind it."""

    def __init__(self, portal: Portal, host: str) -> None:
        self.portal = portal
        self.host = host  # for the CRAM-MD5 challenge
        interfaces = set(portal.listCredentialsInterfaces())
        available: set[str] = set()
        if IUsernamePassword in interfaces:
            available |= PLAINTEXT
        if IUsernameHashedPassword in interfaces:
            available.add("CRAM-MD5")
        self.mechanisms = tuple(name for name in ORDER if name in available)

    def offered(self, plaintextAllowed: bool) -> tuple[str, ...]:
        """The mechanisms to advertise and accept on a connection."""
        return tuple(m for m in self.mechanisms if plaintextAllowed or m not in PLAINTEXT)

    def exchange(self, name: str, now: float) -> Exchange:
        if name == "PLAIN":
            return PlainExchange()
        if name == "LOGIN":
            return LoginExchange()
        if name == "CRAM-MD5":
            return CramMD5Exchange(self.host, now)
        raise KeyError(name)

    def login(self, credentials: Credentials) -> Deferred[Login]:
        """Fails with ``UnauthorizedLogin`` for a refusal, anything else for trouble."""
        d = self.portal.login(credentials, None, IMailAccount)
        return d.addCallback(_toLogin)


def _toLogin(result: tuple[object, object, Callable[[], None]]) -> Login:
    _, avatar, logout = result
    return Login(str(IMailAccount(avatar).address), logout)
