"""The Starlette app of `pdcore router`: the PD routes, admin routes over all workers,
worker registration, health, metrics, and OpenAI-style error bodies.

Generation goes through `pd.route_pd`; the admin routes fan out to every registered worker
at once and say, per worker, what each answered, so one dead worker is named rather than
hidden.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import pdcore
from pdcore.router import workers_api
from pdcore.router.edge import OPEN_PATHS, ApiKey, ApiKeyMiddleware, ASGIHandler, EdgeMiddleware
from pdcore.router.metrics import CONTENT_TYPE
from pdcore.router.pd import RouterState, route_pd, worker_headers
from pdcore.router.policies import Worker
from pdcore.web.errors import error_body, error_handlers

ADMIN_TIMEOUT_S = 10.0
HEALTH_GENERATE_TIMEOUT_S = 70.0  # a worker's own /health_generate waits up to 60 s


def _state(request: Request) -> RouterState:
    return request.app.state.router


def _headers(request: Request) -> dict[str, str]:
    return worker_headers(_state(request), request)


async def _call(
    state: RouterState,
    worker: Worker,
    method: str,
    path: str,
    headers: dict[str, str],
    timeout: float = ADMIN_TIMEOUT_S,
) -> dict[str, Any]:
    """One admin call: {"url", "role", "status", "body"} or {"url", "role", "error"}."""
    out: dict[str, Any] = {"url": worker.url, "role": worker.role}
    try:
        r = await state.client.request(method, worker.url + path, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return out
    out["status"] = r.status_code
    try:
        out["body"] = r.json()
    except ValueError:
        out["body"] = r.text
    return out


async def _fan_out(
    request: Request, method: str, path: str, timeout: float = ADMIN_TIMEOUT_S
) -> list[dict[str, Any]]:
    state = _state(request)
    workers = _all(state)
    headers = _headers(request)
    calls = (_call(state, w, method, path, headers, timeout) for w in workers)
    return list(await asyncio.gather(*calls))


def _all(state: RouterState) -> list[Worker]:
    """Every registered worker, prefills first (the order the admin answers list them)."""
    return [*state.prefills, *state.decodes]


def _ok(result: dict[str, Any]) -> bool:
    return 200 <= result.get("status", 0) < 300


def _describe(result: dict[str, Any]) -> str:
    what = result.get("error")
    if what is None:
        body = result.get("body")
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
        what = f"HTTP {result['status']}" + (f": {msg}" if msg else "")
    return f"{result['role']} {result['url']}: {what}"


def _by_role(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {
        "prefill": [r for r in results if r["role"] == "prefill"],
        "decode": [r for r in results if r["role"] == "decode"],
    }


async def health(request: Request) -> Response:
    """200 while at least one prefill and one decode are available (healthy, breaker not
    open), else 503 naming the missing role -- the router could not serve a request."""
    state = _state(request)
    missing = [role for role in ("prefill", "decode") if not state.pool.available(role)]
    if not missing:
        return Response(status_code=200)
    message = " and ".join(f"no {role} server is available" for role in missing)
    message += "; GET /workers shows each worker's health and circuit breaker"
    return JSONResponse(error_body(message, type="service_unavailable"), status_code=503)


async def liveness(request: Request) -> Response:
    """200 while the router process runs, whatever its workers do."""
    return Response(status_code=200)


async def readiness(request: Request) -> Response:
    """Like /health, with the per-role counts in the body."""
    state = _state(request)
    counts = {
        role: {
            "registered": len(state.pool.workers(role)),
            "available": len(state.pool.available(role)),
        }
        for role in ("prefill", "decode")
    }
    ready = all(c["available"] for c in counts.values())
    body = {"status": "ready" if ready else "not ready", **counts}
    return JSONResponse(body, status_code=200 if ready else 503)


async def health_generate(request: Request) -> Response:
    """Every worker's /health_generate; 200 only when all of them pass."""
    results = await _fan_out(request, "GET", "/health_generate", HEALTH_GENERATE_TIMEOUT_S)
    bad = [r for r in results if not _ok(r)]
    if bad:
        message = "health_generate failed on " + "; ".join(_describe(r) for r in bad)
        return JSONResponse(error_body(message, type="service_unavailable_error"), 503)
    return Response(status_code=200)


async def _first_decode(request: Request, path: str) -> Response:
    """`path` from the first available decode server (any registered one if none is)."""
    state = _state(request)
    decodes = state.pool.available("decode") or state.decodes
    if not decodes:
        message = "no decode server is registered"
        return JSONResponse(error_body(message, type="service_unavailable"), 503)
    result = await _call(state, decodes[0], "GET", path, _headers(request))
    if "error" in result:
        message = f"the decode server {decodes[0].url} did not answer {path}: "
        return JSONResponse(error_body(message + result["error"], type="server_error"), 502)
    return JSONResponse(result["body"], status_code=result["status"])


