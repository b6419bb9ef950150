"""qmailtx-queue: qmailtx's qmail-queue, for QMAILQUEUE filters and local programs.

Usage: ``qmailtx-queue [--queue DIR]``, with the message on fd 0 (read to
end of file) and the envelope on fd 1 (``F<sender>\\0T<rcpt>\\0...\\0``), as
qmail-queue takes them. The queue folder is ``DIR`` or ``$QMAILTX_QUEUE``
(``<data>/queue``; the server sets it for its filter). The message is
written into the queue, fsync'd and linked into ``mess/`` before the
command exits 0; then the running server is woken through
``<data>/trigger`` (no server running: it finds the message when it
starts).

Exit codes are qmail-queue's: 0 queued; 11 address too long; 51 out of
memory (or an envelope too large); 53 write error or disk full; 54 unable
to read the message or envelope; 55 no queue folder given or bad arguments;
61 the queue folder is missing; 81 internal bug; 91 envelope format error.
An envelope without recipients is accepted and nothing is queued (0).

From the server, for a filter: ``$QMAILTX_QUEUE_MSGID`` is the id to use
(if free), ``$QMAILTX_QUEUE_INFO`` the JSON of the queue file's information
records (client address, session).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import traceback
from collections.abc import Mapping, Sequence

from qmailtx.queue.disk import QueueDisk, isDiskFull, isMessageId
from qmailtx.queue.qq import (
    QQ_CONFIGURATION,
    QQ_HOME,
    QQ_INTERNAL_BUG,
    QQ_OK,
    QQ_OUT_OF_MEMORY,
    QQ_READ_ERROR,
    QQ_WRITE_ERROR,
    EnvelopeError,
    EnvelopeParser,
)
from qmailtx.queue.trigger import pull

CHUNK = 65536
USAGE = "usage: qmailtx-queue [--queue DIR], the message on fd 0, the envelope on fd 1"


class _Exit(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _queueFolder(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    folder = environ.get("QMAILTX_QUEUE", "")
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--queue" and args:
            folder = args.pop(0)
        elif arg.startswith("--queue="):
            folder = arg[len("--queue=") :]
        else:
            raise _Exit(QQ_CONFIGURATION, f"unexpected argument {arg!r}; {USAGE}")
    if not folder:
        raise _Exit(QQ_CONFIGURATION, f"no queue folder: set QMAILTX_QUEUE or --queue; {USAGE}")
    return folder


def _readMessage(disk: QueueDisk) -> tuple[int, int, int]:
    """The message as (fd, offset, length). A regular file on fd 0 is used
    in place from its current offset; anything else is copied to a scratch
    file first (read to end of file before the envelope, as qmail-queue
    does: a writer may send the envelope only after the message)."""
    st = os.fstat(0)
    if stat.S_ISREG(st.st_mode):
        offset = os.lseek(0, 0, os.SEEK_CUR)
        return 0, offset, max(st.st_size - offset, 0)
    try:
        scratch = disk.scratchFile()
    except OSError as e:
        raise _Exit(QQ_WRITE_ERROR, f"cannot create a file in {disk.tmpDir}: {e}") from e
    length = 0
    while True:
        try:
            data = os.read(0, CHUNK)
        except InterruptedError:
            continue
        except OSError as e:
            raise _Exit(QQ_READ_ERROR, f"cannot read the message: {e}") from e
        if not data:
            return scratch, 0, length
        try:
            disk.fs.write(scratch, data)
        except OSError as e:
            raise _Exit(QQ_WRITE_ERROR, f"cannot write the message: {e}") from e
        length += len(data)


def _readEnvelope() -> EnvelopeParser:
    parser = EnvelopeParser()
    while True:
        try:
            data = os.read(1, CHUNK)
        except InterruptedError:
            continue
        except OSError as e:
            raise _Exit(QQ_READ_ERROR, f"cannot read the envelope: {e}") from e
        if not data:
            parser.finish()
            return parser
        if parser.feed(data):
            return parser


def _info(environ: Mapping[str, str]) -> dict[str, str]:
    """The information records the server passed, if any and well formed."""
    try:
        value = json.loads(environ.get("QMAILTX_QUEUE_INFO", "") or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {
        k: v
        for k, v in value.items()
        if isinstance(k, str) and len(k) == 1 and k.islower() and isinstance(v, str)
    }


def queueMessage(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """Do the work; the queued message's id (None: no recipients). Raises _Exit."""
    for fd, what in ((0, "message"), (1, "envelope")):
        try:
            os.fstat(fd)
        except OSError as e:
            raise _Exit(QQ_READ_ERROR, f"no {what} on fd {fd}: {e}") from e
    disk = QueueDisk(_queueFolder(argv, environ))
    if not (os.path.isdir(disk.messDir) and os.path.isdir(disk.tmpDir)):
        raise _Exit(QQ_HOME, f"{disk.root} is not a qmailtx queue")
    source, offset, length = _readMessage(disk)
    try:
        envelope = _readEnvelope()
    except EnvelopeError as e:
        raise _Exit(e.exitCode, str(e)) from e
    assert envelope.sender is not None
    if not envelope.recipients:
        return None
    msgid = environ.get("QMAILTX_QUEUE_MSGID", "")
    try:
        message = disk.injectFrom(
            time.time(),
            envelope.sender,
            envelope.recipients,
            _info(environ),
            source,
            offset,
            length,
            msgid if isMessageId(msgid) else None,
        )
    except MemoryError as e:
        raise _Exit(QQ_OUT_OF_MEMORY, "out of memory") from e
    except OSError as e:
        why = "disk full" if isDiskFull(e) else "write error"
        raise _Exit(QQ_WRITE_ERROR, f"{why}: {e}") from e
    pull(disk.root, message.msgid)
    return message.msgid


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    try:
        queueMessage(sys.argv[1:] if argv is None else argv, environ or os.environ)
    except _Exit as e:
        _say(str(e))
        return e.code
    except EnvelopeError as e:
        _say(str(e))
        return e.exitCode
    except MemoryError:
        return QQ_OUT_OF_MEMORY
    except Exception:
        _say("internal error:\n" + traceback.format_exc())
        return QQ_INTERNAL_BUG
    return QQ_OK


def _say(text: str) -> None:
    try:
        os.write(2, f"qmailtx-queue: {text}\n".encode("utf-8", "replace"))
    except OSError:
        pass  # no stderr: the exit code says it all


if __name__ == "__main__":
    sys.exit(main())
