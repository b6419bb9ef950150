"""MX resolution against a real twisted.names server on 127.0.0.1 (UDP and TCP)."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.names import dns, server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from qmailtx.delivery.mx import (
    AMBIGUOUS_MX,
    PERM_NOMX,
    TEMP_DNS,
    Destination,
    MXResolver,
    RouteError,
    makeResolver,
)
from qmailtx.delivery.routes import Route
from qmailtx.testing import BrokenDNSName as Broken
from qmailtx.testing import MemoryZone, startTestDNSServer

reactor: Any = _reactor

OURS = "192.0.2.99"
BIG = 40


def _records() -> dict[bytes, list[Any]]:
    records: dict[bytes, list[Any]] = {
        b"mx.test": [
            dns.Record_MX(30, b"mx3.test"),
            dns.Record_MX(20, b"mx2a.test"),
            dns.Record_MX(20, b"mx2b.test"),
            dns.Record_MX(10, b"mx1.test"),
            dns.Record_MX(20, b"mx2c.test"),
        ],
        b"mx1.test": [dns.Record_A("192.0.2.1"), dns.Record_AAAA("2001:db8::1")],
        b"mx2a.test": [dns.Record_A("192.0.2.21")],
        b"mx2b.test": [dns.Record_A("192.0.2.22")],
        b"mx2c.test": [dns.Record_A("192.0.2.23")],
        b"mx3.test": [dns.Record_A("192.0.2.3"), dns.Record_A("192.0.2.1")],
        b"implicit.test": [dns.Record_A("192.0.2.50"), dns.Record_AAAA("2001:db8::50")],
        b"v6only.test": [dns.Record_MX(5, b"v6host.test")],
        b"v6host.test": [dns.Record_AAAA("2001:DB8:0:0::6")],
        b"nullmx.test": [dns.Record_MX(0, b"")],
        b"txt.test": [dns.Record_TXT(b"no mail")],
        b"zero.test": [dns.Record_MX(10, b"zero-mx.test")],
        b"zero-mx.test": [dns.Record_A("0.0.0.0")],
        b"self.test": [dns.Record_MX(10, b"me.test")],
        b"me.test": [dns.Record_A(OURS)],
        b"selfa.test": [dns.Record_A(OURS)],
        b"worse.test": [
            dns.Record_MX(20, b"me.test"),
            dns.Record_MX(10, b"mx1.test"),
            dns.Record_MX(30, b"mx3.test"),
        ],
        b"dangling.test": [dns.Record_MX(10, b"missing.test"), dns.Record_MX(20, b"mx2a.test")],
        b"allmissing.test": [dns.Record_MX(10, b"missing.test")],
        b"halfbroken.test": [
            dns.Record_MX(10, b"broken.test"),
            dns.Record_MX(20, b"mx2a.test"),
        ],
        b"allbroken.test": [dns.Record_MX(10, b"broken.test")],
        b"multicast.test": [dns.Record_MX(10, b"multicast-mx.test")],
        b"multicast-mx.test": [dns.Record_A("224.0.0.1")],
        b"ttl.test": [dns.Record_MX(10, b"ttlhost.test", ttl=300)],
        b"ttlhost.test": [dns.Record_A("192.0.2.77", ttl=600)],
        b"relay.test": [dns.Record_A("127.0.0.1")],
        b"big.test": [
            dns.Record_MX(100 - i, b"a-rather-long-mail-exchanger-name-%02d.big.test" % i)
            for i in range(BIG)
        ],
    }
    for i in range(BIG):
        name = b"a-rather-long-mail-exchanger-name-%02d.big.test" % i
        records[name] = [dns.Record_A(f"198.51.100.{i + 1}")]
    return records


class TruncatingFactory(server.DNSServerFactory):
    """Counts queries; a UDP answer over 512 bytes is cut short and marked TC, as servers do."""

    def __init__(self) -> None:
        super().__init__(authorities=[MemoryZone(_records())])
        self.asked: list[tuple[bytes, int]] = []
        self.overTCP: list[tuple[bytes, int]] = []
        self.truncated = 0

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> Any:
        query = message.queries[0]
        self.asked.append((query.name.name, query.type))
        if address is None:
            self.overTCP.append((query.name.name, query.type))
        return super().handleQuery(message, protocol, address)

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        if address is not None and len(message.toStr()) > 512:
            self.truncated += 1
            message.trunc = 1
            message.additional = []
            message.authority = []
            while len(message.toStr()) > 512:
                message.answers.pop()
        super().sendReply(protocol, message, address)


def names(destinations: list[Destination]) -> list[str]:
    return [d.host for d in destinations]


class DNSServerTestCase(TestCase):
    """A DNS server on 127.0.0.1 (UDP and TCP on one port) and an MXResolver using it."""

    def setUp(self) -> None:
        self.dns = TruncatingFactory()
        _, port = startTestDNSServer(self, self.dns, reactor)
        self.port = port
        self.resolver = makeResolver(reactor, [("127.0.0.1", port)], (2,))
        self.addCleanup(self.closeTCP)
        self.clock = Clock()
        self.mx = self.make()

    async def closeTCP(self) -> None:
        """The resolver keeps the TCP connection it opened for a truncated answer."""
        connections: list[Any] = self.resolver.connections or []
        for protocol in list(connections):
            protocol.transport.loseConnection()
        while self.resolver.connections:
            await deferLater(reactor, 0.01, lambda: None)

    def make(self, seed: int = 0, **kw: Any) -> MXResolver:
        return MXResolver(
            self.resolver,
            self.clock,
            lambda: {OURS, "not an address"},
            (2,),
            random=random.Random(seed),
            **kw,
        )

    async def fails(self, domain: str, route: Route | None = None) -> RouteError:
        try:
            found = await self.mx.destinations(domain, route)
        except RouteError as e:
            return e
        self.fail(f"{domain}: {found}")


class MXOrderTests(DNSServerTestCase):
    async def test_byPreferenceAddressesV4First(self) -> None:
        found = await self.mx.destinations("MX.test.")
        self.assertEqual(
            found[:2],
            [
                Destination("mx1.test", "192.0.2.1", 25, 10),
                Destination("mx1.test", "2001:db8::1", 25, 10),
            ],
        )
        self.assertEqual(sorted(names(found[2:5])), ["mx2a.test", "mx2b.test", "mx2c.test"])
        self.assertEqual({d.preference for d in found[2:5]}, {20})
        # mx3's second address is mx1's: tried once only
        self.assertEqual(found[5:], [Destination("mx3.test", "192.0.2.3", 25, 30)])
        self.assertEqual(self.dns.asked[0], (b"mx.test", dns.MX))

    async def test_randomAmongEqualPreferences(self) -> None:
        orders = set()
        for seed in range(12):
            self.mx = self.make(seed)
            found = await self.mx.destinations("mx.test")
            self.assertEqual((found[0].host, found[-1].host), ("mx1.test", "mx3.test"))
            orders.add(tuple(names(found[2:5])))
            again = await self.make(seed).destinations("mx.test")
            self.assertEqual(names(again), names(found))
        self.assertGreater(len(orders), 2)

    async def test_implicitMX(self) -> None:
        self.assertEqual(
            await self.mx.destinations("implicit.test"),
            [
                Destination("implicit.test", "192.0.2.50", 25, 0),
                Destination("implicit.test", "2001:db8::50", 25, 0),
            ],
        )

    async def test_aaaaOnly(self) -> None:
        self.assertEqual(
            await self.mx.destinations("v6only.test"),
            [Destination("v6host.test", "2001:db8::6", 25, 5)],
        )

    async def test_mxPort(self) -> None:
        self.mx = self.make(mxPort=2525)
        self.assertEqual({d.port for d in await self.mx.destinations("mx.test")}, {2525})

    async def test_danglingMXSkipped(self) -> None:
        self.assertEqual(names(await self.mx.destinations("dangling.test")), ["mx2a.test"])

    async def test_domainLiteral(self) -> None:
        self.assertEqual(
            await self.mx.destinations("[192.0.2.8]"),
            [Destination("[192.0.2.8]", "192.0.2.8", 25, 0)],
        )
        self.assertEqual((await self.fails("[127.0.0.1]")).text, AMBIGUOUS_MX)
        self.assertEqual(self.dns.asked, [])


class MXFailureTests(DNSServerTestCase):
    async def test_nxdomainPermanent(self) -> None:
        error = await self.fails("nx.test")
        self.assertEqual(error.text, "Sorry, I couldn't find any host named nx.test. (#5.1.2)")
        self.assertTrue(error.permanent)

    async def test_nullMX(self) -> None:
        error = await self.fails("nullmx.test")
        self.assertEqual(error.text, "Sorry, nullmx.test does not accept mail (null MX). (#5.1.10)")
        self.assertTrue(error.permanent)
        self.assertEqual(self.dns.asked, [(b"nullmx.test", dns.MX)])

    async def test_noAddressAtAll(self) -> None:
        for domain in ("txt.test", "allmissing.test", "multicast.test"):
            error = await self.fails(domain)
            self.assertEqual((error.text, error.permanent), (PERM_NOMX, True), domain)

    async def test_servfailTemporary(self) -> None:
        error = await self.fails("broken.test")
        self.assertEqual((error.text, error.permanent), (TEMP_DNS, False))
        self.assertEqual(error.text, "Sorry, I couldn't find any host by that name. (#4.1.2)")
        self.flushLoggedErrors(Broken)

    async def test_mxHostServfailTemporaryOnlyIfNothingElse(self) -> None:
        self.assertEqual(names(await self.mx.destinations("halfbroken.test")), ["mx2a.test"])
        error = await self.fails("allbroken.test")
        self.assertEqual((error.text, error.permanent), (TEMP_DNS, False))
        self.flushLoggedErrors(Broken)

    async def test_serverNotAnsweringTemporary(self) -> None:
        silent = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        resolver = makeResolver(reactor, [("127.0.0.1", silent.getHost().port)], (1,))
        self.mx = MXResolver(resolver, self.clock, timeout=(1,))
        error = await self.fails("mx.test")
        self.assertEqual((error.text, error.permanent), (TEMP_DNS, False))

    async def test_failuresNotCached(self) -> None:
        await self.fails("broken.test")
        await self.fails("broken.test")
        self.assertEqual(self.dns.asked.count((b"broken.test", dns.MX)), 2)
        self.flushLoggedErrors(Broken)


class SelfMXTests(DNSServerTestCase):
    """P11 and qmail-remote's prefme rule."""

    async def test_mxAtZeroAddress(self) -> None:
        error = await self.fails("zero.test")
        self.assertEqual(error.text, AMBIGUOUS_MX)
        self.assertTrue(error.permanent)
        self.assertTrue(error.text.startswith("Sorry. Although I'm listed as a best-preference"))
        self.assertTrue(error.text.endswith("so I don't treat it as local. (#5.4.6)"))

    async def test_mxAtOurAddress(self) -> None:
        for domain in ("self.test", "selfa.test"):
            error = await self.fails(domain)
            self.assertEqual((error.text, error.permanent), (AMBIGUOUS_MX, True), domain)

    async def test_onlyBetterPreferencesThanUs(self) -> None:
        found = await self.mx.destinations("worse.test")
        self.assertEqual(set(names(found)), {"mx1.test"})

    async def test_loopbackAlwaysLocalUnlessConfiguredOtherwise(self) -> None:
        self.mx = self.make(alwaysLocal=())
        self.assertEqual(
            await self.mx.destinations("zero.test"),
            [Destination("zero-mx.test", "0.0.0.0", 25, 10)],
        )

    async def test_ourAddressesAskedEachTime(self) -> None:
        ours: set[str] = set()
        self.mx = MXResolver(self.resolver, self.clock, lambda: ours)
        self.assertEqual(names(await self.mx.destinations("self.test")), ["me.test"])
        ours.add(OURS)
        self.assertEqual((await self.fails("self.test")).text, AMBIGUOUS_MX)


