"""smtproutes and outgoingip parsing (pure)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.routes import OutgoingIP, Route, parseOutgoingIP, parseSmtpRoutes


class SmtpRoutesTests(SynchronousTestCase):
    ROUTES = parseSmtpRoutes(
        [
            "# routes",
            "",
            "example.com:relay.example.net",
            ".example.com:sub-relay.example.net:2525",
            ".com:dotcom.example.net",
            "b.c.example.org:",
            ".c.example.org:[192.0.2.7]:26",
            ":Smart.Example.NET:587   user   pass word  ",
            "lit.test:[::1]:2525",
            "lit6.test:[IPv6:2001:DB8::1]",
            "bare.test:192.0.2.9:2526",
            "example.com:ignored.example.net",
        ]
    )

    def test_exactBeforeSuffix(self) -> None:
        self.assertEqual(self.ROUTES.lookup("Example.COM."), Route("relay.example.net"))

    def test_longestSuffixFirst(self) -> None:
        self.assertEqual(self.ROUTES.lookup("a.example.com"), Route("sub-relay.example.net", 2525))
        self.assertEqual(self.ROUTES.lookup("other.com"), Route("dotcom.example.net"))

    def test_suffixDoesNotMatchTheDomainItself(self) -> None:
        self.assertEqual(self.ROUTES.lookup("c.example.org"), self.ROUTES.lookup("nowhere.test"))

    def test_emptyRelayMeansMXAndStopsTheSearch(self) -> None:
        route = self.ROUTES.lookup("b.c.example.org")
        self.assertEqual(route, Route(""))
        assert route is not None
        self.assertTrue(route.usesMX)
        self.assertEqual(self.ROUTES.lookup("x.b.c.example.org"), Route("[192.0.2.7]", 26))

    def test_defaultRouteWithAuth(self) -> None:
        route = self.ROUTES.lookup("nowhere.test")
        self.assertEqual(route, Route("smart.example.net", 587, ("user", "pass word")))
        self.assertNotIn("pass", repr(route))

    def test_literals(self) -> None:
        self.assertEqual(self.ROUTES.lookup("lit.test"), Route("[::1]", 2525))
        self.assertEqual(self.ROUTES.lookup("lit6.test"), Route("[IPv6:2001:DB8::1]"))
        self.assertEqual(self.ROUTES.lookup("bare.test"), Route("192.0.2.9", 2526))

    def test_firstLineWins(self) -> None:
        self.assertEqual(self.ROUTES.lookup("example.com"), Route("relay.example.net"))

    def test_noRoute(self) -> None:
        routes = parseSmtpRoutes(["example.com:relay.example.net"])
        self.assertIsNone(routes.lookup("example.org"))
        self.assertIsNone(parseSmtpRoutes([]).lookup("example.org"))
        self.assertFalse(parseSmtpRoutes(["# nothing"]))

    def test_badLinesNamed(self) -> None:
        for line, why in [
            ("example.com", "no ':'"),
            ("example.com:relay:port", "bad port"),
            ("example.com:relay:0", "bad port"),
            ("example.com:relay:70000", "bad port"),
            ("example.com:::1", "a port needs a relay host"),
            ("example.com:2001:db8::1", "too many ':'"),
            ("example.com:[::1", "unclosed"),
            ("example.com:[banana]", "bad address literal"),
            ("example.com:[::1]x", "junk"),
            ("example.com:re/lay", "bad relay host"),
            ("exa mple.com:relay", "no ':'"),
            ("ex@mple.com:relay", "bad domain"),
            ("example.com:relay user", "needs a password"),
            ("example.com: user pass", "needs a relay host"),
        ]:
            with self.assertRaises(ValueError, msg=line) as caught:
                parseSmtpRoutes(["# first", line])
            self.assertIn("line 2", str(caught.exception))
            self.assertIn(why, str(caught.exception))

    def test_passwordNotInError(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parseSmtpRoutes(["example.com:relay:x user secret"])
        self.assertNotIn("secret", str(caught.exception))


class OutgoingIPTests(SynchronousTestCase):
    def test_singleAddress(self) -> None:
        out = parseOutgoingIP(["192.0.2.5"])
        self.assertEqual(out.forDomain("anything.test"), "192.0.2.5")

    def test_unspecifiedOrEmptyMeansNoBind(self) -> None:
        for lines in ([], ["0.0.0.0"], ["::"], ["# comment", "  "]):
            self.assertIsNone(parseOutgoingIP(lines).forDomain("x.test"), lines)
        self.assertEqual(parseOutgoingIP([]), OutgoingIP())

    def test_perDomain(self) -> None:
        out = parseOutgoingIP(
            [
                "192.0.2.5",
                "2001:db8::5",
                "example.com:192.0.2.6",
                ".example.com:[2001:DB8::6]",
                "quiet.test:0.0.0.0",
            ]
        )
        self.assertEqual(out.forDomain("example.com"), "192.0.2.6")
        self.assertEqual(out.forDomain("a.example.com"), "2001:db8::6")
        self.assertEqual(out.forDomain("other.test"), "192.0.2.5")
        self.assertIsNone(out.forDomain("quiet.test"))

    def test_familyOfTheDestination(self) -> None:
        out = parseOutgoingIP(["2001:db8::5", "192.0.2.5", "v4only.test:192.0.2.6"])
        self.assertEqual(out.forAddress("x.test", "2001:db8::25"), "2001:db8::5")
        self.assertEqual(out.forAddress("x.test", "198.51.100.25"), "192.0.2.5")
        self.assertEqual(out.forDomain("x.test"), "192.0.2.5")
        self.assertIsNone(out.forAddress("v4only.test", "2001:db8::25"))

    def test_defaultWithColon(self) -> None:
        self.assertEqual(parseOutgoingIP([":192.0.2.5"]).forDomain("x.test"), "192.0.2.5")

    def test_badLinesNamed(self) -> None:
        for lines, why in [
            (["banana"], "bad address"),
            (["example.com:banana"], "bad address"),
            (["192.0.2.5", "192.0.2.6"], "second IPv4"),
            (["x.test:::1", "x.test:::2"], "second IPv6"),
            (["exa mple:192.0.2.1"], "bad domain"),
        ]:
            with self.assertRaises(ValueError, msg=lines) as caught:
                parseOutgoingIP(lines)
            self.assertIn(f"line {len(lines)}", str(caught.exception))
            self.assertIn(why, str(caught.exception))
