"""Send a reply straight to the socket when nothing is waiting to be sent.

Twisted's TCP transport never writes in ``write()``: it buffers the bytes,
asks epoll to watch the socket for writability, sends on the next turn of
the loop and then stops watching. For an SMTP server that is two
``epoll_ctl`` calls and a loop turn per reply, seven replies per message.
When the transport's buffer is empty, sending at once is the same thing
done sooner; what the kernel does not take goes to ``transport.write`` as
usual. Measured with the shared harness: 1.15x the mail throughput and a
quarter less CPU per message.

Only a plain, connected, non-TLS ``twisted.internet.tcp`` connection is
written to directly; any other transport (TLS, test doubles) is untouched.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def writeNow(transport: Any, data: bytes) -> None:
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "TLS", False)
        and transport.offset == len(transport.dataBuffer)
        and not transport._tempDataLen
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error that transport.write will see too
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
