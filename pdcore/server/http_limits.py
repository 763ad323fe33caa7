"""Limits at the HTTP edge of `pdcore serve`: body size, body and header timeouts.

- `BodyLimitMiddleware` reads a request's body before any route does: a body longer than
  `--max-request-body-bytes` (by its Content-Length, or as it streams in) gets 413, one that
  is not complete within `--http-body-timeout` gets 408, both with an OpenAI-style error
  body, and the route then reads the body from memory as usual.
- `guarded_h11` is uvicorn's h11 protocol with a header deadline: a connection must deliver
  a request's complete headers within `--http-header-timeout` of opening (or of its last
  response), however slowly it trickles bytes in, or it is closed -- the slow-loris defence
  uvicorn lacks (its keep-alive timer restarts on every byte received).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pdcore.web.errors import error_body

logger = logging.getLogger("pdcore.server")


class BodyLimitMiddleware:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                body = error_body(
                    f"The request body did not arrive within {self.timeout_s:g} s.",
                    code="request_timeout",
                )
                response = JSONResponse(body, status_code=408, headers={"Connection": "close"})
                return await response(scope, receive, send)
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        buffered: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]

        async def replay() -> Message:
            # The body once, from memory; then the client's own stream (a disconnect).
            return buffered.pop() if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(
            f"The request body is larger than {self.max_bytes} bytes (--max-request-body-bytes).",
            code="request_too_large",
        )
        response = JSONResponse(body, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def guarded_h11(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline (see the module docstring)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:  # waiting for the next request's headers
                self._arm_header_timer()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE and self._header_timer is not None:
                self._header_timer.cancel()  # the headers are in
                self._header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._on_header_timeout)

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                logger.info(
                    "closing the connection of %s: no complete request headers within %g s",
                    client,
                    header_timeout,
                )
                self.transport.close()

    return GuardedH11Protocol
