"""One leg of a PD request: the router's HTTP call to one worker (prefill or decode).

Every way a leg can fail -- no connection, a non-2xx answer, silence past the timeout, a
connection that drops mid-response, an error event inside a stream -- becomes one
`LegError` that names the leg, the worker and the reason, and knows the response the client
should get: a worker's 4xx is passed through (bad input stays the client's error), anything
else is a 502. Closing a leg closes its connection, which is how the worker learns that the
request was cancelled and frees it.

The legs share one `http1.Client` (keep-alive, no connection limit), the router's hot path;
httpx serves the control plane (health checks, admin fan-out, policies' polling).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response

from pdcore.router import http1
from pdcore.router.metrics import RouterMetrics
from pdcore.router.policies import Worker
from pdcore.router.resilience import is_worker_fault
from pdcore.web.errors import error_body

_MAX_ERROR_BODY = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
_EVENT_END = re.compile(rb"\r?\n\r?\n")
# Below uvicorn's default keep-alive (5 s), so the router drops an idle connection before
# the worker does and never sends a request on one the worker is closing.
KEEPALIVE_S = 4.0


def make_client(request_timeout_s: float) -> http1.Client:
    """The client every leg shares. `request_timeout_s` (--request-timeout-secs) bounds the
    silence between two reads, from sending the request to the body's last byte;
    connecting gets at most CONNECT_TIMEOUT_S of it. Proxies are never used."""
    connect = min(request_timeout_s, CONNECT_TIMEOUT_S)
    return http1.Client(connect, request_timeout_s, KEEPALIVE_S)


class LegError(Exception):
    """A leg failed; `reason` is one of connect, timeout, status, closed, error_event."""

    def __init__(
        self,
        worker: Worker,
        reason: str,
        detail: str,
        *,
        status: int | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> None:
        self.worker = worker
        self.reason = reason
        self.status = status
        self.body = body
        self.content_type = content_type
        super().__init__(f"the {worker.role} leg ({worker.url}) failed: {detail}")

    @property
    def worker_fault(self) -> bool:
        """The worker failed (not the client's input): retry, and count it on the breaker."""
        return is_worker_fault(self.reason, self.status)

    @property
    def passthrough(self) -> bool:
        return self.status is not None and 400 <= self.status < 500

    def body_json(self) -> dict[str, Any]:
        """The OpenAI-style body of the 502 the client gets (also used in a stream)."""
        return error_body(str(self), type="server_error", code=f"{self.worker.role}_failed")

    def response(self) -> Response:
        if self.passthrough:
            assert self.status is not None
            return Response(self.body, status_code=self.status, media_type=self.content_type)
        return JSONResponse(self.body_json(), status_code=502)


def _status_detail(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:300].decode(errors="replace").strip()
    return f"HTTP {status}" + (f": {message}" if message else "")


class SSEBuffer:
    """Cuts a byte stream into whole SSE events, so that what the router forwards (or
    appends an error event to) always ends on an event boundary."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        events = []
        while (m := _EVENT_END.search(self._buf)) is not None:
            events.append(self._buf[: m.end()])
            self._buf = self._buf[m.end() :]
        return events

    def rest(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


def error_event_message(event: bytes) -> str | None:
    """The message of an `data: {"error": ...}` event, else None."""
    if b'"error"' not in event:
        return None
    for line in event.splitlines():
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except ValueError:
                return None
            if isinstance(data, dict) and "error" in data:
                err = data["error"]
                return str(err.get("message", err) if isinstance(err, dict) else err)
    return None


class Leg:
    """The POST of one request body to one worker. `open()` waits for the response head;
    then `read()`, `events()` or `drain()` consume the body; `close()` always ends it."""

    def __init__(
        self,
        client: http1.Client,
        worker: Worker,
        path: str,
        payload: bytes,
        headers: dict[str, str],
        metrics: RouterMetrics,
        timeout_s: float,
    ) -> None:
        self.client = client
        self.worker = worker
        self.path = path
        self.payload = payload
        self.headers = headers
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.response: http1.Response | None = None
        self.failure: str | None = None
        self._started = False
        self._closed = False
        # Counted from the moment the router picks the worker, not when the request is
        # sent: requests arriving together must see each other's choices, or a policy
        # reading `in_flight` sends a whole burst to one worker.
        worker.in_flight += 1

    def _fail(self, reason: str, detail: str, **kwargs: Any) -> LegError:
        self.failure = reason
        return LegError(self.worker, reason, detail, **kwargs)

    def _translate(self, exc: http1.HTTPError) -> LegError:
        if isinstance(exc, http1.ConnectFailed) and exc.timed_out:
            limit = min(self.timeout_s, CONNECT_TIMEOUT_S)
            return self._fail("connect", f"cannot connect within {limit:g}s")
        if isinstance(exc, http1.ConnectFailed):
            return self._fail("connect", f"cannot connect: {exc}")
        if isinstance(exc, http1.ReadTimeout):
            return self._fail(
                "timeout", f"no progress for {self.timeout_s:g}s (--request-timeout-secs)"
            )
        detail = str(exc) or type(exc).__name__
        return self._fail(
            "closed", f"the connection failed before the response was complete: {detail}"
        )

    async def open(self) -> http1.Response:
        """Send the request and wait for the head; a non-2xx answer raises LegError."""
        self._started = True
        self.metrics.leg_started(self.worker.url, self.worker.role)
        try:
            self.response = response = await self.client.post(
                self.worker.url, self.path, self.payload, self.headers
            )
            status = response.status
            if 200 <= status < 300:
                return response
            body = b""
            async for chunk in response.chunks():
                body += chunk
                if len(body) > _MAX_ERROR_BODY:
                    break
        except http1.HTTPError as exc:
            raise self._translate(exc) from exc
        raise self._fail(
            "status",
            _status_detail(status, body),
            status=status,
            body=body,
            content_type=response.headers.get("content-type"),
        )

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status

    @property
    def content_type(self) -> str | None:
        return self.response.headers.get("content-type") if self.response else None

    @property
    def is_sse(self) -> bool:
        return (self.content_type or "").startswith("text/event-stream")

    async def read(self) -> bytes:
        assert self.response is not None
        try:
            return await self.response.read()
        except http1.HTTPError as exc:
            raise self._translate(exc) from exc

    async def events(self) -> AsyncIterator[bytes]:
        """The body as whole SSE events (a last partial one is yielded as it is)."""
        assert self.response is not None
        buf = SSEBuffer()
        try:
            async for chunk in self.response.chunks():
                for event in buf.feed(chunk):
                    yield event
        except http1.HTTPError as exc:
            raise self._translate(exc) from exc
        rest = buf.rest()
        if rest:
            yield rest

    async def drain(self) -> None:
        """Read the body to its end and drop it; an error event in a stream is a failure."""
        if not self.is_sse:
            await self.read()
            return
        async for event in self.events():
            message = error_event_message(event)
            if message is not None:
                raise self._fail("error_event", f"its stream reported an error: {message}")

    async def run_to_end(self) -> None:
        """open + drain + close: the whole prefill leg, whose answer the router drops."""
        try:
            await self.open()
            await self.drain()
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection (a worker sees a disconnect and aborts) and count the leg.
        A response read to its end has already gone back to the pool for reuse."""
        if self._closed:
            return
        self._closed = True
        self.worker.in_flight -= 1
        if self._started:
            self.metrics.leg_ended(self.worker.url, self.worker.role, self.failure)
        if self.response is not None:
            self.response.close()
