"""The Starlette app of `pdcore serve`: routes, API-key check, request metrics, error bodies.

Every error a client can see has OpenAI's shape {"error": {"message", "type", "param",
"code"}}, including 401, 404 and 500, so clients need one error parser. The generating
routes live in native_api.py and openai_api.py; the admin routes SGLang's router and
operators rely on (health, load, cache, info, metrics) are here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pdcore
from pdcore.engine.sampling_params import SamplingParams
from pdcore.model.generation_defaults import SAMPLING_KEYS
from pdcore.server import native_api, openai_api
from pdcore.server.engine_client import EngineDeadError
from pdcore.server.generation import Generation, ServerState, make_job, unavailable
from pdcore.server.http_limits import BodyLimitMiddleware
from pdcore.server.metrics import CONTENT_TYPE
from pdcore.web.errors import ProtocolError, error_body, error_handlers, parse_json, require_object

HEALTH_GENERATE_TIMEOUT = 60.0


def _state(request: Request) -> ServerState:
    return request.app.state.pd


async def _control(state: ServerState, op: str, timeout: float = 10.0) -> Any:
    """A control op in the engine, or 503 when the engine is gone or too slow to answer."""
    try:
        return await state.client.control(op, timeout)
    except EngineDeadError as exc:
        raise unavailable(f"The engine is not available: {exc}") from exc
    except TimeoutError as exc:
        raise unavailable(f"The engine did not answer {op!r} within {timeout:g}s") from exc


async def health(request: Request) -> Response:
    """200 only when the engine process answers a ping: a load balancer's liveness signal."""
    state = _state(request)
    await _control(state, "ping", state.health_timeout)
    return Response(status_code=200)


async def health_generate(request: Request) -> Response:
    """200 when a one-token generation completes: the model itself works."""
    state = _state(request)
    tok = state.tokenizer
    token = tok.bos_token_id if tok.bos_token_id is not None else 0
    sampling = {"max_new_tokens": 1, "temperature": 0.0}
    job = make_job(state, f"health-{uuid.uuid4().hex}", [token], sampling, param="input_ids")
    try:
        async with Generation(state, [job]) as gen:
            await asyncio.wait_for(gen.wait_all(), HEALTH_GENERATE_TIMEOUT)
    except TimeoutError as exc:
        raise unavailable("health generation timed out") from exc
    return Response(status_code=200)


async def server_info(request: Request) -> Response:
    state = _state(request)
    info: dict[str, Any] = state.settings.model_dump(exclude=SECRET_SETTINGS)
    info["disaggregation_auth"] = bool(state.settings.disaggregation_auth_token)
    info.update(await _control(state, "server_info"))
    info.update(
        {
            "model_path": info.get("model_path") or state.settings.model_path,
            "served_model_name": state.model_name,
            "tp_size": state.settings.tp_size,
            "nnodes": state.settings.nnodes,
            "dp_size": state.settings.dp_size,
            "ep_size": state.settings.ep_size,
            "attention_tp_size": state.settings.attention_tp_size,
            "disaggregation_mode": state.settings.disaggregation_mode,
            "context_length": state.max_context_len,
            "internal_states": await _control(state, "stats"),  # one per dp replica
            # What a request's unset sampling fields take (--sampling-defaults), in full.
            "default_sampling_params": effective_sampling_defaults(state),
            "default_sampling_params_source": state.sampling_defaults.source,
            "version": pdcore.__version__,
        }
    )
    return JSONResponse(info)


# Settings that are secrets: never in /server_info (nor in logs or error bodies).
SECRET_SETTINGS = {"api_key", "disaggregation_auth_token"}


def effective_sampling_defaults(state: ServerState) -> dict[str, Any]:
    """The sampling values a request that sets none of them gets."""
    params = SamplingParams.from_dict({}, state.sampling_defaults.params)
    return {key: getattr(params, key) for key in SAMPLING_KEYS}


async def model_info(request: Request) -> Response:
    state = _state(request)
    model_path = state.engine_info.get("model_path") or state.settings.model_path
    return JSONResponse(
        {
            "model_path": model_path,
            "tokenizer_path": state.settings.tokenizer_path or model_path,
            "served_model_name": state.model_name,
            "is_generation": True,
            "context_length": state.max_context_len,
            "preferred_sampling_params": None,
        }
    )


