"""RemoteDeliveryAgent with a fake SMTP client and fake destinations."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qmailtx.address import Address
from qmailtx.delivery.interfaces import IDeliveryAgent, Outcome
from qmailtx.delivery.mx import Destination, RouteError
from qmailtx.delivery.remote import (
    NO_CONNECTION,
    RemoteDeliveryAgent,
    RemoteSettings,
    listenerAddresses,
    ownAddresses,
)
from qmailtx.delivery.routes import Route, parseOutgoingIP, parseSmtpRoutes
from qmailtx.queue.layout import TODO, QueuedMessage
from qmailtx.smtp.client import ClientOptions, Reply, TransactionResult
from qmailtx.smtp.source import BytesSource, MessageSource
from qmailtx.smtp.wire import wireMessage

MX1 = Destination("mx1.example.org", "192.0.2.1", 25, 10)
MX2 = Destination("mx2.example.org", "192.0.2.2", 25, 20)
MX6 = Destination("mx6.example.org", "2001:db8::6", 25, 30)


def reply(code: int, *lines: str) -> Reply:
    return Reply(code, tuple(lines) or ("ok",))


def result(
    greeting: Reply | None = None,
    mail: Reply | None = None,
    recipients: list[Reply | None] | None = None,
    data: Reply | None = None,
    connected: bool = True,
    failure: str | None = None,
    permanent: bool = False,
) -> TransactionResult:
    return TransactionResult(
        connected=connected,
        greeting=greeting,
        mail=mail,
        recipients=recipients or [],
        data=data,
        tls=None,
        peer="",
        failure=failure,
        permanent=permanent,
    )


def accepted(count: int = 1) -> TransactionResult:
    return result(
        reply(220, "mx ESMTP"),
        reply(250),
        [reply(250)] * count,
        reply(250, "2.0.0 ok queued as 123"),
    )


REFUSED = result(connected=False, failure="connection refused")


def message(recipients: list[str], sender: str = "alice@ours.test") -> QueuedMessage:
    rcpts = [Address.fromStored(r) for r in recipients]
    return QueuedMessage(
        msgid="m1",
        path="/nonexistent",
        birth=0.0,
        sender=Address.fromStored(sender),
        recipients=rcpts,
        states=[TODO] * len(rcpts),
        stateOffsets=[0] * len(rcpts),
        messageOffset=0,
        messageLength=10,
    )


class FakeSender:
    """Answers each destination address with a scripted TransactionResult
    (or Deferred of one), recording every call."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        options: ClientOptions,
        sender: str,
        recipients: list[str],
        message: MessageSource,
        tlsCreator: Any = None,
    ) -> Deferred[TransactionResult]:
        address = endpoint._host  # type: ignore[attr-defined]
        self.calls.append(
            {
                "endpoint": endpoint,
                "address": address,
                "options": options,
                "sender": sender,
                "recipients": recipients,
                "source": message,
                "message": _stored(message),
                "wire": wireMessage(_stored(message)),
            }
        )
        answer = self.answers[address]
        return answer if isinstance(answer, Deferred) else succeed(answer)


class FakeDestinations:
    def __init__(self, answer: list[Destination] | RouteError) -> None:
        self.answer = answer
        self.asked: list[tuple[str, Route | None]] = []

    def __call__(self, domain: str, route: Route | None = None) -> Deferred[list[Destination]]:
        self.asked.append((domain, route))
        if isinstance(self.answer, RouteError):
            d: Deferred[list[Destination]] = Deferred()
            d.errback(self.answer)
            return d
        return succeed(self.answer)


