"""Test kit for qmailtx and for programs that embed it.

- ``makeTestConfig(folder, toml="")``: a Config with data under ``folder``.
- ``RecordingFileSystem``: a FileSystem that logs every durable operation
  (and can be told to fail one), to prove write/fsync/link ordering.
- ``SMTPServerHarness``: an ESMTP server on a StringTransport with a
  MemoryReactorClock and a real on-disk queue run inline (no threads).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from qmailtx.config import Config, parseConfig
from qmailtx.domains import DomainTable
from qmailtx.fs import FileSystem
from qmailtx.policy.interfaces import IDataCheck, IRecipientCheck, ISenderCheck, ISMTPSession
from qmailtx.policy.relay import RelayControl
from qmailtx.queue.disk import QueueDisk
from qmailtx.queue.layout import QueuedMessage
from qmailtx.queue.store import QueueStore, synchronousRunner
from qmailtx.smtp.factory import SMTPServerFactory, SMTPSettings
from qmailtx.smtp.server import ESMTPServer


def makeTestConfig(folder: str, toml: str = "", me: str = "mx.test") -> Config:
    """Parse ``toml`` with data in ``folder/var``; ``[control] me`` defaults to ``me``."""
    if "me =" not in toml:
        if "[control]" in toml:
            toml = toml.replace("[control]", f'[control]\nme = "{me}"', 1)
        else:
            toml += f'\n[control]\nme = "{me}"\n'
    return parseConfig(toml, folder, source="test config")


class RecordingFileSystem(FileSystem):
    """Records ("op", detail) for every durable step into ``events``.

    ``failOn`` maps an operation name to an errno: the next call of that
    operation raises OSError(errno) (once, unless ``failAlways``).
    """

    def __init__(self, events: list[tuple[str, str]] | None = None, anonymous: bool = True) -> None:
        super().__init__(anonymous)
        self.events: list[tuple[str, str]] = events if events is not None else []
        self.failOn: dict[str, int] = {}
        self.failAlways = False
        self._fdPaths: dict[int, str] = {}

    def _maybeFail(self, op: str) -> None:
        code = self.failOn.get(op)
        if code is not None:
            if not self.failAlways:
                del self.failOn[op]
            raise OSError(code, os.strerror(code))

    def openExclusive(self, path: str) -> int:
        self._maybeFail("open")
        fd = super().openExclusive(path)
        self._fdPaths[fd] = path
        self.events.append(("open", path))
        return fd

    def openUpdate(self, path: str) -> int:
        fd = super().openUpdate(path)
        self._fdPaths[fd] = path
        return fd

    def openAnonymous(self, directory: str, fallbackName: str) -> tuple[int, str | None]:
        self._maybeFail("open")
        fd, name = super().openAnonymous(directory, fallbackName)
        if name is None:  # (a named file was recorded by openExclusive)
            self._fdPaths[fd] = os.path.join(directory, "(anonymous)")
            self.events.append(("open", self._fdPaths[fd]))
        return fd, name

    def linkInto(self, fd: int, name: str | None, target: str) -> None:
        self._maybeFail("link")
        super().linkInto(fd, name, target)
        self.events.append(("link", target))

    def write(self, fd: int, data: bytes | memoryview) -> None:
        self._maybeFail("write")
        super().write(fd, data)
        self.events.append(("write", self._fdPaths.get(fd, "?")))

    def copyRange(self, src: int, dst: int, offset: int, length: int) -> None:
        self._maybeFail("write")
        super().copyRange(src, dst, offset, length)
        self.events.append(("write", self._fdPaths.get(dst, "?")))

    def fsync(self, fd: int) -> None:
        self._maybeFail("fsync")
        super().fsync(fd)
        self.events.append(("fsync", self._fdPaths.get(fd, "?")))

    def fdatasync(self, fd: int) -> None:
        self._maybeFail("fsync")
        super().fdatasync(fd)
        self.events.append(("fsync", self._fdPaths.get(fd, "?")))

    def close(self, fd: int) -> None:
        super().close(fd)
        self._fdPaths.pop(fd, None)

    def link(self, src: str, dst: str) -> None:
        self._maybeFail("link")
        super().link(src, dst)
        self.events.append(("link", dst))

    def rename(self, src: str, dst: str) -> None:
        self._maybeFail("rename")
        super().rename(src, dst)
        self.events.append(("rename", dst))

    def unlink(self, path: str) -> None:
        super().unlink(path)
        self.events.append(("unlink", path))

    def fsyncDirectory(self, path: str) -> None:
        self._maybeFail("fsyncdir")
        super().fsyncDirectory(path)
        self.events.append(("fsyncdir", path))


class RecordingTransport(StringTransport):
    """A StringTransport that also logs ("reply", text) into a shared event list."""

    def __init__(self, events: list[tuple[str, str]], peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.events = events

    def write(self, data: bytes) -> None:
        super().write(data)
        self.events.append(("reply", data.decode("utf-8", "replace").strip()))


class SMTPServerHarness:
    """One server connection over a StringTransport, queueing into ``folder``."""

    def __init__(
        self,
        folder: str,
        peerHost: str = "192.0.2.1",
        settings: dict[str, Any] | None = None,
        domains: Sequence[str] = ("mx.test", "localhost"),
        recipientChecks: Sequence[IRecipientCheck] | None = None,
        senderChecks: Sequence[ISenderCheck] = (),
        fs: FileSystem | None = None,
        events: list[tuple[str, str]] | None = None,
        dataChecks: Sequence[tuple[str, Callable[[ISMTPSession], IDataCheck]]] = (),
    ) -> None:
        self.clock = MemoryReactorClock()
        self.events: list[tuple[str, str]] = events if events is not None else []
        self.disk = QueueDisk(os.path.join(folder, "queue"), fs)
        self.disk.create()
        self.store = QueueStore(self.disk, synchronousRunner)
        self.committed: list[QueuedMessage] = []
        self.store.addListener(self.committed.append)
        options: dict[str, Any] = {
            "me": "mx.test",
            "greeting": "mx.test",
            "envnoathost": "mx.test",
            "databytes": 10 * 1024 * 1024,
        }
        options.update(settings or {})
        self.settings = SMTPSettings(**options)
        if recipientChecks is None:
            table = DomainTable(frozenset(domains), frozenset(domains), {})
            recipientChecks = [RelayControl(table)]
        self.factory = SMTPServerFactory(
            self.clock, self.settings, self.store, senderChecks, recipientChecks, dataChecks
        )
        self.transport = RecordingTransport(self.events, IPv4Address("TCP", peerHost, 40000))
        self.protocol: ESMTPServer = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        return bytes(self.transport.value())

    def replies(self) -> list[str]:
        """Reply lines sent so far, CRLF removed."""
        return self.output().decode("utf-8", "replace").split("\r\n")[:-1]

    def codes(self) -> list[int]:
        """Final lines' codes, one per reply (continuation lines skipped)."""
        return [int(line[:3]) for line in self.replies() if len(line) > 3 and line[3] == " "]

    def clear(self) -> None:
        self.transport.clear()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def queuedFiles(self) -> list[str]:
        found: list[str] = []
        for root, _, files in os.walk(self.disk.messDir):
            found.extend(os.path.join(root, f) for f in files)
        return found

    def tmpFiles(self) -> list[str]:
        return os.listdir(self.disk.tmpDir)

    def messageBytes(self, message: QueuedMessage) -> bytes:
        return bytes(self.disk.readMessage(message, message.messageLength))
