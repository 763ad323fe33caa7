"""What every request meets before a route: its request id, the API key check, and the
request metrics. Plain ASGI middleware, so a streamed response is timed to its last byte
and carries the request id like any other.

`EdgeMiddleware` does the request id and the metrics in one pass (one wrapper around
`send`, not two), and sends the PD routes -- the router's hot path, two legs per request --
straight to their handler, past Starlette's exception middlewares and route table: on a
2-core machine that layering cost ~15% of the router's CPU per request. Everything a
client sees is the same on both paths: the request id, the API key check, the metrics,
OpenAI-style error bodies.
"""

from __future__ import annotations

import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdcore.router.metrics import RouterMetrics
from pdcore.web.errors import ProtocolError, error_body

logger = logging.getLogger("pdcore.router")

# Probes that load balancers and orchestrators call without credentials.
OPEN_PATHS = frozenset({"/health", "/liveness", "/readiness"})

ASGIHandler = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestIds:
    """Take the client's request id from the first of `header_names` it sent (or make one),
    keep it in scope["state"]["request_id"] for the routes (which pass it to the workers);
    the response returns it as X-Request-ID."""

    def __init__(self, header_names: Sequence[str]) -> None:
        self.header_names = [h.lower().encode("latin-1") for h in header_names]
        self._wanted = frozenset(self.header_names)

    def take(self, scope: Scope) -> bytes:
        # One pass over the raw headers (ASGI names are lower-case): this runs per request.
        given: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in self._wanted and value and name not in given:
                given[name] = value
        raw = next((given[h] for h in self.header_names if h in given), None)
        if raw is None:
            raw = f"{random.getrandbits(128):032x}".encode()  # an id, not a secret
        scope.setdefault("state", {})["request_id"] = raw.decode("latin-1")
        return raw


class ApiKey:
    """With --api-key, every route but the open probes needs `Authorization: Bearer KEY`
    (compared in constant time); otherwise 401 with an OpenAI-style body."""

    def __init__(self, api_key: str | None, open_paths: Collection[str]) -> None:
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.open_paths = open_paths

    def allows(self, scope: Scope) -> bool:
        if self.expected is None or scope["path"] in self.open_paths:
            return True
        given = Headers(scope=scope).get("authorization", "").encode()
        return hmac.compare_digest(given, self.expected)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(
            "Invalid or missing API key: send `Authorization: Bearer <key>` with the "
            "router's --api-key",
            code="invalid_api_key",
        )
        response = JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)


class ApiKeyMiddleware:
    """`ApiKey` in front of the Starlette routes (after CORS, so preflights pass)."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: Collection[str]) -> None:
        self.app = app
        self.key = ApiKey(api_key, open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key.allows(scope):
            return await self.app(scope, receive, send)
        await self.key.refuse(scope, receive, send)


class EdgeMiddleware:
    """The request id and the metrics of every request, and the fast path of `fast_routes`.

    Metrics count every request by route (unknown paths share one label) and status, and
    observe its latency up to the end of the response (a stream's last event). A POST to
    one of `fast_routes` goes to its ASGI handler directly, after the API key check, with
    ProtocolError and unexpected exceptions answered as Starlette's handlers would; every
    other request goes through `app` (CORS, the API key middleware, Starlette). With CORS
    configured there is no fast path: CORS must see every request.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: RouterMetrics,
        paths: Collection[str],
        header_names: Sequence[str],
        api_key: ApiKey,
        fast_routes: Mapping[str, ASGIHandler],
        internal_prefix: str,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths
        self.ids = RequestIds(header_names)
        self.key = api_key
        self.fast_routes = fast_routes
        self.internal_prefix = internal_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        raw_id = self.ids.take(scope)
        status = 0  # 0 until the response starts

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_id)]
            await send(message)

        path = scope["path"]
        route = path if path in self.paths else "other"
        if route == "other" and path.startswith("/workers/"):
            route = "/workers/{id}"
        handler = self.fast_routes.get(path) if scope["method"] == "POST" else None
        try:
            if handler is None:
                await self.app(scope, receive, send_wrapper)
            elif not self.key.allows(scope):
                await self.key.refuse(scope, receive, send_wrapper)
            else:
                try:
                    await handler(scope, receive, send_wrapper)
                except Exception as exc:
                    if status:  # the client has the head already: uvicorn ends the response
                        raise
                    await self._error(exc)(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(route, status or 500, time.monotonic() - t0)

    def _error(self, exc: Exception) -> JSONResponse:
        """The answer Starlette's exception handlers (web.errors) give on the slow path."""
        if isinstance(exc, ProtocolError):
            return JSONResponse(exc.body(), status_code=exc.status)
        logger.error("request failed", exc_info=exc)
        message = f"{self.internal_prefix}: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, type="server_error"), status_code=500)
