"""The router's HTTP/1.1 server protocol: uvicorn's httptools protocol with its writes
coalesced, and a deadline on request headers.

Coalesced writes: uvicorn writes a response's head and its body with two `transport.write`
calls, and each is a send() system call on the spot. On loopback a send() runs the
receiver's TCP stack too, so for the router's small PD answers the head's write alone cost
~8% of its CPU at 64 concurrent requests. Here the writes of one turn of the event loop are
joined and sent once, at the end of the turn (`loop.call_soon`): the same bytes in the same
order, one system call, one segment for the client to read. A streamed response's events,
written turns apart, still leave at once.

Header deadline (slow-loris): a connection must deliver a request's complete headers within
`--http-header-timeout` of opening, or of its previous response, however slowly it trickles
bytes in, or it is closed. uvicorn's keep-alive timer restarts on every byte received, so it
cannot do this alone. (`pdcore serve` does the same on its h11 protocol.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("pdcore.router")


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


def router_http_protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to pass as uvicorn's `http=` (see the module docstring)."""

    class RouterHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.pipeline and not self.transport.is_closing():
                self._arm_header_timer()  # waiting for the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._on_header_timeout)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if busy or self.transport.is_closing():
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info(
                "closing the connection of %s: no complete request headers within %g s "
                "(--http-header-timeout)",
                client,
                header_timeout,
            )
            self.transport.close()

    return RouterHttpProtocol
