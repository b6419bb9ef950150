"""``<data>/trigger``: how qmailtx-queue wakes the running server.

The FIFO sits next to ``<data>/lock``, beside the queue folder rather than
in it (qmail's ``lock/trigger``), so the queue holds message files only.

qmail-queue writes a byte to qmail-send's ``lock/trigger`` FIFO; so does
``qmailtx-queue``, except that the "byte" is the new message's id and a
newline (one write of less than PIPE_BUF bytes, so lines never mix), which
lets the server load just that file. Anything else read from the FIFO (a
plain qmail-style byte) means "look through the whole queue"; so does a read
that nearly fills the pipe, since a writer that found it full gave up (a
writer never blocks: O_NONBLOCK, and no reader or a full pipe is ignored,
as qmail ignores them; the start-up scan finds such messages at the latest).

The server side is ``qmailtx.queue.triggerservice``; this module stays free
of Twisted, so that ``qmailtx-queue`` starts quickly.
"""

from __future__ import annotations

import os

from qmailtx.queue.disk import isMessageId

TRIGGER = "trigger"
READ_SIZE = 65536
MAYBE_OVERFLOWED = 32768  # a read this large: some writer may have found the pipe full


def triggerPath(queueRoot: str) -> str:
    """The trigger FIFO of the queue in ``queueRoot`` (``<data>/queue``)."""
    return os.path.join(os.path.dirname(os.path.abspath(queueRoot)), TRIGGER)


def pull(queueRoot: str, msgid: str | None = None) -> bool:
    """Wake the server running on ``queueRoot`` (never blocks, never fails).

    Answers whether the wake-up was written; False when no server listens.
    """
    line = f"{msgid}\n".encode("ascii") if msgid else b"\n"
    try:
        fd = os.open(triggerPath(queueRoot), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # ENXIO: no reader; ENOENT: no server ever ran here
    try:
        return os.write(fd, line) == len(line)
    except OSError:
        return False  # EAGAIN: full; the server has wake-ups to read already
    finally:
        os.close(fd)


def parseTriggers(data: bytes) -> tuple[set[str], bool]:
    """What was read from the FIFO: (message ids, whether to look everywhere).

    Our writers' lines arrive whole (atomic writes); anything else, a
    qmail-style byte included, asks for a look everywhere.
    """
    *lines, rest = data.split(b"\n")
    ids: set[str] = set()
    everywhere = bool(rest)
    for raw in lines:
        text = raw.decode("ascii", "replace")
        if isMessageId(text):
            ids.add(text)
        else:
            everywhere = True
    return ids, everywhere
