"""Log vocabulary and observers.

Events are emitted with ``twisted.logger``; their format strings read like
qmail-send's log (``new msg N``, ``delivery D: success: ...``) and their
fields carry the data (``msgid``, ``delivery``, ``rcpt``, ``sender``,
``peer``, ``session``, ``outcome``, ``text``). For machines, run twistd with
``--logger qmailtx.logging.jsonObserverFactory``: one JSON object per line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO, cast

from twisted.logger import (
    ILogObserver,
    LogEvent,
    eventAsText,
    formatEvent,
    formatTime,
    jsonFileLogObserver,
)


def logsafe(text: str) -> str:
    """qmail's rule for report text in logs: newlines become "/", other
    bytes below 33 or above 126 (and "%") become "_"."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("/")
        elif ord(ch) < 33 or ord(ch) > 126 or ch == "%":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def jsonObserverFactory() -> ILogObserver:
    """For ``twistd --logger``: JSON lines on standard output."""
    return jsonFileLogObserver(sys.stdout)


class TextObserver:
    """twistd's classic text format, for a fraction of the cost.

    Same lines as twistd's default observer
    (``2026-11-25T14:57:17+0000 [namespace#info] new msg ...``), but the time
    prefix is formatted once per second, simple format strings are filled
    with ``str.format_map`` (anything else falls back to Twisted's
    formatter), and the stream is flushed once per reactor turn rather than
    once per line.
    """

    def __init__(self, out: TextIO, flushLater: Callable[[Callable[[], None]], object]) -> None:
        self._out = out
        self._flushLater = flushLater
        self._flushPending = False
        self._second = -1
        self._stamp = ""
        self._reactorThread = threading.get_ident()

    def __call__(self, event: LogEvent) -> None:
        when = event.get("log_time") or time.time()
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(when)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        text = _formatText(event)
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        self._out.write(f"{self._stamp} [{system}] {text}\n")
        if threading.get_ident() != self._reactorThread:
            self._out.flush()
        elif not self._flushPending:
            self._flushPending = True
            self._flushLater(self._flush)

    def _flush(self) -> None:
        self._flushPending = False
        self._out.flush()


def _formatText(event: LogEvent) -> str:
    fmt = event.get("log_format")
    failure = event.get("log_failure")
    if fmt is None or failure is not None or "log_flattened" in event:
        return eventAsText(event, includeTimestamp=False, includeSystem=False)
    try:
        return str(fmt.format_map(event))
    except Exception:
        return formatEvent(event)


def textObserverFactory() -> ILogObserver:
    """For ``twistd --logger``: qmailtx's fast text observer on standard output."""
    from twisted.internet import reactor

    def later(f: Callable[[], None]) -> object:
        return reactor.callLater(0, f)

    return cast(ILogObserver, TextObserver(sys.stdout, later))
