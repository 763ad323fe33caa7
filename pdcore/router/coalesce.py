"""uvicorn's httptools protocol with its writes coalesced: one send() per event-loop turn.

uvicorn writes a response's head and its body with two `transport.write` calls, and each
is a send() system call on the spot. On loopback a send() runs the receiver's TCP stack
too, so for the router's small PD answers the head's write alone cost ~8% of its CPU at 64
concurrent requests. Here the writes of one turn of the event loop are joined and sent
once, at the end of the turn (`loop.call_soon`): the same bytes in the same order, one
system call, one segment for the client to read. A streamed response's events, written
turns apart, still leave at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes within one event-loop turn become one write; everything
    else goes to the real transport (after pending bytes, for `close`)."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol on a CoalescingTransport (pass as uvicorn's `http=`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(coalescing)  # type: ignore[arg-type]