async def models(request: Request) -> Response:
    return await _first_decode(request, "/v1/models")


async def model_info(request: Request) -> Response:
    return await _first_decode(request, "/get_model_info")


async def server_info(request: Request) -> Response:
    """The router's own settings and each worker's /server_info."""
    state = _state(request)
    workers = _all(state)
    results = await _fan_out(request, "GET", "/server_info")
    for r, w in zip(results, workers, strict=True):
        if w.role == "prefill":
            r["bootstrap_port"] = w.bootstrap_port
        r["server_info"] = r.pop("body", None)
    router = state.settings.model_dump(mode="json")
    if router.get("api_key"):
        router["api_key"] = "<redacted>"
    router["prefill"] = [{"url": w.url, "bootstrap_port": w.bootstrap_port} for w in state.prefills]
    router["decode"] = [w.url for w in state.decodes]
    router.update({"version": pdcore.__version__, "mode": "pd"})
    return JSONResponse({"router": router, **_by_role(results)})


async def get_load(request: Request) -> Response:
    """Each worker's /get_load, with the router's own count of its requests in flight."""
    state = _state(request)
    workers = _all(state)
    results = await _fan_out(request, "GET", "/get_load")
    for r, w in zip(results, workers, strict=True):
        r["load"] = r.pop("body", None)
        r["router_in_flight"] = w.in_flight
    return JSONResponse(_by_role(results))


async def flush_cache(request: Request) -> Response:
    """POST /flush_cache to every worker; 200 only when all flushed."""
    results = await _fan_out(request, "POST", "/flush_cache")
    bad = [r for r in results if not _ok(r)]
    if not bad:
        return Response("Cache flushed on all workers.\n", media_type="text/plain")
    status = 400 if all(400 <= r.get("status", 0) < 500 for r in bad) else 502
    message = "Cache not flushed on " + "; ".join(_describe(r) for r in bad)
    return JSONResponse(error_body(message, type="server_error"), status_code=status)


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.sync_workers(state.pool, state.admission.active, state.admission.queued)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


PD_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
ROUTES = [
    *(Route(path, route_pd, methods=["POST"]) for path in PD_PATHS),
    Route("/health", health, methods=["GET"]),
    Route("/health_generate", health_generate, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/get_model_info", model_info, methods=["GET"]),
    Route("/model_info", model_info, methods=["GET"]),
    Route("/get_server_info", server_info, methods=["GET"]),
    Route("/server_info", server_info, methods=["GET"]),
    Route("/get_load", get_load, methods=["GET"]),
    Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
    Route("/metrics", metrics, methods=["GET"]),
]
ROUTES += [
    Route("/liveness", liveness, methods=["GET"]),
    Route("/readiness", readiness, methods=["GET"]),
    *workers_api.ROUTES,
]
_ROUTE_PATHS = {route.path for route in ROUTES}


def _pd_handler(app: Starlette) -> ASGIHandler:
    """`route_pd` as a plain ASGI handler, for EdgeMiddleware's fast path."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = app  # what request.app.state.router reads
        response = await route_pd(Request(scope, receive))
        await response(scope, receive, send)

    return handle


def build_app(state: RouterState) -> EdgeMiddleware:
    """The router app; `state` is reachable from routes as request.app.state.router.

    Order: EdgeMiddleware (request id, metrics, and the PD routes' fast path when there is
    no CORS), then the Starlette app: its error middleware, CORS, the API key, the routes.
    """
    s = state.settings
    api_key = ApiKey(s.api_key, OPEN_PATHS)
    middleware = []
    if s.cors_allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=s.cors_allowed_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["x-request-id"],
            )
        )
    middleware.append(Middleware(ApiKeyMiddleware, api_key=s.api_key, open_paths=OPEN_PATHS))
    internal_prefix = "Router error"
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        exception_handlers=error_handlers(internal_prefix),
    )
    fast_routes: dict[str, ASGIHandler] = {}
    if not s.cors_allowed_origins:
        handler = _pd_handler(app)
        fast_routes = dict.fromkeys(PD_PATHS, handler)
    app.state.router = state
    return EdgeMiddleware(
        app,
        metrics=state.metrics,
        paths=_ROUTE_PATHS,
        header_names=s.request_id_headers,
        api_key=api_key,
        fast_routes=fast_routes,
        internal_prefix=internal_prefix,
    )


def build_metrics_app(state: RouterState) -> Starlette:
    """/metrics alone, for --prometheus-port (a scraper that must not reach the API)."""
    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    app.state.router = state
    return app
