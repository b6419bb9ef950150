"""Configuration: TOML, the qmail control directory, and their errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.config import ConfigError, defaultConfig, loadConfig, parseConfig
from qmailtx.pop3.factory import POP3Settings
from qmailtx.smtp.factory import SMTPSettings

HERE = os.path.dirname(os.path.abspath(__file__))
ETC = os.path.join(os.path.dirname(HERE), "etc")


class DefaultsTests(SynchronousTestCase):
    def test_annotatedDefaultEqualsTheBuiltInDefault(self) -> None:
        fromFile = loadConfig(os.path.join(ETC, "qmailtx.toml"))
        builtIn = defaultConfig(ETC)
        self.assertEqual(dataclasses.replace(fromFile, source=builtIn.source), builtIn)

    def test_defaults(self) -> None:
        config = defaultConfig("/srv/mail")
        self.assertEqual(config.paths.data, "/srv/mail/var")
        self.assertEqual(config.smtp.listen, ("tcp:2525:interface=127.0.0.1",))
        self.assertEqual(
            config.smtp.relay_clients,
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )
        self.assertIn("localhost", config.control.locals)
        self.assertEqual(config.control.queuelifetime, 604800)
        self.assertEqual(
            (config.control.concurrencylocal, config.control.concurrencyremote), (10, 20)
        )
        self.assertEqual(config.control.bouncefrom, "MAILER-DAEMON")
        self.assertEqual(config.control.doublebounceto, "postmaster")

    def test_meDrivesTheOtherDefaults(self) -> None:
        config = parseConfig('[control]\nme = "mail.example.com"\n', "/x")
        control = config.control
        self.assertEqual(control.locals, ("mail.example.com", "localhost"))
        self.assertEqual(
            (
                control.smtpgreeting,
                control.bouncehost,
                control.doublebouncehost,
                control.envnoathost,
            ),
            ("mail.example.com",) * 4,
        )

    def test_relativePathsFollowTheConfigFile(self) -> None:
        config = parseConfig('[paths]\ndata = "spool"\n', "/etc/qmailtx")
        self.assertEqual(config.paths.data, "/etc/qmailtx/spool")


class ErrorTests(SynchronousTestCase):
    def assertConfigError(self, text: str, expected: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parseConfig(text, "/x", source="q.toml")
        self.assertIn(expected, str(caught.exception))

    def test_unknownKeys(self) -> None:
        self.assertConfigError("[smtp]\nlisen = []\n", "q.toml: unknown key [smtp] lisen")
        self.assertConfigError("[smtpd]\n", "unknown key [smtpd]")
        self.assertConfigError("[control]\nfoo = 1\n", "unknown key [control] foo")

    def test_wrongTypes(self) -> None:
        self.assertConfigError(
            '[smtp]\nlisten = "tcp:25"\n', "[smtp] listen must be a list of strings"
        )
        self.assertConfigError(
            '[smtp]\nrelay_clients = ["nonsense"]\n', "[smtp] relay_clients must be"
        )
        self.assertConfigError(
            "[smtp]\nmax_recipients = 10\n", "[smtp] max_recipients must be an integer >= 100"
        )
        self.assertConfigError(
            '[control]\ndatabytes = "big"\n', "[control] databytes must be an integer"
        )
        self.assertConfigError(
            "[control]\nlocals = 3\n", "[control] locals must be a list of strings"
        )

    def test_badToml(self) -> None:
        self.assertConfigError("[smtp\n", "q.toml: not valid TOML")

    def test_missingFiles(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            loadConfig("/nonexistent/qmailtx.toml")
        self.assertIn("/nonexistent/qmailtx.toml", str(caught.exception))
        self.assertConfigError(
            '[paths]\ncontrol = "/nonexistent/control"\n', "/nonexistent/control"
        )
        self.assertConfigError(
            '[tls]\ncertificate = "/nonexistent/cert.pem"\n', "/nonexistent/cert.pem"
        )


class ControlDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = self.mktemp()
        self.control = os.path.join(self.base, "control")
        os.makedirs(self.control)

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.control, name), "w") as f:
            f.write(text)

    def parse(self, extra: str = "") -> object:
        return parseConfig('[paths]\ncontrol = "control"\n' + extra, self.base, source="q.toml")

    def test_qmailFilesAreRead(self) -> None:
        self.write("me", "mail.example.com\n")
        self.write("locals", "# ours\nexample.com \t\nlocalhost\n\n")
        self.write("rcpthosts", "example.com\n.example.net\n")
        self.write("virtualdomains", "virt.example:virt.example\n")
        self.write("databytes", "2000000\n")
        self.write("timeoutsmtpd", "0\n")
        self.write("bouncemessage", "Line one.\nLine two.\n")
        self.write("servercert.pem", "not read yet")
        config = self.parse()
        control = config.control  # type: ignore[attr-defined]
        self.assertEqual(control.me, "mail.example.com")
        self.assertEqual(control.locals, ("example.com", "localhost"))
        self.assertEqual(control.rcpthosts, ("example.com", ".example.net"))
        self.assertEqual(control.virtualdomains, ("virt.example:virt.example",))
        self.assertEqual(control.databytes, 2000000)
        self.assertEqual(control.timeoutsmtpd, 1)  # qmail: values <= 0 become 1
        self.assertEqual(control.bouncemessage, "Line one.\nLine two.\n")
        self.assertEqual(control.smtpgreeting, "mail.example.com")
        self.assertEqual(config.unusedControlFiles, ("servercert.pem",))  # type: ignore[attr-defined]

    def test_settingInBothPlacesIsRefused(self) -> None:
        self.write("databytes", "1000\n")
        with self.assertRaises(ConfigError) as caught:
            self.parse("[control]\ndatabytes = 2000\n")
        self.assertIn(
            "[control] databytes is also set by control file databytes", str(caught.exception)
        )

    def test_badNumberNamesTheFile(self) -> None:
        self.write("concurrencyremote", "lots\n")
        with self.assertRaises(ConfigError) as caught:
            self.parse()
        self.assertIn("control file concurrencyremote", str(caught.exception))


class RemoteSettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = defaultConfig("/srv/mail")
        remote, control = config.remote, config.control
        self.assertEqual((remote.tls, dict(remote.tls_policy)), ("opportunistic", {}))
        self.assertEqual((remote.concurrency_per_domain, remote.ipme, remote.port), (20, (), 25))
        self.assertEqual((control.smtproutes, control.outgoingip), ((), ()))
        self.assertEqual(control.helohost, control.me)
        self.assertEqual((control.timeoutremote, control.timeoutconnect), (1200, 60))

    def test_remoteTable(self) -> None:
        config = parseConfig(
            '[remote]\ntls = "verify"\ntls_policy = { "Old.Example" = "none" }\n'
            'concurrency_per_domain = 5\nipme = ["192.0.2.1", "[::1]"]\nport = 2525\n',
            "/x",
        )
        self.assertEqual(config.remote.tls, "verify")
        self.assertEqual(dict(config.remote.tls_policy), {"old.example": "none"})
        self.assertEqual(config.remote.concurrency_per_domain, 5)
        self.assertEqual(config.remote.ipme, ("192.0.2.1", "::1"))
        self.assertEqual(config.remote.port, 2525)

    def test_remoteErrors(self) -> None:
        for text, expected in (
            ('[remote]\ntls = "always"\n', "[remote] tls must be"),
            ('[remote]\ntls_policy = { "a.example" = "sometimes" }\n', "[remote] tls_policy"),
            ('[remote]\nipme = ["banana"]\n', "[remote] ipme must be a list of IP addresses"),
            ("[remote]\nconcurrency_per_domain = 0\n", "concurrency_per_domain"),
            ("[remote]\nport = 70000\n", "[remote] port must be 1..65535"),
            ("[remote]\nfoo = 1\n", "unknown key [remote] foo"),
        ):
            with self.assertRaises(ConfigError) as caught:
                parseConfig(text, "/x", source="q.toml")
            self.assertIn(expected, str(caught.exception))

    def test_controlFiles(self) -> None:
        base = self.mktemp()
        control = os.path.join(base, "control")
        os.makedirs(control)
        for name, text in (
            ("smtproutes", "example.org:relay.example:2525\n:smarthost.example\n"),
            ("outgoingip", "192.0.2.5\n"),
            ("helohost", "out.example.com\n"),
            ("timeoutremote", "300\n"),
            ("timeoutconnect", "10\n"),
        ):
            with open(os.path.join(control, name), "w") as f:
                f.write(text)
        config = parseConfig('[paths]\ncontrol = "control"\n', base)
        self.assertEqual(
            config.control.smtproutes, ("example.org:relay.example:2525", ":smarthost.example")
        )
        self.assertEqual(config.control.outgoingip, ("192.0.2.5",))
        self.assertEqual(config.control.helohost, "out.example.com")
        self.assertEqual((config.control.timeoutremote, config.control.timeoutconnect), (300, 10))
        self.assertEqual(config.unusedControlFiles, ())


class ConnectionLimitConfigTests(SynchronousTestCase):
    """[smtp] and [pop3] max_connections, max_connections_per_ip; [smtp] data_timeout."""

    def test_defaults(self) -> None:
        config = parseConfig("", "/x")
        self.assertEqual(
            (config.smtp.max_connections, config.smtp.max_connections_per_ip), (500, 20)
        )
        self.assertEqual(config.smtp.data_timeout, 1800)
        self.assertEqual(
            (config.pop3.max_connections, config.pop3.max_connections_per_ip), (500, 20)
        )

    def test_settingsReachTheProtocols(self) -> None:
        config = parseConfig(
            "[smtp]\nmax_connections = 50\nmax_connections_per_ip = 0\ndata_timeout = 600\n"
            "[pop3]\nmax_connections = 40\nmax_connections_per_ip = 4\n",
            "/x",
        )
        smtp = SMTPSettings.fromConfig(config)
        self.assertEqual(
            (smtp.maxConnections, smtp.maxConnectionsPerIP, smtp.dataTimeout), (50, 0, 600)
        )
        pop3 = POP3Settings.fromConfig(config)
        self.assertEqual((pop3.maxConnections, pop3.maxConnectionsPerIP), (40, 4))

    def test_negativeValuesRefused(self) -> None:
        for text in (
            "[smtp]\nmax_connections = -1\n",
            "[smtp]\nmax_connections_per_ip = -5\n",
            "[smtp]\ndata_timeout = -1\n",
            '[pop3]\nmax_connections = "many"\n',
            "[pop3]\nmax_connections_per_ip = 1.5\n",
        ):
            key = text.split("\n")[1].split(" ")[0]
            with self.assertRaises(ConfigError) as caught:
                parseConfig(text, "/x", source="q.toml")
            self.assertIn(f"{key} must be an integer >= 0", str(caught.exception))


class ProgramUserConfigTests(SynchronousTestCase):
    """[delivery] program_user: who |program lines run as when the server is root."""

    def assertRefused(self, value: str, expected: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parseConfig(f"[delivery]\nprogram_user = {value!r}\n", "/x", source="q.toml")
        self.assertTrue(str(caught.exception).startswith("q.toml: [delivery] program_user"))
        self.assertIn(expected, str(caught.exception))

    def test_defaultIsNobodyLookedUpAtStartUp(self) -> None:
        nobody = pwd.getpwnam("nobody")
        delivery = defaultConfig("/x").delivery
        self.assertEqual(delivery.program_user, "nobody")
        assert delivery.programIdentity is not None
        self.assertEqual(
            (delivery.programIdentity.uid, delivery.programIdentity.gid),
            (nobody.pw_uid, nobody.pw_gid),
        )

    def test_uidGidForm(self) -> None:
        nobody = pwd.getpwnam("nobody")
        text = f"{nobody.pw_uid}:{nobody.pw_gid}"
        config = parseConfig(f'[delivery]\nprogram_user = "{text}"\n', "/x")
        identity = config.delivery.programIdentity
        assert identity is not None
        self.assertEqual(
            (identity.name, identity.uid, identity.gid), (text, nobody.pw_uid, nobody.pw_gid)
        )

    def test_rootIsRefused(self) -> None:
        why = "qmail never runs deliveries as root"
        self.assertRefused("root", f"'root' is root (uid 0); {why}")
        self.assertRefused("0:0", f"'0:0' is root (uid 0); {why}")
        self.assertRefused("0:65534", "is root (uid 0)")
        self.assertRefused(f"{pwd.getpwnam('nobody').pw_uid}:0", "has group 0 (root's group)")

    def test_unknownUserIsRefused(self) -> None:
        self.assertRefused("no-such-user-qmailtx", "unknown user 'no-such-user-qmailtx'")

    def test_malformedValuesAreRefused(self) -> None:
        self.assertRefused("", 'is not a user name or "uid:gid"')
        self.assertRefused("1:x", 'is not a user name or "uid:gid"')
        self.assertRefused(" nobody", "is not a user name")
        with self.assertRaises(ConfigError) as caught:
            parseConfig("[delivery]\nprogram_user = 65534\n", "/x", source="q.toml")
        self.assertIn("[delivery] program_user must be a string", str(caught.exception))
