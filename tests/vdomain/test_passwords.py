"""Password hashes: new scrypt hashes, legacy crypt formats, bad input.

The legacy vectors were made outside Python: ``openssl passwd -1/-5/-6``
(OpenSSL 3.0) and, for DES crypt and bcrypt, Perl's ``crypt`` (libxcrypt).
"""

from __future__ import annotations

import base64
import hashlib
import sys
import warnings

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.vdomain import passwords
from qmailtx.vdomain.passwords import (
    SCRYPT_LOG2_N,
    PasswordHasher,
    hashPassword,
    needsRehash,
    verifyPassword,
)

# (password, hash)
LEGACY_VECTORS = [
    # openssl passwd -1 -salt abcdefgh password
    ("password", "$1$abcdefgh$G//4keteveJp0qb8z2DxG/"),
    # openssl passwd -1 -salt vpop 'Secret!23'
    ("Secret!23", "$1$vpop$zvJR3Y.jiQYiuj70nodAU."),
    # openssl passwd -5 -salt saltsalt password
    ("password", "$5$saltsalt$gOjOtoMpVhru2uyjeJSEc/JaLQWOXMNmlOnj6T4AtC."),
    # openssl passwd -5 -salt rounds 'correct horse' (a salt, not a rounds= field)
    ("correct horse", "$5$rounds$NZZR7EjUqCYZhND7ekOOKxSM1Kr9ZZ9ZQscc.1KL.cC"),
    # openssl passwd -6 -salt saltsalt password
    (
        "password",
        "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/"
        "jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/",
    ),
    # openssl passwd -6 -salt Qk8v2Rp1 'pässwörd' (UTF-8)
    (
        "pässwörd",
        "$6$Qk8v2Rp1$6KO7URWfMUtx.2OixKlQqP8tAv5scNwjReCeYsuXEwhtkDJbHhBD."
        "S/XGJE/B.QOgafx00uoMK2m4yAkuaBDD/",
    ),
    # perl -e 'print crypt("password", "$6$rounds=10000$saltsaltsalt")'
    (
        "password",
        "$6$rounds=10000$saltsaltsalt$mkluYssD63/hNdYjEc97.198HMPlOZP9iVIZL8JO57jznWHoD."
        "GFGtvTmrrkA/0V8e813uf.aeTedngYPR9e0/",
    ),
    # perl -e 'print crypt("password", "ab")'
    ("password", "abJnggxhB/yWI"),
    # perl -e 'print crypt("Secret!23", "x9")'
    ("Secret!23", "x9bA0o7nBbGtc"),
]

# perl -e 'print crypt("password", "$2b$04$abcdefghijklmnopqrstuu")'
BCRYPT = "$2b$04$abcdefghijklmnopqrstuughE8Ev8uGFaUgY2cNEySvxngrb/Jzdm"

GARBAGE = [
    "",
    "*",
    "!!",
    "x",
    "$1$",
    "$6$saltsalt$",
    "$6$saltsalt$short",
    "$scrypt$ln=zz,r=8,p=1$abc$def",
    "$scrypt$",
    "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
    "$apr1$abc$mehJE/UcwZsj.w5DYe.b5.",
    "password",
    "abJnggxhB/yW",  # DES crypt one character short
    "ab\x00nggxhB/yWI",
]


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


class LegacyFormatTests(SynchronousTestCase):
    def test_vectorsVerify(self) -> None:
        for secret, hashed in LEGACY_VECTORS:
            with self.subTest(hashed=hashed):
                self.assertTrue(verifyPassword(secret, hashed))
                self.assertTrue(verifyPassword(secret.encode("utf-8"), hashed))

    def test_wrongPasswordFails(self) -> None:
        for secret, hashed in LEGACY_VECTORS:
            with self.subTest(hashed=hashed):
                self.assertFalse(verifyPassword("x" + secret, hashed))
                self.assertFalse(verifyPassword(secret.upper(), hashed))
                self.assertFalse(verifyPassword("", hashed))

    def test_desCryptCountsEightCharacters(self) -> None:
        """As crypt(3): perl gives zzSu2QW7SNyD2 for both "longpass" and "longpassword"."""
        self.assertTrue(verifyPassword("longpassword", "zzSu2QW7SNyD2"))
        self.assertTrue(verifyPassword("longpass", "zzSu2QW7SNyD2"))
        self.assertFalse(verifyPassword("longpas", "zzSu2QW7SNyD2"))

    def test_legacyNeedsRehash(self) -> None:
        for _, hashed in LEGACY_VECTORS:
            with self.subTest(hashed=hashed):
                self.assertTrue(needsRehash(hashed))

    def test_bcryptIsNotSupported(self) -> None:
        """bcrypt would need the compiled bcrypt package: never verifies, never raises."""
        self.assertFalse(verifyPassword("password", BCRYPT))
        self.assertFalse(needsRehash(BCRYPT))


