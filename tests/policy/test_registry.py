"""The registry: built-in policies by name, their order, plugins by name."""

from __future__ import annotations

import os
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

import twisted.plugins
from qmailtx.config import Config
from qmailtx.policy.badmailfrom import BadMailFrom
from qmailtx.policy.badrcptto import BadRcptTo
from qmailtx.policy.interfaces import IRecipientCheck
from qmailtx.policy.mfcheck import SenderDomainCheck
from qmailtx.policy.nullsender import NullSenderSingleRecipient
from qmailtx.policy.rcptcheck import NoRecipientCheck
from qmailtx.policy.relay import RelayControl
from qmailtx.queue.store import synchronousRunner
from qmailtx.registry import BUILTIN, PolicyContext, RegistryError, makeRegistry, policyChain
from qmailtx.testing import SMTPServerHarness, makeTestConfig
from qmailtx.vdomain.records import Domain, User
from qmailtx.vdomain.sqlite import SQLiteUserStore

SECTION_1 = ("badmailfrom", "nullsender", "badrcptto", "relay", "rcptcheck")


class BuiltinTests(SynchronousTestCase):
    def config(self, toml: str = "") -> Config:
        return makeTestConfig(self.mktemp(), toml)

    def test_eachBuiltinNameBuildsAtItsStage(self) -> None:
        config = self.config()
        stages = {}
        for name in BUILTIN:
            chain = policyChain(makeRegistry(config, names=[name]), [name])
            stages[name] = tuple(
                stage for stage in ("sender", "recipient", "data") if getattr(chain, stage)
            )
        self.assertEqual(
            stages,
            {
                "relay": ("recipient",),
                "badmailfrom": ("recipient",),
                "badrcptto": ("recipient",),
                "nullsender": ("recipient",),
                "rcptcheck": ("recipient",),
                "mfcheck": ("sender",),
                "exeblock": ("data",),
            },
        )

    def test_componentTypes(self) -> None:
        chain = policyChain(makeRegistry(self.config(), names=BUILTIN), list(BUILTIN))
        self.assertEqual(
            [type(check) for check in chain.recipientChecks],
            [RelayControl, BadMailFrom, BadRcptTo, NullSenderSingleRecipient, NoRecipientCheck],
        )
        self.assertEqual([type(check) for check in chain.senderChecks], [SenderDomainCheck])

    def test_chainFollowsConfiguredOrder(self) -> None:
        order = ["rcptcheck", "relay", "mfcheck", "badrcptto", "exeblock", "nullsender"]
        chain = policyChain(makeRegistry(self.config(), names=order), order)
        self.assertEqual(
            [name for name, _ in chain.recipient],
            ["rcptcheck", "relay", "badrcptto", "nullsender"],
        )
        self.assertEqual(
            chain.describe(),
            ("MAIL: mfcheck; RCPT: rcptcheck, relay, badrcptto, nullsender; DATA: exeblock"),
        )

    def test_defaultOrderIsSection1(self) -> None:
        config = self.config()
        self.assertEqual(tuple(n for n in config.smtp.policies if n in SECTION_1), SECTION_1)
        makeRegistry(config)  # every default listener's policies build

    def test_unknownNameIsNamed(self) -> None:
        with self.assertRaises(RegistryError) as e:
            makeRegistry(self.config(), names=["relay", "nosuchpolicy"])
        self.assertIn("'nosuchpolicy'", str(e.exception))
        registry = makeRegistry(self.config(), names=["relay"])
        with self.assertRaises(RegistryError) as e:
            policyChain(registry, ["relay", "badrcptto"])
        self.assertIn("'badrcptto'", str(e.exception))