class RouteTests(DNSServerTestCase):
    async def test_literalRouteNoDNS(self) -> None:
        for host, address in (
            ("[127.0.0.1]", "127.0.0.1"),
            ("[::1]", "::1"),
            ("127.0.0.1", "127.0.0.1"),
        ):
            self.assertEqual(
                await self.mx.destinations("zero.test", Route(host, 2525)),
                [Destination(host, address, 2525, 0)],
            )
        self.assertEqual(self.dns.asked, [])

    async def test_routeHostResolvedNoMXNoSelfRule(self) -> None:
        found = await self.mx.destinations("self.test", Route("relay.test", 587))
        self.assertEqual(found, [Destination("relay.test", "127.0.0.1", 587, 0)])
        self.assertEqual(
            sorted(self.dns.asked), [(b"relay.test", dns.A), (b"relay.test", dns.AAAA)]
        )

    async def test_routeHostMissing(self) -> None:
        error = await self.fails("mx.test", Route("nx-relay.test"))
        self.assertEqual(
            error.text, "Sorry, I couldn't find any host named nx-relay.test. (#5.1.2)"
        )
        self.assertTrue(error.permanent)

    async def test_routeHostTrouble(self) -> None:
        error = await self.fails("mx.test", Route("broken.test"))
        self.assertEqual((error.text, error.permanent), (TEMP_DNS, False))
        self.flushLoggedErrors(Broken)

    async def test_emptyRouteMeansMX(self) -> None:
        self.assertEqual(
            names(await self.mx.destinations("v6only.test", Route(""))), ["v6host.test"]
        )


