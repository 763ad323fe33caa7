"""The PD request: one body, two legs (prefill and decode) sent at once, decode's answer back.

For POST /generate, /v1/completions and /v1/chat/completions the router

1. picks a (prefill, decode) pair with the routing policy;
2. adds `bootstrap_host` (the prefill URL's host), `bootstrap_port` (from `--prefill URL
   PORT`, or null) and `bootstrap_room` (a random 63-bit int) to the body -- lists of them,
   one per item, for a /generate batch -- exactly as SGLang's router does;
3. sends the same bytes to both workers at the same time;
4. answers with decode's response, as SSE when decode streams and as one body otherwise,
   while reading and dropping prefill's (which may stream too).

The first failure decides: if either leg fails before decode's response is complete, the
other leg is cancelled (its connection closed, so the worker aborts the request) and the
client gets the failing leg's error -- in the body, or as a last SSE event once a stream has
started. A client that goes away cancels both legs. Once decode's response is complete,
prefill is left to finish on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pdcore.router.legs import Leg, LegError
from pdcore.router.metrics import RouterMetrics
from pdcore.router.policies import RoutingPolicy, Worker
from pdcore.router.settings import RouterSettings
from pdcore.web.errors import parse_json, require_object
from pdcore.web.streaming import (
    SSE_DONE,
    ClientDisconnected,
    sse,
    until_disconnected,
)

logger = logging.getLogger("pdcore.router")

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed the request", for the log and the metrics
FORWARDED_HEADERS = ("authorization",)


@dataclass
class RouterState:
    """Everything the routes need; stored on app.state.router."""

    settings: RouterSettings
    prefills: list[Worker]
    decodes: list[Worker]
    policy: RoutingPolicy
    client: httpx.AsyncClient
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a task that outlives its request (a prefill leg finishing on its own)."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def bootstrap_room() -> int:
    return secrets.randbits(63)


def batch_size(body: dict[str, Any]) -> int | None:
    """Items in a /generate batch (list `text`, or list of `input_ids` lists), else None;
    the same rule as SGLang's router."""
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is not None:
        return len(text) if isinstance(text, list) else None
    if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list):
        return len(input_ids)
    return None


def with_bootstrap(body: dict[str, Any], prefill: Worker) -> dict[str, Any]:
    """`body` plus the fields that tell decode where to fetch the KV cache from."""
    host = urlsplit(prefill.url).hostname
    n = batch_size(body)
    if n is None:
        extra: dict[str, Any] = {
            "bootstrap_host": host,
            "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": bootstrap_room(),
        }
    else:
        extra = {
            "bootstrap_host": [host] * n,
            "bootstrap_port": [prefill.bootstrap_port] * n,
            "bootstrap_room": [bootstrap_room() for _ in range(n)],
        }
    return {**body, **extra}


def select_pair(state: RouterState, body: dict[str, Any]) -> tuple[Worker, Worker]:
    p, d = state.policy.select(state.prefills, state.decodes, body)
    if not (0 <= p < len(state.prefills) and 0 <= d < len(state.decodes)):
        raise RuntimeError(
            f"routing policy {state.settings.policy!r} chose ({p}, {d}) for "
            f"{len(state.prefills)} prefill and {len(state.decodes)} decode servers"
        )
    return state.prefills[p], state.decodes[d]


class PDCall:
    """The two legs of one request and the rule that the first failure cancels both."""

    def __init__(self, state: RouterState, prefill: Leg, decode: Leg) -> None:
        self.state = state
        self.prefill = prefill
        self.decode = decode
        self.prefill_task = asyncio.create_task(prefill.run_to_end())
        self._tasks: list[asyncio.Task[Any]] = [self.prefill_task]

    def _prefill_error(self) -> BaseException | None:
        t = self.prefill_task
        return t.exception() if t.done() and not t.cancelled() else None

    async def race(self, work: Awaitable[T]) -> T:
        """Await a step of the decode leg; raise prefill's LegError if prefill fails first."""
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        while not task.done():
            err = self._prefill_error()
            if err is not None:
                raise err
            waits: set[asyncio.Future[Any]] = {task}
            if not self.prefill_task.done():
                waits.add(self.prefill_task)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return task.result()

    async def finish(self) -> None:
        """Decode's response is complete: let prefill end on its own, in the background."""
        await self.decode.close()
        if not self.prefill_task.done():
            self.state.keep(self.prefill_task)
        self.prefill_task.add_done_callback(self._log_late_failure)

    def _log_late_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("after decode answered: %s", task.exception())

    async def cancel(self) -> None:
        """Cancel both legs and close their connections (the workers abort the request)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.prefill.close()
        await self.decode.close()


async def route_pd(request: Request) -> Response | PDStreamResponse:
    """POST /generate, /v1/completions, /v1/chat/completions."""
    state: RouterState = request.app.state.router
    body = require_object(parse_json(await request.body()))
    prefill, decode = select_pair(state, body)
    payload = json.dumps(with_bootstrap(body, prefill)).encode()
    headers = {"content-type": "application/json"}
    headers.update({h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers})
    path, timeout = request.url.path, state.settings.request_timeout_secs
    legs = [
        Leg(state.client, w, path, payload, headers, state.metrics, timeout)
        for w in (prefill, decode)
    ]
    call = PDCall(state, *legs)
    try:
        await until_disconnected(request.receive, call.race(call.decode.open()))
        if call.decode.is_sse:
            return PDStreamResponse(call)
        content = await until_disconnected(request.receive, call.race(call.decode.read()))
    except ClientDisconnected:
        await call.cancel()
        return Response(status_code=CLIENT_CLOSED)
    except LegError as exc:
        await call.cancel()
        logger.warning("%s", exc)
        return exc.response()
    except BaseException:
        await call.cancel()
        raise
    head = call.decode.response
    assert head is not None
    await call.finish()
    return Response(
        content, status_code=head.status_code, media_type=head.headers.get("content-type")
    )


class PDStreamResponse:
    """Decode's SSE stream, relayed event by event to the client.

    Ends early -- cancelling both legs -- when the client disconnects, or when either leg
    fails, in which case the client's last events are the error and `data: [DONE]`.
    """

    def __init__(self, call: PDCall) -> None:
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call, head = self.call, self.call.decode.response
        assert head is not None
        ctype = head.headers.get("content-type", "text/event-stream")
        headers = [(b"content-type", ctype.encode()), (b"cache-control", b"no-cache")]
        headers.append((b"x-accel-buffering", b"no"))
        start = {"type": "http.response.start", "status": head.status_code, "headers": headers}
        finished = False
        try:
            await send(start)
            await until_disconnected(receive, call.race(self._relay(send)))
            finished = True
        except ClientDisconnected:
            pass
        except LegError as exc:
            logger.warning("%s", exc)
            await call.cancel()  # stop the relay before writing after it
            with contextlib.suppress(OSError):
                await _send_error(send, exc)
        except OSError:  # the client's socket broke
            pass
        finally:
            if finished:
                await call.finish()
            else:
                await call.cancel()

    async def _relay(self, send: Send) -> None:
        async for event in self.call.decode.events():
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_error(send: Send, exc: LegError) -> None:
    body = (sse(exc.body_json()) + SSE_DONE).encode()
    await send({"type": "http.response.body", "body": body, "more_body": False})
