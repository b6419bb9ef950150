"""TLS for the SMTP listeners: STARTTLS (RFC 3207) and implicit TLS (SMTPS, RFC 8314).

``ServerTLS`` holds one server context made from ``[tls] certificate`` (a
PEM file: the certificate, then any intermediates) and ``[tls] key`` (a PEM
private key; it may be the same file, as qmail-tls's ``servercert.pem``).
The context is Twisted's ``CertificateOptions``: TLS 1.2 or later, its
cipher selection (forward secrecy, AEAD first), server cipher preference,
no compression.

Every new connection takes the context current at that moment; ``reload``
builds a new one from the files and swaps it in, so connections already
open keep theirs and nothing is dropped. A reload that fails (a missing or
mismatched file) is logged and the old context stays.

``TLSService`` (named "tls") reads the files in ``privilegedStartService``,
before twistd drops root, and offers ``reload()`` for SIGHUP (``tap.py``);
the files are read off the reactor thread. A key readable only by root can
therefore not be reloaded once privileges are dropped: the reload says so
and keeps the old key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from qmailtx.config import ConfigError

log = Logger()

_PRIVATE_KEY = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL
)


class TLSLoadError(Exception):
    """The certificate or key cannot be used; the message names the file."""


@dataclass(frozen=True)
class LoadedTLS:
    """One usable server context and what the logs say about its certificate."""

    context: SSL.Context
    subject: str
    serial: int
    notAfter: str


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSLoadError(f"{what} {path}: {e.strerror}") from e


def loadTLS(certificatePath: str, keyPath: str | None = None) -> LoadedTLS:
    """Read and check the files, and build the server context (blocking)."""
    keyPath = keyPath or certificatePath
    certData = _read(certificatePath, "certificate")
    keyData = certData if keyPath == certificatePath else _read(keyPath, "key")
    try:
        chain = x509.load_pem_x509_certificates(certData)
    except ValueError as e:
        raise TLSLoadError(f"certificate {certificatePath}: no PEM certificate ({e})") from e
    found = _PRIVATE_KEY.search(keyData)
    if found is None:
        raise TLSLoadError(f"key {keyPath}: no PEM private key")
    try:
        key = serialization.load_pem_private_key(found.group(0), password=None)
    except (ValueError, TypeError) as e:
        raise TLSLoadError(f"key {keyPath}: unusable private key ({e})") from e
    # CertificateOptions passes these to pyOpenSSL, which takes cryptography
    # objects (and deprecates its own X509/PKey); Twisted's hints name the old ones.
    options = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=list(chain[1:]) or None,  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        context = options.getContext()
    except SSL.Error as e:
        raise TLSLoadError(
            f"certificate {certificatePath} and key {keyPath} do not fit together ({e})"
        ) from e
    leaf = chain[0]
    return LoadedTLS(
        context=context,
        subject=leaf.subject.rfc4514_string(),
        serial=leaf.serial_number,
        notAfter=leaf.not_valid_after_utc.isoformat(),
    )


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server side of every TLS connection; usable wherever Twisted wants
    a server context factory (``startTLS``, ``TLSMemoryBIOFactory``)."""

    def __init__(self, certificate: str, key: str | None = None) -> None:
        self.certificate = certificate
        self.key = key or certificate
        self.current: LoadedTLS | None = None

    @property
    def loaded(self) -> bool:
        return self.current is not None

    def load(self) -> LoadedTLS:
        """Read the files now (blocking) and use them for new connections."""
        loaded = loadTLS(self.certificate, self.key)
        self.install(loaded)
        return loaded

    def install(self, loaded: LoadedTLS) -> None:
        self.current = loaded

    def getContext(self) -> SSL.Context:
        if self.current is None:
            raise RuntimeError("TLS files not loaded yet")
        return self.current.context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)


def describeConnection(transport: object) -> str | None:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for a transport speaking TLS, else None."""
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return None
    try:
        handle = getHandle()
    except Exception:
        return None
    if not isinstance(handle, SSL.Connection):
        return None
    version = handle.get_protocol_version_name()
    cipher = handle.get_cipher_name()
    if not cipher:
        return None
    return f"{version} {cipher}"


class TLSService(Service):
    """Loads ``tls`` at start-up and reloads it on demand (SIGHUP)."""

    def __init__(self, tls: ServerTLS, runner: Any) -> None:
        self.setName("tls")
        self.tls = tls
        self.runner = runner  # runs blocking file reads off the reactor thread

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._loadAtStart()

    def startService(self) -> None:
        super().startService()
        if not self.tls.loaded:
            self._loadAtStart()

    def _loadAtStart(self) -> None:
        try:
            loaded = self.tls.load()
        except TLSLoadError as e:
            raise ConfigError(f"[tls] {e}") from e
        self._report("TLS certificate loaded", loaded)

    def _report(self, what: str, loaded: LoadedTLS) -> None:
        log.info(
            "{what}: {subject} serial {serial:x}, valid until {notAfter}",
            what=what,
            subject=loaded.subject,
            serial=loaded.serial,
            notAfter=loaded.notAfter,
        )

    def reload(self) -> Deferred[bool]:
        """Re-read the files; True when the new certificate is in use."""
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> bool:
        try:
            loaded: LoadedTLS = await self.runner(loadTLS, self.tls.certificate, self.tls.key)
        except TLSLoadError as e:
            log.error("TLS reload failed, keeping the certificate in use: {error}", error=str(e))
            return False
        except Exception:
            log.failure("TLS reload failed, keeping the certificate in use")
            return False
        self.tls.install(loaded)
        self._report("TLS certificate reloaded", loaded)
        return True
