"""Log events: qmail-send wording in text, the data in fields, JSON for machines."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import cast

from twisted.logger import (
    ILogObserver,
    Logger,
    capturedLogs,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.logging import TextObserver, logsafe
from qmailtx.testing import SMTPServerHarness


class LogTests(SynchronousTestCase):
    def test_logsafeFollowsQmail(self) -> None:
        self.assertEqual(logsafe("a b\nc%d\x01é"), "a_b/c_d__")

    def test_refusalsAreLoggedWithFields(self) -> None:
        h = SMTPServerHarness(self.mktemp())
        with capturedLogs() as events:
            h.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@other.example>\r\n")
        [event] = [e for e in events if "relay refused" in e["log_format"]]
        self.assertEqual(event["rcpt"], "x@other.example")
        self.assertEqual(event["peer"], "192.0.2.1")
        self.assertEqual(
            formatEvent(event),
            f"relay refused: x@other.example from 192.0.2.1 session {event['session']}",
        )
        out = io.StringIO()
        jsonFileLogObserver(out)(event)
        record = json.loads(out.getvalue().strip("\x1e"))
        self.assertEqual(record["rcpt"], "x@other.example")


class TextObserverTests(SynchronousTestCase):
    def observe(self, event: dict[str, object]) -> tuple[str, str]:
        ours = io.StringIO()
        flushes: list[object] = []
        TextObserver(ours, flushes.append)(event)
        theirs = io.StringIO()
        textFileLogObserver(theirs)(event)
        return ours.getvalue(), theirs.getvalue()

    def test_sameLinesAsTwistd(self) -> None:
        log = Logger(namespace="qmailtx.queue.manager")
        events: list[dict[str, object]] = []
        log.observer = cast(ILogObserver, events.append)
        log.info(
            "delivery {delivery}: {outcome}: {text}", delivery=7, outcome="success", text="did"
        )
        log.info("odd {x!r} and {{braces}}", x="v")
        log.warn("no fields")
        lines = []
        for event in events:
            ours, theirs = self.observe(event)
            self.assertEqual(ours, theirs)
            lines.append(ours)
        self.assertTrue(
            lines[0].endswith("[qmailtx.queue.manager#info] delivery 7: success: did\n")
        )
        self.assertTrue(lines[1].endswith("] odd 'v' and {braces}\n"))

    def test_failuresCarryTheirTraceback(self) -> None:
        log = Logger(namespace="x")
        events: list[dict[str, object]] = []
        log.observer = cast(ILogObserver, events.append)
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            log.failure("broken {thing}", thing="here")
        ours, theirs = self.observe(events[0])
        self.assertIn("broken here", ours)
        self.assertIn("ZeroDivisionError", ours)

    def test_flushedOncePerReactorTurn(self) -> None:
        out = io.StringIO()
        pending: list[Callable[[], None]] = []
        observer = TextObserver(out, pending.append)
        for i in range(3):
            observer({"log_format": "n {i}", "i": i, "log_time": 0.0, "log_namespace": "x"})
        self.assertEqual(len(pending), 1)

    def test_twistdUsesItUnderNodaemonOnStdout(self) -> None:
        from twisted.scripts._twistd_unix import ServerOptions

        from qmailtx.logging import textObserverFactory

        etc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
        config = os.path.join(etc, "qmailtx.toml")
        options = ServerOptions()
        options.parseOptions(["-n", "qmailtx", "--config", config])
        self.assertIs(options["logger"], textObserverFactory)
        options = ServerOptions()
        options.parseOptions(["-n", "--logfile", "x.log", "qmailtx", "--config", config])
        self.assertIsNone(options["logger"])