class TruncationTests(DNSServerTestCase):
    """P3: a truncated UDP answer is asked again over TCP, and a large answer works."""

    async def test_resolverRetriesOverTCP(self) -> None:
        answers, _, _ = await self.resolver.lookupMailExchange(b"big.test", (2,))
        self.assertEqual(len([rr for rr in answers if rr.type == dns.MX]), BIG)
        self.assertEqual(self.dns.truncated, 1)
        self.assertEqual(self.dns.overTCP, [(b"big.test", dns.MX)])
        self.assertEqual(self.dns.asked, [(b"big.test", dns.MX)] * 2)

    async def test_allExchangersOfALargeAnswer(self) -> None:
        found = await self.mx.destinations("big.test")
        self.assertEqual(len(found), BIG)
        self.assertEqual(
            found[0],
            Destination("a-rather-long-mail-exchanger-name-39.big.test", "198.51.100.40", 25, 61),
        )
        self.assertEqual([d.preference for d in found], list(range(61, 101)))
        self.assertEqual(self.dns.overTCP, [(b"big.test", dns.MX)])


class CacheTests(DNSServerTestCase):
    async def test_answersKeptForTheirTTL(self) -> None:
        first = await self.mx.destinations("ttl.test")
        self.assertEqual(names(first), ["ttlhost.test"])
        asked = list(self.dns.asked)
        self.assertEqual(len(asked), 3)  # MX, A, AAAA (NODATA)
        self.assertEqual(await self.mx.destinations("ttl.test"), first)
        self.clock.advance(59)
        self.assertEqual(await self.mx.destinations("TTL.test"), first)
        self.assertEqual(self.dns.asked, asked)
        self.clock.advance(2)  # NODATA kept 60 s
        self.assertEqual(await self.mx.destinations("ttl.test"), first)
        self.assertEqual(self.dns.asked[3:], [(b"ttlhost.test", dns.AAAA)])
        self.clock.advance(240)  # t=301: MX expired (300 s), A fresh (600 s), AAAA again
        self.assertEqual(await self.mx.destinations("ttl.test"), first)
        self.assertEqual(self.dns.asked[4:], [(b"ttl.test", dns.MX), (b"ttlhost.test", dns.AAAA)])

    async def test_negativeAnswersBriefly(self) -> None:
        await self.fails("nx.test")
        await self.fails("nx.test")
        self.assertEqual(self.dns.asked, [(b"nx.test", dns.MX)])
        self.clock.advance(61)
        await self.fails("nx.test")
        self.assertEqual(self.dns.asked, [(b"nx.test", dns.MX)] * 2)

    async def test_cappedTTL(self) -> None:
        self.mx = self.make(maxTTL=100)
        await self.mx.destinations("ttl.test")
        self.clock.advance(101)
        await self.mx.destinations("ttl.test")
        self.assertEqual(self.dns.asked.count((b"ttlhost.test", dns.A)), 2)


class MakeResolverTests(SynchronousTestCase):
    def test_servers(self) -> None:
        clock = Clock()
        resolver = makeResolver(clock, [("192.0.2.53", 5353)], (2, 5))
        self.assertEqual((resolver.servers, resolver._reactor), ([("192.0.2.53", 5353)], clock))
        self.assertEqual(resolver.timeout, (2, 5))

    def test_routeErrorFields(self) -> None:
        error = RouteError(TEMP_DNS, permanent=False)
        self.assertEqual((error.text, error.permanent, str(error)), (TEMP_DNS, False, TEMP_DNS))