class OrderOfChecksTests(SynchronousTestCase):
    """patches.md section 1, step 6: badmailfrom, null sender, badrcptto,
    relay, recipient check; the client sees only the first refusal."""

    def setUp(self) -> None:
        config = makeTestConfig(
            self.mktemp(),
            '[control]\nrcpthosts = ["mx.test"]\nbadmailfrom = ["@spam.test"]\n'
            'badrcptto = ["trap@mx.test", "@old.test"]\n',
        )
        os.makedirs(config.paths.data)
        store = SQLiteUserStore(os.path.join(config.paths.data, "users.sqlite3"))
        self.addCleanup(store.close)
        for domain in ("mx.test", "hosted.test"):  # hosted.test is not in rcpthosts
            store.addDomain(Domain(domain))
            store.addUser(User("alice", domain))
        context = PolicyContext(config, runner=synchronousRunner, users=store)
        chain = policyChain(makeRegistry(config, context, SECTION_1), SECTION_1)
        self.h = SMTPServerHarness(self.mktemp(), recipientChecks=chain.recipientChecks)
        self.h.send(b"HELO c\r\n")

    def replies(self, mail: bytes, *rcpts: bytes) -> list[str]:
        self.h.clear()
        self.h.send(b"MAIL FROM:<" + mail + b">\r\n")
        for rcpt in rcpts:
            self.h.send(b"RCPT TO:<" + rcpt + b">\r\n")
        self.h.send(b"RSET\r\n")
        return self.h.replies()[1:-1]

    def test_badmailfromFirst(self) -> None:
        self.assertEqual(
            self.replies(b"x@spam.test", b"trap@mx.test", b"nobody@mx.test", b"a@remote.test"),
            ["553 5.7.1 sorry, your envelope sender is in my badmailfrom list"] * 3,
        )

    def test_nullSenderBeforeBadrcpttoAndRelay(self) -> None:
        self.assertEqual(
            self.replies(b"", b"alice@mx.test", b"trap@mx.test", b"a@remote.test"),
            ["250 2.1.5 ok"]
            + ["553 5.7.1 sorry, bounce messages should have a single envelope recipient"] * 2,
        )

    def test_badrcpttoBeforeRelay(self) -> None:
        self.assertEqual(
            self.replies(b"a@sender.test", b"x@old.test"),
            ["553 5.7.1 sorry, mail to that recipient is not accepted"],
        )

    def test_relayBeforeRecipientCheck(self) -> None:
        self.assertEqual(
            self.replies(b"a@sender.test", b"nobody@hosted.test", b"nobody@mx.test"),
            [
                "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts",
                "550 5.1.1 sorry, no mailbox here by that name",
            ],
        )

    def test_everyCheckPasses(self) -> None:
        self.assertEqual(self.replies(b"a@sender.test", b"Alice@MX.test"), ["250 2.1.5 ok"])


PLUGIN = """
from twisted.plugin import IPlugin
from zope.interface import implementer

from qmailtx.policy.interfaces import IPolicyPlugin, IRecipientCheck
from qmailtx.policy.verdict import CONTINUE, tempfail


@implementer(IRecipientCheck)
class Greylist:
    def checkRecipient(self, session, recipient):
        if recipient.local == "grey":
            return tempfail(450, "4.7.1", "greylisted, try again later")
        return CONTINUE


@implementer(IPlugin, IPolicyPlugin)
class GreylistPlugin:
    name = "testgreylist"

    def register(self, registry, context):
        registry.registerUtility(Greylist(), IRecipientCheck, name=self.name)


greylist = GreylistPlugin()
"""


class PluginTests(SynchronousTestCase):
    def setUp(self) -> None:
        """A plugin module in ``<tmp>/twisted/plugins``, on twisted.plugins' path."""
        folder = os.path.join(os.path.abspath(self.mktemp()), "twisted", "plugins")
        os.makedirs(folder)
        module = f"qmailtx_testplugin_{id(self)}"
        with open(os.path.join(folder, module + ".py"), "w") as f:
            f.write(textwrap.dedent(PLUGIN))
        twisted.plugins.__path__.append(folder)
        self.addCleanup(twisted.plugins.__path__.remove, folder)
        self.addCleanup(sys.modules.pop, f"twisted.plugins.{module}", None)

    def test_pluginRegisteredByNameAndRuns(self) -> None:
        config = makeTestConfig(self.mktemp())
        names = ["testgreylist", "relay"]
        chain = policyChain(makeRegistry(config, names=names), names)
        self.assertEqual([name for name, _ in chain.recipient], names)
        h = SMTPServerHarness(self.mktemp(), recipientChecks=chain.recipientChecks)
        h.clear()
        h.send(
            b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<grey@mx.test>\r\nRCPT TO:<u@mx.test>\r\n"
        )
        self.assertEqual(h.replies()[2], "450 4.7.1 greylisted, try again later")
        self.assertEqual(h.codes()[3], 250)

    def test_unknownNameListsPlugins(self) -> None:
        with self.assertRaises(RegistryError) as e:
            makeRegistry(makeTestConfig(self.mktemp()), names=["nosuch"])
        self.assertIn("testgreylist", str(e.exception))
        self.assertIn("'nosuch'", str(e.exception))

    def test_secondRegistrationOfTheNameIsRefused(self) -> None:
        registry = makeRegistry(makeTestConfig(self.mktemp()), names=["testgreylist"])
        with self.assertRaises(RegistryError):
            registry.registerUtility(
                NullSenderSingleRecipient(), IRecipientCheck, name="testgreylist"
            )