async def get_load(request: Request) -> Response:
    """SGLang's shape: one `{dp_rank, num_reqs, num_waiting_reqs, num_tokens}` per alive
    data-parallel replica."""
    return JSONResponse(await _control(_state(request), "get_load"))


async def kv_cache_blocks(request: Request) -> Response:
    """The pages the prefix cache holds, as chain hashes, for a KV-aware router.

    Each page of `page_size` tokens is named by blake2b-64 over its token ids (int64,
    little-endian) then its parent page's hash (8 bytes, little-endian; 0 for the first
    page), as 16 hex digits: a router that hashes a prompt's token ids the same way knows
    how many of its leading tokens this server would not have to compute again.
    """
    blocks = await _control(_state(request), "kv_cache_blocks")
    hashes = [f"{h:016x}" for h in blocks["hashes"]]
    return JSONResponse(
        {
            "page_size": blocks["page_size"],
            "hash": "blake2b64-chain",
            "num_blocks": len(hashes),
            "blocks": hashes,
        }
    )


async def flush_cache(request: Request) -> Response:
    if await _control(_state(request), "flush_cache"):
        return Response("Cache flushed.\n", status_code=200, media_type="text/plain")
    raise ProtocolError(
        "Cache not flushed: requests are running or waiting; retry when the server is idle.",
        code="requests_in_flight",
    )


async def abort_request(request: Request) -> Response:
    """Abort a request by rid (or every request with abort_all); its waiter ends with
    finish_reason "abort"."""
    state = _state(request)
    body = require_object(parse_json(await request.body()))
    rid, abort_all = body.get("rid"), body.get("abort_all", False)
    if not isinstance(abort_all, bool):
        raise ProtocolError("'abort_all' must be a boolean", param="abort_all")
    if abort_all:
        rids = state.client.live_rids()
    elif isinstance(rid, str) and rid:
        rids = [rid]
    else:
        raise ProtocolError("'rid' must be a non-empty string", param="rid")
    try:
        for r in rids:
            state.client.abort(r)
    except EngineDeadError as exc:
        raise unavailable(f"The engine is not available: {exc}") from exc
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    state = _state(request)
    try:
        stats = await state.client.control("metrics", 5.0)
    except Exception:  # a scrape must still answer; the gauges say the engine is down
        stats = None
    state.metrics.set_engine_stats(stats)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/health_generate", health_generate, methods=["GET"]),
    Route("/generate", native_api.generate, methods=["POST"]),
    Route("/v1/completions", openai_api.completions, methods=["POST"]),
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/v1/models", openai_api.models, methods=["GET"]),
    Route("/server_info", server_info, methods=["GET"]),
    Route("/get_server_info", server_info, methods=["GET"]),
    Route("/model_info", model_info, methods=["GET"]),
    Route("/get_model_info", model_info, methods=["GET"]),
    Route("/get_load", get_load, methods=["GET"]),
    Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
    Route("/kv_cache_blocks", kv_cache_blocks, methods=["GET"]),
    Route("/abort_request", abort_request, methods=["POST"]),
    Route("/metrics", metrics, methods=["GET"]),
]
_ROUTE_PATHS = {route.path for route in ROUTES}


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class AuthMiddleware:
    """With an API key set, every route but /health needs `Authorization: Bearer <key>`.
    Compared in constant time, as digests, so neither the key's bytes nor its length can be
    learned from response times."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = _digest(f"Bearer {api_key}".encode()) if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(_digest(given), self.expected):
            return await self.app(scope, receive, send)
        body = error_body(
            "Invalid or missing API key (send `Authorization: Bearer <key>`).",
            type="authentication_error",
            code="invalid_api_key",
        )
        await JSONResponse(body, status_code=401)(scope, receive, send)


class MetricsMiddleware:
    """Counts every HTTP request by route (unknown paths share one label) and status."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        route = scope["path"] if scope["path"] in _ROUTE_PATHS else "other"
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.metrics.observe_request(route, status[0])


def build_app(state: ServerState) -> Starlette:
    """The app for one server; `state` is reachable from routes as request.app.state.pd."""
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(MetricsMiddleware, state=state),
            Middleware(AuthMiddleware, api_key=state.settings.api_key),
            # After the key check: a stranger's body is never read.
            Middleware(
                BodyLimitMiddleware,
                max_bytes=state.settings.max_request_body_bytes,
                timeout_s=state.settings.http_body_timeout,
            ),
        ],
        exception_handlers=error_handlers("Internal server error"),
    )
    app.state.pd = state
    return app
