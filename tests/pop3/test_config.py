"""[pop3] and [pop3s] settings, and the "pop3" service they make."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.config import ConfigError, parseConfig
from qmailtx.service import makeMailService
from qmailtx.testing import makeTestConfig


class POP3ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        pop3 = parseConfig("", "/x").pop3
        self.assertEqual(
            (pop3.listen, pop3.tls_listen, pop3.auth_before_tls, pop3.apop, pop3.timeout),
            ((), (), False, False, 600),
        )

    def test_settings(self) -> None:
        pop3 = parseConfig(
            '[pop3]\nlisten = ["tcp:110"]\nauth_before_tls = true\napop = true\n'
            'timeout = 900\nmax_bad_commands = 5\n[pop3s]\nlisten = ["tcp:995"]\n',
            "/x",
        ).pop3
        self.assertEqual(pop3.listen, ("tcp:110",))
        self.assertEqual(pop3.tls_listen, ("tcp:995",))
        self.assertEqual((pop3.auth_before_tls, pop3.apop, pop3.timeout), (True, True, 900))
        self.assertEqual(pop3.max_bad_commands, 5)

    def test_timeoutBelowRFC1939Refused(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parseConfig("[pop3]\ntimeout = 60\n", "/x")
        self.assertIn("timeout", str(caught.exception))

    def test_unknownKeyRefused(self) -> None:
        self.assertRaises(ConfigError, parseConfig, "[pop3s]\nstls = true\n", "/x")

    def test_pop3sNeedsTLS(self) -> None:
        config = makeTestConfig(os.path.abspath(self.mktemp()), '[pop3s]\nlisten = ["tcp:0"]\n')
        with self.assertRaises(ConfigError) as caught:
            makeMailService(reactor, config)
        self.assertIn("[pop3s]", str(caught.exception))

    def test_pop3Service(self) -> None:
        config = makeTestConfig(os.path.abspath(self.mktemp()), '[pop3]\nlisten = ["tcp:0"]\n')
        service = makeMailService(reactor, config)
        self.assertEqual(len(list(service.getServiceNamed("pop3"))), 1)