def _stored(source: MessageSource) -> bytes:
    """The message ``source`` streams, read chunk by chunk (test sources answer at once)."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = cast(bytes, succeedingResult(source.read(offset, 7)))
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def succeedingResult(d: Deferred[Any]) -> Any:
    found: list[Any] = []
    d.addBoth(found.append)
    return found[0]


def syncRunner(f: Any, *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


class Harness:
    def __init__(
        self,
        answers: dict[str, Any],
        destinations: list[Destination] | RouteError,
        body: bytes = b"Subject: hi\n\nbody\n",
        **settings: Any,
    ) -> None:
        self.sender = FakeSender(answers)
        self.destinations = FakeDestinations(destinations)
        self.body = body
        self.reactor = MemoryReactorClock()
        settings.setdefault("heloName", "mx.ours.test")
        self.agent = RemoteDeliveryAgent(
            self.reactor,
            lambda m: succeed(BytesSource(self.body)),
            syncRunner,
            self.destinations,
            RemoteSettings(**settings),
            send=self.sender,
        )

    def deliver(self, *recipients: str, whenDelivered: Any = None) -> Deferred[Any]:
        m = message(list(recipients))
        return self.agent.deliver(m, m.recipients, whenDelivered)


class RemoteAgentTests(SynchronousTestCase):
    def outcomes(self, results: list[Any]) -> list[Outcome]:
        return [r.outcome for r in results]

    def test_interfaceAndBatchKey(self) -> None:
        h = Harness({}, [MX1])
        verifyObject(IDeliveryAgent, h.agent)
        self.assertEqual(h.agent.batchKey(Address("Bob", "Example.ORG")), "example.org")
        self.assertEqual(h.agent.batchLimit("example.org"), 20)
        h = Harness({}, [MX1], perDomain=3)
        self.assertEqual(h.agent.batchLimit("example.org"), 3)

    def test_deliveredTextNamesTheIPAndTheReply(self) -> None:
        h = Harness({"192.0.2.1": accepted(2)}, [MX1, MX2])
        with capturedLogs() as events:
            results = self.successResultOf(h.deliver("bob@example.org", "Carol@example.org"))
        self.assertEqual(self.outcomes(results), [Outcome.DELIVERED] * 2)
        self.assertEqual(
            results[0].text,
            "192.0.2.1 accepted message. Remote host said: 250 2.0.0 ok queued as 123",
        )
        [call] = h.sender.calls
        self.assertEqual(call["recipients"], ["bob@example.org", "Carol@example.org"])
        self.assertEqual(call["sender"], "alice@ours.test")
        self.assertEqual(h.destinations.asked, [("example.org", None)])
        logged = [e for e in events if "rcpt_sent" in e]
        self.assertEqual([e["rcpt_sent"] for e in logged], ["bob@example.org", "Carol@example.org"])
        self.assertEqual({(e["host"], e["ip"]) for e in logged}, {("mx1.example.org", "192.0.2.1")})

    def test_refusedConnectionTriesTheNextMX(self) -> None:
        h = Harness({"192.0.2.1": REFUSED, "192.0.2.2": accepted()}, [MX1, MX2])
        [r] = self.successResultOf(h.deliver("bob@example.org"))
        self.assertEqual(r.outcome, Outcome.DELIVERED)
        self.assertTrue(r.text.startswith("192.0.2.2 accepted message."))
        self.assertEqual([c["address"] for c in h.sender.calls], ["192.0.2.1", "192.0.2.2"])

    def test_554GreetingTriesTheNextMX(self) -> None:
        bad = result(reply(554, "no SMTP service here"), failure="greeting")
        h = Harness({"192.0.2.1": bad, "192.0.2.2": accepted()}, [MX1, MX2])
        [r] = self.successResultOf(h.deliver("bob@example.org"))
        self.assertEqual(r.outcome, Outcome.DELIVERED)

    def test_everyGreeting5xxIsPermanent(self) -> None:
        bad = result(reply(554, "go away"))
        h = Harness({"192.0.2.1": bad, "192.0.2.2": bad}, [MX1, MX2])
        [r] = self.successResultOf(h.deliver("bob@example.org"))
        self.assertEqual(r.outcome, Outcome.PERMANENT)
        self.assertIn(
            "Connected to mx2.example.org [192.0.2.2] but greeting failed."
            " Remote host said: 554 go away",
            r.text,
        )

    def test_4xxAnd5xxGreetingsDefer(self) -> None:
        h = Harness(
            {"192.0.2.1": result(reply(421, "busy")), "192.0.2.2": result(reply(554, "no"))},
            [MX1, MX2],
        )
        [r] = self.successResultOf(h.deliver("bob@example.org"))
        self.assertEqual(r.outcome, Outcome.TEMPORARY)
        self.assertIn("421 busy", r.text)
        self.assertIn("554 no", r.text)

    def test_noConnectionAtAllDefers(self) -> None:
        h = Harness({"192.0.2.1": REFUSED, "192.0.2.2": REFUSED}, [MX1, MX2])
        [r] = self.successResultOf(h.deliver("bob@example.org"))
        self.assertEqual(r.outcome, Outcome.TEMPORARY)
        self.assertTrue(r.text.startswith(NO_CONNECTION))
        self.assertIn("192.0.2.2", r.text)

    def test_failureBeforeMailTriesTheNextMX(self) -> None:
        tlsFailed = result(reply(220), failure="TLS negotiation failed")
        h = Harness({"192.0.2.1": tlsFailed, "192.0.2.2": accepted()}, [MX1, MX2])
        [r] = self.successResultOf(h.deliver("bob@example.org"))
        self.assertEqual(r.outcome, Outcome.DELIVERED)

    def test_permanentFailureBeforeMailEverywhereIsPermanent(self) -> None:
        tooBig = result(reply(220), failure="message is too big for the server", permanent=True)
        h = Harness({"192.0.2.1": tooBig}, [MX1])
        [r] = self.successResultOf(h.deliver("bob@example.org"))
        self.assertEqual(r.outcome, Outcome.PERMANENT)
        self.assertIn("too big", r.text)

    def test_perRecipientResults(self) -> None:
        answer = result(
            reply(220),
            reply(250),
            [reply(250), reply(450, "4.2.1 mailbox busy"), reply(550, "5.1.1 no such user")],
            reply(250),
        )
        h = Harness({"192.0.2.1": answer, "192.0.2.2": accepted(3)}, [MX1, MX2])
        results = self.successResultOf(h.deliver("a@example.org", "b@example.org", "c@example.org"))
        self.assertEqual(
            self.outcomes(results), [Outcome.DELIVERED, Outcome.TEMPORARY, Outcome.PERMANENT]
        )
        self.assertEqual(
            results[2].text,
            "mx1.example.org [192.0.2.1] does not like recipient."
            " Remote host said: 550 5.1.1 no such user",
        )
        self.assertEqual(len(h.sender.calls), 1)  # a transaction settles it: no next MX

    def test_mailRejectedSettlesEveryRecipient(self) -> None:
        for code, outcome in ((550, Outcome.PERMANENT), (451, Outcome.TEMPORARY)):
            answer = result(reply(220), reply(code, "sender refused"))
            h = Harness({"192.0.2.1": answer, "192.0.2.2": accepted(2)}, [MX1, MX2])
            results = self.successResultOf(h.deliver("a@example.org", "b@example.org"))
            self.assertEqual(self.outcomes(results), [outcome] * 2)
            self.assertIn(f"Remote host said: {code} sender refused", results[0].text)
            self.assertEqual(len(h.sender.calls), 1)

    def test_dataReplies(self) -> None:
        for code, outcome in ((452, Outcome.TEMPORARY), (554, Outcome.PERMANENT)):
            answer = result(reply(220), reply(250), [reply(250)], reply(code, "content"))
            h = Harness({"192.0.2.1": answer}, [MX1])
            [r] = self.successResultOf(h.deliver("a@example.org"))
            self.assertEqual(r.outcome, outcome)
            self.assertIn(f"failed after I sent the message. Remote host said: {code}", r.text)

    def test_connectionDiedAfterRecipients(self) -> None:
        answer = result(reply(220), reply(250), [reply(250)], None, failure="connection lost")
        h = Harness({"192.0.2.1": answer}, [MX1])
        [r] = self.successResultOf(h.deliver("a@example.org"))
        self.assertEqual(r.outcome, Outcome.TEMPORARY)
        self.assertIn("connection lost", r.text)

    def test_routeErrors(self) -> None:
        for permanent, outcome in ((True, Outcome.PERMANENT), (False, Outcome.TEMPORARY)):
            h = Harness({}, RouteError("Sorry, no host. (#5.1.2)", permanent))
            results = self.successResultOf(h.deliver("a@example.org", "b@example.org"))
            self.assertEqual(self.outcomes(results), [outcome] * 2)
            self.assertEqual(results[0].text, "Sorry, no host. (#5.1.2)")
            self.assertEqual(h.sender.calls, [])

    def test_routeAuthAndSettingsReachTheClient(self) -> None:
        routes = parseSmtpRoutes([".example.org:relay.test:587 user secret"])
        relay = Destination("relay.test", "192.0.2.9", 587, 0)
        h = Harness(
            {"192.0.2.9": accepted()},
            [relay],
            routes=routes,
            tls="none",
            tlsPolicy={"example.org": "verify"},
            replyTimeout=30.0,
            connectTimeout=5.0,
        )
        self.successResultOf(h.deliver("a@sub.example.org"))
        [call] = h.sender.calls
        options = call["options"]
        self.assertEqual(options.auth, ("user", "secret"))
        self.assertEqual(options.tls, "verify")
        self.assertEqual(options.tlsHostname, "relay.test")
        self.assertEqual(options.heloName, "mx.ours.test")
        self.assertEqual((options.replyTimeout, options.connectTimeout), (30.0, 5.0))
        self.assertEqual(call["endpoint"]._port, 587)
        [(_, route)] = h.destinations.asked
        self.assertEqual(route, Route("relay.test", 587, ("user", "secret")))

    def test_tlsPolicyLookup(self) -> None:
        settings = RemoteSettings(
            "h", tls="opportunistic", tlsPolicy={"example.com": "verify", "x.example.com": "none"}
        )
        self.assertEqual(settings.tlsFor("example.com"), "verify")
        self.assertEqual(settings.tlsFor("a.example.com"), "verify")
        self.assertEqual(settings.tlsFor("a.x.example.com"), "none")
        self.assertEqual(settings.tlsFor("example.net"), "opportunistic")

    def test_outgoingIPMatchesTheFamily(self) -> None:
        outgoing = parseOutgoingIP(["192.0.2.100", "v6.example:[2001:db8::100]"])
        h = Harness(
            {"192.0.2.1": REFUSED, "2001:db8::6": accepted()}, [MX1, MX6], outgoing=outgoing
        )
        self.successResultOf(h.deliver("a@example.org"))
        first, second = (c["endpoint"] for c in h.sender.calls)
        self.assertIsInstance(first, TCP4ClientEndpoint)
        self.assertEqual(first._bindAddress, ("192.0.2.100", 0))
        self.assertIsInstance(second, TCP6ClientEndpoint)
        self.assertIsNone(second._bindAddress)  # no IPv6 address for example.org
        h2 = Harness({"2001:db8::6": accepted()}, [MX6], outgoing=outgoing)
        self.successResultOf(h2.deliver("a@v6.example"))
        self.assertEqual(h2.sender.calls[0]["endpoint"]._bindAddress, ("2001:db8::100", 0))

    def test_partialFinalLineIsCompleted(self) -> None:
        h = Harness({"192.0.2.1": accepted()}, [MX1], body=b"Subject: x\n\nno newline")
        self.successResultOf(h.deliver("a@example.org"))
        self.assertEqual(h.sender.calls[0]["wire"], b"Subject: x\r\n\r\nno newline\r\n.\r\n")

    def test_whenDeliveredRunsOnlyWhenAllDelivered(self) -> None:
        ran: list[int] = []
        h = Harness({"192.0.2.1": accepted(2)}, [MX1])
        self.successResultOf(
            h.deliver("a@example.org", "b@example.org", whenDelivered=lambda: ran.append(1))
        )
        self.assertEqual(ran, [1])
        h = Harness({"192.0.2.1": REFUSED}, [MX1])
        self.successResultOf(h.deliver("a@example.org", whenDelivered=lambda: ran.append(2)))
        self.assertEqual(ran, [1])

    def test_deliversAtOnceTheQueueManagerLimitsDomains(self) -> None:
        """The per-domain bound is the queue manager's (``batchLimit``): the
        agent starts every delivery it is given, and counts them."""
        held: list[Deferred[TransactionResult]] = []

        class Holding(FakeSender):
            def __call__(self, *args: Any, **kwargs: Any) -> Deferred[TransactionResult]:
                super().__call__(*args, **kwargs)
                d: Deferred[TransactionResult] = Deferred()
                held.append(d)
                return d

        h = Harness({"192.0.2.1": None}, [MX1], perDomain=2)
        self.assertEqual(h.agent.batchLimit("example.org"), 2)
        h.agent._send = h.sender = Holding({"192.0.2.1": None})
        pending = [h.deliver(f"u{i}@example.org") for i in range(3)]
        other = h.deliver("x@other.example")
        self.assertEqual(len(held), 4)  # no waiting inside the agent
        self.assertEqual(h.agent.active, 4)
        while held:
            held.pop(0).callback(accepted())
        for d in [*pending, other]:
            [r] = self.successResultOf(d)
            self.assertEqual(r.outcome, Outcome.DELIVERED)
        self.assertEqual(h.agent.active, 0)


class OwnAddressTests(SynchronousTestCase):
    def test_listenerAddresses(self) -> None:
        self.assertEqual(
            listenerAddresses(
                ["tcp:25", "tcp:2525:interface=127.0.0.3", "tcp6:port=587:interface=\\:\\:1"]
            ),
            ({"127.0.0.3", "::1"}, {25, 2525, 587}),
        )

    def test_port25CountsLoopbackAndInterfaces(self) -> None:
        addresses, networks = ownAddresses(["192.0.2.7"], ["tcp:25:interface=198.51.100.1"])
        self.assertIn("127.0.0.0/8", networks)
        self.assertIn("0.0.0.0/8", networks)
        self.assertTrue({"192.0.2.7", "198.51.100.1"} <= addresses())

    def test_otherPortKeepsOnlyConfigured(self) -> None:
        addresses, networks = ownAddresses(["192.0.2.7"], ["tcp:2525"], remotePort=2600)
        self.assertEqual(addresses(), {"192.0.2.7"})
        self.assertEqual(networks, ("0.0.0.0/8", "::/128"))
