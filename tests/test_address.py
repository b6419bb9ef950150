"""Envelope address parsing."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.address import Address, AddressError, parseMailbox, splitPath


class ParseMailboxTests(SynchronousTestCase):
    def test_plain(self) -> None:
        self.assertEqual(parseMailbox("User@Example.COM"), Address("User", "example.com"))

    def test_sourceRouteIsStripped(self) -> None:
        self.assertEqual(
            parseMailbox("@a.example,@b.example:u@c.example"), Address("u", "c.example")
        )

    def test_trailingDotIsStripped(self) -> None:
        self.assertEqual(parseMailbox("u@example.com."), Address("u", "example.com"))

    def test_quotedLocalPart(self) -> None:
        address = parseMailbox('"a b\\"c@d"@example.com')
        self.assertEqual(address, Address('a b"c@d', "example.com"))
        self.assertEqual(address.smtpPath(), '<"a b\\"c@d"@example.com>')
        self.assertEqual(Address.fromStored(str(address)), address)

    def test_addressLiterals(self) -> None:
        self.assertEqual(parseMailbox("u@[192.0.2.1]").domain, "[192.0.2.1]")
        self.assertEqual(parseMailbox("u@[IPv6:2001:db8::1]").domain, "[ipv6:2001:db8::1]")

    def test_nullOnlyWhereAllowed(self) -> None:
        self.assertTrue(parseMailbox("", allowNull=True).isNull)
        with self.assertRaises(AddressError):
            parseMailbox("")

    def test_unqualified(self) -> None:
        self.assertEqual(parseMailbox("postmaster"), Address("postmaster", ""))

    def test_refused(self) -> None:
        for bad in [
            "a\rb@c.example",
            "a\nb@c.example",
            "a\0b@c.example",
            "a b@c.example",
            "ä@c.example",
            "u@",
            "@c.example",
            "u@bad_domain.example",
            "u@-x.example",
            "u@a..b",
            "u@[300.1.1.1]",
            "u@[1.2.3.4",
            '"unterminated@c.example',
            "u@" + "a" * 300,
            "x" * 400 + "@c.example",
            "@a.example:",
        ]:
            with self.assertRaises(AddressError, msg=repr(bad)):
                parseMailbox(bad)


class SplitPathTests(SynchronousTestCase):
    def test_brackets(self) -> None:
        self.assertEqual(splitPath("<a@b> SIZE=10"), ("a@b", "SIZE=10"))

    def test_withoutBrackets(self) -> None:
        self.assertEqual(splitPath("a@b SIZE=10"), ("a@b", "SIZE=10"))

    def test_quotedGreaterThan(self) -> None:
        self.assertEqual(splitPath('<"a>b"@c> X'), ('"a>b"@c', "X"))

    def test_unterminated(self) -> None:
        with self.assertRaises(AddressError):
            splitPath("<a@b")
