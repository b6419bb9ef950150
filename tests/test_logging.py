"""Log events: qmail-send wording in text, the data in fields, JSON for machines."""

from __future__ import annotations

import io
import json

from twisted.logger import capturedLogs, formatEvent, jsonFileLogObserver
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.logging import logsafe
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
