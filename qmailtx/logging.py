"""Log vocabulary and observers.

Events are emitted with ``twisted.logger``; their format strings read like
qmail-send's log (``new msg N``, ``delivery D: success: ...``) and their
fields carry the data (``msgid``, ``delivery``, ``rcpt``, ``sender``,
``peer``, ``session``, ``outcome``, ``text``). For machines, run twistd with
``--logger qmailtx.logging.jsonObserverFactory``: one JSON object per line.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


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
