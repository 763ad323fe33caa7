"""Adding, removing and listing workers while the router runs.

`POST /workers` ({"url", "role", "bootstrap_port"?}), `DELETE /workers/{id}` (an id from
`GET /workers`, or the worker's URL), `GET /workers`, and SGLang's query-string forms
`POST /add_worker?url=&role=` and `POST /remove_worker?url=`, plus `GET /list_workers`.
A new worker is probed once at once and joins rotation when that probe passes (else the
health checker brings it in later). A removed worker leaves rotation at once; requests
already on it finish normally.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pdcore.router.health import probe
from pdcore.router.pd import RouterState, worker_headers
from pdcore.router.settings import _bootstrap_port, _check_url
from pdcore.router.workers import ROLES, Member, WorkerExists
from pdcore.web.errors import ProtocolError, error_body, parse_json, require_object

logger = logging.getLogger("pdcore.router")


def _state(request: Request) -> RouterState:
    return request.app.state.router


def _validated(url: Any, role: Any, port: Any) -> tuple[str, str, int | None]:
    if role not in ROLES:
        raise ProtocolError(f"role must be 'prefill' or 'decode', got {role!r}", param="role")
    try:
        clean = _check_url(url)
        bootstrap = _bootstrap_port(port, clean) if role == "prefill" else None
    except ValueError as exc:  # pydantic's custom error is a ValueError
        raise ProtocolError(str(exc), param="url") from None
    if role == "decode" and port not in (None, "", "none", "null"):
        raise ProtocolError("bootstrap_port is for prefill workers only", param="bootstrap_port")
    return clean, role, bootstrap


async def add_member(
    state: RouterState,
    url: str,
    role: str,
    bootstrap_port: int | None,
    headers: dict[str, str],
    worker_id: str | None = None,
) -> Member:
    """Register a worker in this process and probe it once (unless health checks are off);
    raises WorkerExists. `worker_id`: the supervisor's id for it (--router-processes)."""
    check = not state.settings.disable_health_check
    member = state.pool.add(url, role, bootstrap_port, healthy=not check, worker_id=worker_id)
    if check:
        s = state.settings
        error = await probe(
            state.client,
            member.worker,
            s.health_check_endpoint,
            s.health_check_timeout_secs,
            headers,
        )
        member.worker.healthy = error is None
        member.last_error = error
    logger.info(
        "added %s %s as %s (healthy: %s)",
        role,
        url,
        member.worker.worker_id,
        member.worker.healthy,
    )
    return member


def remove_member(state: RouterState, member: Member) -> dict[str, Any]:
    """Take a worker out of this process's pool (requests on it finish); its detail."""
    state.pool.remove(member)
    policy = state.policies.get(member.worker.role)
    forget = getattr(policy, "forget", None)
    if forget is not None:
        forget(member.worker)
    logger.info(
        "removed %s %s (%d requests in flight finish normally)",
        member.worker.role,
        member.worker.url,
        member.worker.in_flight,
    )
    return member.detail()


def _not_found(what: str) -> JSONResponse:
    return JSONResponse(
        error_body(f"no worker {what}; GET /workers lists them", code="worker_not_found"),
        status_code=404,
    )


def _exists(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, code="worker_exists"), status_code=409)


async def _register(request: Request, url: Any, role: Any, port: Any) -> Response:
    state = _state(request)
    clean, role, bootstrap = _validated(url, role, port)
    headers = worker_headers(state, request)
    if state.link is not None:  # every process applies it (and probes) before we answer
        answer = await state.link.change(
            {"op": "add", "url": clean, "role": role, "bootstrap_port": bootstrap},
            headers,
        )
        if answer["status"] == "exists":
            return _exists(answer["message"])
        return JSONResponse(answer["detail"], status_code=201)
    try:
        member = await add_member(state, clean, role, bootstrap, headers)
    except WorkerExists as exc:
        return _exists(str(exc))
    return JSONResponse(member.detail(), status_code=201)


async def _unregister(request: Request, member: Member | None, what: str) -> Response:
    state = _state(request)
    if member is None:
        return _not_found(what)
    if state.link is not None:  # every process removes it before we answer
        answer = await state.link.change({"op": "remove", "id": member.worker.worker_id})
        if answer["status"] == "not_found":
            return _not_found(what)
        return JSONResponse(answer["detail"])
    return JSONResponse(remove_member(state, member))


async def list_workers(request: Request) -> Response:
    """Every registered worker with its health, breaker, in-flight count and load."""
    state = _state(request)
    workers = [m.detail() for m in state.pool]
    stats = {
        role: {
            "registered": len(state.pool.workers(role)),
            "available": len(state.pool.available(role)),
        }
        for role in ROLES
    }
    return JSONResponse({"workers": workers, "total": len(workers), "stats": stats})


async def add_worker_json(request: Request) -> Response:
    body = require_object(parse_json(await request.body()))
    return await _register(request, body.get("url"), body.get("role"), body.get("bootstrap_port"))


async def remove_worker_by_id(request: Request) -> Response:
    key = request.path_params["worker_id"]
    state = _state(request)
    member = state.pool.get(key) or (state.pool.find(key) if "://" in key else None)
    return await _unregister(request, member, repr(key))


async def add_worker_query(request: Request) -> Response:
    """SGLang's `/add_worker?url=...&role=prefill|decode[&bootstrap_port=N]`
    (`worker_type` is accepted for `role`)."""
    q = request.query_params
    role = q.get("role") or q.get("worker_type")
    return await _register(request, q.get("url"), role, q.get("bootstrap_port"))


async def remove_worker_query(request: Request) -> Response:
    """SGLang's `/remove_worker?url=...` (a URL registered as both roles needs `role=`)."""
    url = request.query_params.get("url")
    if not url:
        raise ProtocolError("url is required: /remove_worker?url=http://HOST:PORT", param="url")
    role = request.query_params.get("role") or request.query_params.get("worker_type")
    return await _unregister(request, _state(request).pool.find(url, role), repr(url))


async def list_worker_urls(request: Request) -> Response:
    """SGLang's `/list_workers`: the URLs, by role."""
    state = _state(request)
    return JSONResponse({role: [w.url for w in state.pool.workers(role)] for role in ROLES})


ROUTES = [
    Route("/workers", list_workers, methods=["GET"]),
    Route("/workers", add_worker_json, methods=["POST"]),
    Route("/workers/{worker_id:path}", remove_worker_by_id, methods=["DELETE"]),
    Route("/add_worker", add_worker_query, methods=["POST"]),
    Route("/remove_worker", remove_worker_query, methods=["POST"]),
    Route("/list_workers", list_worker_urls, methods=["GET"]),
]
