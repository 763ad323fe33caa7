"""Noticing that a client went away, and Server-Sent Events.

A client that disconnects must free its KV pages at once, not when its request would have
finished. So every wait on the engine is raced against the ASGI `http.disconnect` message:
the waiting coroutine is cancelled, and the caller's cleanup aborts the request. We do this
ourselves rather than rely on Starlette's StreamingResponse, whose disconnect detection
depends on the ASGI spec version the server announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the response was complete."""


def sse(data: Any) -> str:
    """One SSE event carrying `data` as compact JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (call only after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, but cancel it and raise ClientDisconnected if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watch.cancel()
        raise
    if work.done():
        watch.cancel()
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    raise ClientDisconnected()


class EventStreamResponse:
    """An ASGI text/event-stream response that stops (and runs `on_close`) on disconnect."""

    def __init__(
        self,
        events: AsyncIterator[str],
        on_close: Callable[[], None] | None = None,
        status_code: int = 200,
    ) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await until_disconnected(receive, self._pump(send))
        except (ClientDisconnected, OSError):
            pass
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self.on_close is not None:
                self.on_close()

    async def _pump(self, send: Send) -> None:
        async for event in self.events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
