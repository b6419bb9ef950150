"""mfcheck (P15) against a real twisted.names server on 127.0.0.1."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.names import client, dns, server
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qmailtx.address import Address
from qmailtx.control import buildControl
from qmailtx.domains import DomainTable
from qmailtx.policy.interfaces import ISenderCheck, ISMTPSession
from qmailtx.policy.mfcheck import SenderDomainCheck
from qmailtx.policy.verdict import CONTINUE, Verdict
from qmailtx.registry import PolicyContext, makeRegistry
from qmailtx.smtp.session import SMTPSession
from qmailtx.testing import BrokenDNSName as Broken
from qmailtx.testing import MemoryZone, SMTPServerHarness, makeTestConfig, startTestDNSServer

reactor: Any = _reactor

NO_DOMAIN = b"553 5.7.1 sorry, your envelope sender domain must exist\r\n"
TROUBLE = b"451 4.3.0 DNS temporary failure\r\n"
NULL_MX = b"550 5.7.27 sorry, your envelope sender domain does not accept mail\r\n"

RECORDS = {
    b"mx.example.test": [dns.Record_MX(10, b"mail.mx.example.test")],
    b"mail.mx.example.test": [dns.Record_A("192.0.2.10")],
    b"a.example.test": [dns.Record_A("192.0.2.11")],
    b"aaaa.example.test": [dns.Record_AAAA("2001:db8::1")],
    b"txt.example.test": [dns.Record_TXT(b"no mail here")],
    b"nullmx.example.test": [dns.Record_MX(0, b"")],
}


class CountingFactory(server.DNSServerFactory):
    def __init__(self) -> None:
        super().__init__(authorities=[MemoryZone(RECORDS, b"broken.example.test")])
        self.asked: list[tuple[bytes, int]] = []

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> Any:
        query = message.queries[0]
        self.asked.append((query.name.name, query.type))
        return super().handleQuery(message, protocol, address)


def session() -> SMTPSession:
    return SMTPSession("192.0.2.4", 4000, sessionId="s4")


OURS = DomainTable.fromControl(
    buildControl({"me": "mx.test", "rcpthosts": ["ours.test"]}, {}, "test")
)


class DNSServerTestCase(TestCase):
    """A DNS server on 127.0.0.1 (UDP and TCP on one port) and a resolver using it."""

    def setUp(self) -> None:
        self.dns = CountingFactory()
        _, port = startTestDNSServer(self, self.dns, reactor)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        self.check = SenderDomainCheck(lambda: self.resolver, OURS)

    async def judge(self, sender: Address) -> bytes:
        result = self.check.checkSender(session(), sender, {})
        verdict = await result if isinstance(result, Deferred) else result
        if verdict.reply is None:
            return b"continue"
        return verdict.reply.toBytes()


class SenderDomainTests(DNSServerTestCase):
    def test_providesISenderCheck(self) -> None:
        self.assertTrue(verifyObject(ISenderCheck, self.check))

    async def test_mxExists(self) -> None:
        self.assertEqual(await self.judge(Address("a", "mx.example.test")), b"continue")
        self.assertEqual(self.dns.asked, [(b"mx.example.test", dns.MX)])

    async def test_onlyA(self) -> None:
        self.assertEqual(await self.judge(Address("a", "a.example.test")), b"continue")
        self.assertEqual(self.dns.asked, [(b"a.example.test", dns.MX), (b"a.example.test", dns.A)])

    async def test_onlyAAAA(self) -> None:
        self.assertEqual(await self.judge(Address("a", "AAAA.example.test")), b"continue")
        self.assertEqual([t for _, t in self.dns.asked], [dns.MX, dns.A, dns.AAAA])

    async def test_nxdomain(self) -> None:
        with capturedLogs() as events:
            self.assertEqual(await self.judge(Address("a", "nx.example.test")), NO_DOMAIN)
        [event] = [e for e in events if e.get("policy") == "mfcheck"]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            (event["policy"], event["sender"], event["peer"], event["code"]),
            ("mfcheck", "a@nx.example.test", "192.0.2.4", 553),
        )
        self.assertEqual(self.dns.asked, [(b"nx.example.test", dns.MX)])

    async def test_noAddressRecords(self) -> None:
        self.assertEqual(await self.judge(Address("a", "txt.example.test")), NO_DOMAIN)

    async def test_nullMX(self) -> None:
        self.assertEqual(await self.judge(Address("a", "nullmx.example.test")), NULL_MX)

    async def test_servfail(self) -> None:
        self.assertEqual(await self.judge(Address("a", "broken.example.test")), TROUBLE)
        self.assertEqual(len(self.flushLoggedErrors(Broken)), 1)  # the DNS server's own log

    async def test_serverNotAnswering(self) -> None:
        closed = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.dns), interface="127.0.0.1")
        port = closed.getHost().port
        await closed.stopListening()
        resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        self.check = SenderDomainCheck(lambda: resolver, OURS, timeout=(1,))
        with capturedLogs() as events:
            self.assertEqual(await self.judge(Address("a", "mx.example.test")), TROUBLE)
        [event] = [e for e in events if e.get("policy") == "mfcheck"]
        self.assertEqual((event["reason"], event["code"]), ("DNS trouble: TimeoutError", 451))

    async def test_noLookupForNullSenderOwnDomainsAndLiterals(self) -> None:
        for sender in (
            Address.null(),
            Address("#", "[]"),
            Address("a", "mx.test"),
            Address("a", "ours.test"),
            Address("a", "[192.0.2.1]"),
        ):
            self.assertEqual(await self.judge(sender), b"continue", sender)
        self.assertEqual(self.dns.asked, [])

    async def test_senderWithoutDomain(self) -> None:
        self.assertEqual(await self.judge(Address("a", "")), NO_DOMAIN)
        self.assertEqual(self.dns.asked, [])


@implementer(ISenderCheck)
class Recorded:
    """Keeps the Deferreds its inner check answers, for the test to wait on."""

    def __init__(self, inner: SenderDomainCheck) -> None:
        self.inner = inner
        self.pending: list[Deferred[Verdict]] = []

    def checkSender(
        self, session: ISMTPSession, sender: Address, parameters: dict[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        result = self.inner.checkSender(session, sender, parameters)
        if isinstance(result, Deferred):
            self.pending.append(result)
        return result


class SenderDomainProtocolTests(DNSServerTestCase):
    async def test_mailRefusedAndNextMailAccepted(self) -> None:
        check = Recorded(self.check)
        h = SMTPServerHarness(self.mktemp(), senderChecks=[check])
        h.clear()
        h.send(b"HELO c\r\nMAIL FROM:<a@nx.example.test>\r\nMAIL FROM:<a@mx.example.test>\r\n")
        await check.pending[0]
        await check.pending[1]
        self.assertEqual(h.codes(), [250, 553, 250])
        self.assertEqual(h.replies()[1].encode() + b"\r\n", NO_DOMAIN)
        h.send(b"RCPT TO:<u@mx.test>\r\n")
        self.assertEqual(h.codes()[-1], 250)


class RegisterTests(SynchronousTestCase):
    def test_givenResolver(self) -> None:
        resolver = client.Resolver(servers=[("127.0.0.1", 53)], reactor=MemoryReactorClock())
        config = makeTestConfig(self.mktemp())
        context = PolicyContext(config, extra={"resolver": resolver})
        check = makeRegistry(config, context, ["mfcheck"]).getUtility(ISenderCheck, "mfcheck")
        assert isinstance(check, SenderDomainCheck)
        self.assertIs(check.resolver, resolver)

    def test_configuredServersMadeAtFirstUse(self) -> None:
        clock = MemoryReactorClock()
        config = makeTestConfig(self.mktemp())
        context = PolicyContext(
            config, clock, extra={"dns_servers": [("192.0.2.53", 5353)], "dns_timeout": (2,)}
        )
        check = makeRegistry(config, context, ["mfcheck"]).getUtility(ISenderCheck, "mfcheck")
        assert isinstance(check, SenderDomainCheck)
        self.assertIsNone(check._resolver)
        self.assertEqual(check.timeout, (2,))
        resolver = check.resolver
        assert isinstance(resolver, client.Resolver)
        self.assertEqual((resolver.servers, resolver._reactor), ([("192.0.2.53", 5353)], clock))

    def test_ownDomainsFromControl(self) -> None:
        config = makeTestConfig(self.mktemp(), '[control]\nlocals = ["here.test"]\n')
        check = makeRegistry(config, names=["mfcheck"]).getUtility(ISenderCheck, "mfcheck")
        assert isinstance(check, SenderDomainCheck)
        self.assertIs(check.checkSender(session(), Address("a", "here.test"), {}), CONTINUE)