class BadInputTests(SynchronousTestCase):
    def test_garbageNeverVerifies(self) -> None:
        for hashed in GARBAGE:
            with self.subTest(hashed=hashed):
                self.assertFalse(verifyPassword("password", hashed))
                self.assertFalse(verifyPassword("", hashed))
                self.assertFalse(verifyPassword(hashed, hashed))

    def test_unrecognisedNeedsNoRehash(self) -> None:
        for hashed in ["", "*", "!!", "password", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="]:
            with self.subTest(hashed=hashed):
                self.assertFalse(needsRehash(hashed))

    def test_awkwardSecretsDoNotRaise(self) -> None:
        hasher = PasswordHasher.cheap()
        hashed = hasher.hashPassword("password")
        awkward: list[str | bytes] = ["pass\x00word", "x" * 5000, b"\xff\xfe", "\udcff"]
        for secret in awkward:
            with self.subTest(secret=secret):
                self.assertFalse(hasher.verifyPassword(secret, hashed))
                self.assertFalse(hasher.verifyPassword(secret, "abJnggxhB/yWI"))


class ScryptTests(SynchronousTestCase):
    def test_formatAndChecksum(self) -> None:
        """passlib's format; the checksum recomputed with hashlib.scrypt."""
        hasher = PasswordHasher(log2N=5)
        hashed = hasher.hashPassword("pässwörd")
        prefix, params, salt, checksum = hashed.split("$")[1:]
        self.assertEqual((prefix, params), ("scrypt", "ln=5,r=8,p=1"))
        expected = hashlib.scrypt(
            "pässwörd".encode(), salt=_b64decode(salt), n=2**5, r=8, p=1, dklen=32
        )
        self.assertEqual(_b64decode(checksum), expected)

    def test_roundTrip(self) -> None:
        hasher = PasswordHasher.cheap()
        hashed = hasher.hashPassword("correct horse")
        self.assertTrue(hasher.verifyPassword("correct horse", hashed))
        self.assertTrue(hasher.verifyPassword(b"correct horse", hashed))
        self.assertFalse(hasher.verifyPassword("correct horse ", hashed))
        self.assertFalse(hasher.needsRehash(hashed))

    def test_saltedEachTime(self) -> None:
        hasher = PasswordHasher.cheap()
        self.assertNotEqual(hasher.hashPassword("a"), hasher.hashPassword("a"))

    def test_defaultCost(self) -> None:
        hashed = hashPassword("password")
        self.assertTrue(hashed.startswith(f"$scrypt$ln={SCRYPT_LOG2_N},r=8,p=1$"))
        self.assertTrue(verifyPassword("password", hashed))
        self.assertFalse(needsRehash(hashed))

    def test_cheaperHashNeedsRehash(self) -> None:
        """Raising the cost upgrades hashes as their users log in."""
        cheap = PasswordHasher.cheap().hashPassword("password")
        self.assertTrue(verifyPassword("password", cheap))
        self.assertTrue(needsRehash(cheap))

    def test_burnVerifiesNothing(self) -> None:
        hasher = PasswordHasher.cheap()
        hasher.burn("password")
        hasher.burn(b"")


class EnvironmentTests(SynchronousTestCase):
    def test_noDeprecationWarnings(self) -> None:
        """passlib raises no warnings on this Python, and never needs the crypt module."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hasher = PasswordHasher(log2N=4)
            for secret, hashed in LEGACY_VECTORS:
                hasher.verifyPassword(secret, hashed)
                hasher.needsRehash(hashed)
            hasher.verifyPassword("password", hasher.hashPassword("password"))
            hasher.verifyPassword("password", BCRYPT)
        self.assertNotIn("crypt", sys.modules)
        self.assertEqual(passwords.defaultHasher.log2N, SCRYPT_LOG2_N)


class SchemeOfTests(SynchronousTestCase):
    def test_names(self) -> None:
        """The scheme names the rehash log line gives; never the hash itself."""
        hasher = PasswordHasher.cheap()
        self.assertEqual(hasher.schemeOf(hasher.hashPassword("x")), "scrypt")
        self.assertEqual(hasher.schemeOf(LEGACY_VECTORS[0][1]), "md5_crypt")
        self.assertEqual(hasher.schemeOf(LEGACY_VECTORS[2][1]), "sha256_crypt")
        self.assertEqual(hasher.schemeOf(LEGACY_VECTORS[4][1]), "sha512_crypt")
        self.assertEqual(hasher.schemeOf("abJnggxhB/yWI"), "des_crypt")
        for hashed in ["", "*", BCRYPT, "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="]:
            with self.subTest(hashed=hashed):
                self.assertEqual(hasher.schemeOf(hashed), "unknown")
