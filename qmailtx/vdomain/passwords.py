"""Password hashes: scrypt for new ones, the crypt formats of vpopmail trees for old ones.

One ``CryptContext`` from ``passlib`` (the ``libpass`` distribution, pure
Python; scrypt is the standard library's ``hashlib.scrypt``, which releases
the GIL). New hashes are ``$scrypt$ln=14,r=8,p=1$salt$checksum``: 16 MiB and
roughly 50-100 ms per verification on current hardware, which is what one
login may cost. Hashes found in vpopmail trees are verified and reported by
``needsRehash`` so a login can replace them:

- ``$1$`` md5_crypt, ``$5$`` sha256_crypt, ``$6$`` sha512_crypt,
- traditional DES crypt (13 characters; only the first 8 characters of the
  password count, as with crypt(3)).

bcrypt (``$2y$``/``$2b$``) is not supported: passlib verifies it only with
the compiled ``bcrypt`` package. Such a hash, like an empty or unknown one,
never verifies. Nothing here uses the standard library's ``crypt`` module.

All of this is slow on purpose: call it from worker threads, never from the
reactor thread.
"""

from __future__ import annotations

import os
import threading

from passlib.context import CryptContext  # type: ignore[import-untyped]

# scrypt cost: N = 2**SCRYPT_LOG2_N, memory 128 * r * N bytes (16 MiB).
SCRYPT_LOG2_N = 14
SCRYPT_BLOCK_SIZE = 8
SCRYPT_PARALLELISM = 1

# Verified, never produced: every hash in one of these formats needs a rehash.
LEGACY_SCHEMES = ("md5_crypt", "sha256_crypt", "sha512_crypt", "des_crypt")


class PasswordHasher:
    """Hashes new passwords with scrypt at cost ``2**log2N``; verifies scrypt
    and the legacy formats. Safe to share between threads.

    A scrypt hash made at a lower cost than this hasher's counts as needing a
    rehash, so raising ``log2N`` upgrades hashes as users log in.
    """

    def __init__(self, log2N: int = SCRYPT_LOG2_N) -> None:
        self.log2N = log2N
        self._context = CryptContext(
            schemes=["scrypt", *LEGACY_SCHEMES],
            default="scrypt",
            deprecated=list(LEGACY_SCHEMES),
            scrypt__rounds=log2N,
            scrypt__min_rounds=log2N,
            scrypt__block_size=SCRYPT_BLOCK_SIZE,
            scrypt__parallelism=SCRYPT_PARALLELISM,
        )
        self._dummyHash: str | None = None
        self._dummyLock = threading.Lock()

    @classmethod
    def cheap(cls) -> PasswordHasher:
        """A hasher costing well under a millisecond: for tests only."""
        return cls(log2N=4)

    def hashPassword(self, secret: str | bytes) -> str:
        """A new scrypt hash of ``secret`` (str is encoded as UTF-8)."""
        hashed: str = self._context.hash(secret)
        return hashed

    def verifyPassword(self, secret: str | bytes, hashed: str) -> bool:
        """Whether ``secret`` matches ``hashed``. An empty, unknown (bcrypt
        included) or malformed hash gives False; this never raises for bad
        input. The comparison inside passlib is constant-time."""
        if not hashed:
            return False
        try:
            return bool(self._context.verify(secret, hashed))
        except (ValueError, TypeError):
            # Unidentified or malformed hash, a NUL in a DES crypt secret,
            # an oversized secret (passlib's PasswordSizeError).
            return False

    def needsRehash(self, hashed: str) -> bool:
        """True for a hash that should be replaced once a login has verified
        it (legacy formats, scrypt below this hasher's cost); False for a
        current hash and for an empty or unrecognised one (bcrypt included),
        which no login can verify."""
        if not hashed:
            return False
        try:
            return bool(self._context.needs_update(hashed))
        except (ValueError, TypeError):
            return False

    def schemeOf(self, hashed: str) -> str:
        """The name of the scheme of ``hashed`` ("scrypt", "md5_crypt", ...),
        or "unknown"; for log lines."""
        try:
            scheme = self._context.identify(hashed)
        except (ValueError, TypeError):
            scheme = None
        return str(scheme) if scheme else "unknown"

    def burn(self, secret: str | bytes) -> None:
        """Spend what verifying ``secret`` against a current hash costs, for an
        unknown user, so timing does not tell which users exist."""
        self.verifyPassword(secret, self._dummy())

    def _dummy(self) -> str:
        with self._dummyLock:
            if self._dummyHash is None:
                self._dummyHash = self.hashPassword(os.urandom(16).hex())
            return self._dummyHash


defaultHasher = PasswordHasher()


def hashPassword(secret: str | bytes) -> str:
    """A new hash of ``secret`` at the default cost (see ``PasswordHasher``)."""
    return defaultHasher.hashPassword(secret)


def verifyPassword(secret: str | bytes, hashed: str) -> bool:
    """Whether ``secret`` matches ``hashed``; False for empty or unknown hashes."""
    return defaultHasher.verifyPassword(secret, hashed)


def needsRehash(hashed: str) -> bool:
    """Whether a successful login with ``hashed`` should store a new hash."""
    return defaultHasher.needsRehash(hashed)
