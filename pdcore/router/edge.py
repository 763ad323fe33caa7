"""What every request meets before a route: its request id, the API key check, and the
request metrics. Plain ASGI middleware, so a streamed response is timed to its last byte
and carries the request id like any other.
"""

from __future__ import annotations

import hmac
import random
import time
from collections.abc import Collection, Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdcore.router.metrics import RouterMetrics
from pdcore.web.errors import error_body

# Probes that load balancers and orchestrators call without credentials.
OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness"})


class RequestIdMiddleware:
    """Take the client's request id from the first of `header_names` it sent (or make one),
    keep it in scope["state"]["request_id"] for the routes (which pass it to the workers),
    and return it as X-Request-ID."""

    def __init__(self, app: ASGIApp, header_names: Sequence[str]) -> None:
        self.app = app
        self.header_names = [h.lower().encode("latin-1") for h in header_names]
        self._wanted = frozenset(self.header_names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # One pass over the raw headers (ASGI names are lower-case): this runs per request.
        given: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in self._wanted and value and name not in given:
                given[name] = value
        raw = next((given[h] for h in self.header_names if h in given), None)
        if raw is None:
            raw = f"{random.getrandbits(128):032x}".encode()  # an id, not a secret
        rid = raw.decode("latin-1")
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """With --api-key, every route but the open probes needs `Authorization: Bearer KEY`
    (compared in constant time); otherwise 401 with an OpenAI-style body."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: Collection[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("authorization", "").encode()
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = error_body(
            "Invalid or missing API key: send `Authorization: Bearer <key>` with the "
            "router's --api-key",
            code="invalid_api_key",
        )
        response = JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)


class MetricsMiddleware:
    """Counts every request by route (unknown paths share one label) and status, and
    observes its latency up to the end of the response (a stream's last event)."""

    def __init__(self, app: ASGIApp, metrics: RouterMetrics, paths: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        t0 = time.monotonic()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope["path"]
        route = path if path in self.paths else "other"
        if route == "other" and path.startswith("/workers/"):
            route = "/workers/{id}"
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(route, status[0], time.monotonic() - t0)
