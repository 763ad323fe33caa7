"""The PD request: one body, two legs (prefill and decode) sent at once, decode's answer back.

For POST /generate, /v1/completions and /v1/chat/completions the router

1. waits for a slot (flow control, `admission.py`);
2. picks a decode server, then a prefill server, each with its role's routing policy, among
   the *available* workers (healthy, breaker not open). With no decode available it answers
   503 at once and sends nothing to any prefill: a prefill with no decode to take its KV
   cache would only hold pages until its bootstrap timeout;
3. adds `bootstrap_host` (the prefill URL's host), `bootstrap_port` (from `--prefill URL
   PORT`, or null) and `bootstrap_room` (a random 63-bit int) to the body -- lists of them,
   one per item, for a /generate batch -- exactly as SGLang's router does;
4. sends the same bytes to both workers at the same time;
5. answers with decode's response, as SSE when decode streams and as one body otherwise,
   while reading and dropping prefill's (which may stream too).

The first failure decides: if either leg fails, the other leg is cancelled at once (its
connection closed, so the worker aborts the request). A worker's fault (no connection, 5xx,
408, 429, silence, a dropped connection, an error event) is retried -- a new room, both legs
again, preferring other workers -- until `--retry-max-retries` attempts, but only while
nothing has reached the client: a stream is committed when decode's first event arrives.
After that a failure ends the stream with an error event. A client that goes away cancels
both legs. Once decode's response is complete, prefill is left to finish on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from pdcore.router import http1
from pdcore.router.admission import AdmissionControl, Rejected, Ticket
from pdcore.router.legs import Leg, LegError
from pdcore.router.metrics import RouterMetrics
from pdcore.router.policies import RouteRequest, RoutingPolicy, Worker
from pdcore.router.resilience import Backoff
from pdcore.router.settings import RouterSettings
from pdcore.router.workers import WorkerPool
from pdcore.web.errors import ProtocolError, error_body, parse_json, require_object
from pdcore.web.streaming import SSE_DONE, ClientDisconnected, sse, wait_for_disconnect

if TYPE_CHECKING:
    from pdcore.router.cluster import SupervisorLink

logger = logging.getLogger("pdcore.router")

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed the request", for the log and the metrics
REQUEST_ID_HEADER = "x-request-id"


@dataclass
class RouterState:
    """Everything the routes need; stored on app.state.router."""

    settings: RouterSettings
    pool: WorkerPool
    policies: dict[str, RoutingPolicy]  # by role
    client: httpx.AsyncClient  # the control plane: health checks, admin calls, policies
    legs: http1.Client  # the legs' connections (legs.make_client)
    metrics: RouterMetrics
    admission: AdmissionControl
    backoff: Backoff
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # With --router-processes N > 1: the channel to the supervisor, through which worker
    # registrations reach every router process (None: the only process).
    link: SupervisorLink | None = None

    @property
    def prefills(self) -> list[Worker]:
        return self.pool.workers("prefill")

    @property
    def decodes(self) -> list[Worker]:
        return self.pool.workers("decode")

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a task that outlives its request (a prefill leg finishing on its own)."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def worker_headers(state: RouterState, request: Request) -> dict[str, str]:
    """Headers every call to a worker carries for this client request: the request id, and
    the router's --api-key as a bearer token (else the client's Authorization, unchanged)."""
    headers = {REQUEST_ID_HEADER: request_id(request)}
    if state.settings.api_key:
        headers["authorization"] = f"Bearer {state.settings.api_key}"
    elif "authorization" in request.headers:
        headers["authorization"] = request.headers["authorization"]
    return headers


def request_id(request: Request) -> str:
    """The id RequestIdMiddleware gave this request ('' outside it, e.g. in unit tests)."""
    return str(request.scope.get("state", {}).get("request_id", ""))


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


def _prompt_text(value: Any) -> str:
    """A prompt as text: a string as is, token ids joined with spaces, a batch's first item."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, (str, list)):
            return _prompt_text(first)
        return " ".join(str(t) for t in value)
    return ""


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def route_text(body: dict[str, Any]) -> str:
    """The prompt as a prefix cache would see it (see policies.RouteRequest): `text` or
    `prompt`, chat messages' contents joined in order, or token ids joined with spaces."""
    for key in ("text", "prompt", "input_ids"):
        if body.get(key) is not None:
            return _prompt_text(body[key])
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(_message_text(m.get("content")) for m in messages if isinstance(m, dict))
    return ""


class NoWorkerAvailable(Exception):
    """No worker of a role may take a request now: the client gets 503."""

    def __init__(self, state: RouterState, role: str, last: LegError | None) -> None:
        members = [m for m in state.pool if m.worker.role == role]
        why = ", ".join(
            f"{m.worker.url} ({'unhealthy' if not m.worker.healthy else 'circuit open'})"
            for m in members
        )
        message = f"No {role} server is available" + (
            f": {why}" if why else " (none is registered; POST /workers to add one)"
        )
        if last is not None:
            message += f"; the last attempt failed: {last}"
        super().__init__(message)
        self.role = role

    def response(self) -> JSONResponse:
        body = error_body(str(self), type="service_unavailable", code=f"no_{self.role}_available")
        return JSONResponse(body, status_code=503, headers={"retry-after": "1"})


def _pick(state: RouterState, role: str, request: RouteRequest, avoid: set[Worker]) -> Worker:
    """One available worker of `role`, chosen by its policy; workers that failed this
    request already are left out while others remain."""
    available = state.pool.available(role)
    fresh = [w for w in available if w not in avoid]
    workers = fresh or available
    i = state.policies[role].select(workers, request)
    if not 0 <= i < len(workers):
        raise RuntimeError(
            f"routing policy {state.settings.role_policy(role)!r} chose index {i} "
            f"for {len(workers)} {role} servers"
        )
    worker = workers[i]
    state.metrics.selected(worker.url, role)
    return worker


def select_pair(
    state: RouterState, request: RouteRequest, avoid: set[Worker], last: LegError | None = None
) -> tuple[Worker, Worker]:
    """(prefill, decode) for one attempt; raises NoWorkerAvailable before choosing either
    when a role has none, so a prefill is never sent work no decode can finish."""
    for role in ("decode", "prefill"):
        if not state.pool.available(role):
            state.metrics.no_worker.labels(role=role).inc()
            raise NoWorkerAvailable(state, role, last)
    decode = _pick(state, "decode", request, avoid)
    prefill = _pick(state, "prefill", request, avoid)
    return prefill, decode


async def until_disconnected(watch: asyncio.Future[None], awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, but cancel it and raise ClientDisconnected if `watch` (the
    request's disconnect watcher, see `route_pd`) ends first."""
    work = asyncio.ensure_future(awaitable)
    try:
        waits: set[asyncio.Future[Any]] = {work, watch}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    if work.done():
        return work.result()
    work.cancel()
    try:
        got: Any = await work
    except (asyncio.CancelledError, Exception):
        pass
    else:
        # Python <= 3.11: a cancel that lands once `work`'s inner wait has its result is
        # ignored and the result returned (asyncio.wait_for); an admission ticket granted in
        # that same turn must not be lost, or its slot stays taken for good.
        if isinstance(got, Ticket):
            got.release()
    raise ClientDisconnected()


class PDCall:
    """The two legs of one attempt and the rule that the first failure -- or the client
    going away -- cancels both."""

    def __init__(
        self, state: RouterState, prefill: Leg, decode: Leg, watch: asyncio.Future[None]
    ) -> None:
        self.state = state
        self.prefill = prefill
        self.decode = decode
        self.watch = watch
        self.prefill_task = asyncio.create_task(prefill.run_to_end())
        self.prefill_task.add_done_callback(self._prefill_done)
        self._tasks: list[asyncio.Task[Any]] = [self.prefill_task]

    def _prefill_error(self) -> BaseException | None:
        t = self.prefill_task
        return t.exception() if t.done() and not t.cancelled() else None

    def _prefill_done(self, task: asyncio.Task[Any]) -> None:
        """Feed prefill's outcome to its breaker (a cancelled leg tells nothing)."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.state.pool.record_result(self.prefill.worker, True)
        elif isinstance(exc, LegError) and exc.worker_fault:
            self.state.pool.record_result(self.prefill.worker, False)

    def decode_failed(self, exc: LegError) -> None:
        if exc.worker is self.decode.worker and exc.worker_fault:
            self.state.pool.record_result(self.decode.worker, False)

    async def race(self, work: Awaitable[T]) -> T:
        """Await a step of the decode leg; raise prefill's LegError if prefill fails first,
        ClientDisconnected if the client goes away first (`cancel()` then stops the step)."""
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        while not task.done():
            err = self._prefill_error()
            if err is not None:
                raise err
            if self.watch.done():
                raise ClientDisconnected()
            waits: set[asyncio.Future[Any]] = {task, self.watch}
            if not self.prefill_task.done():
                waits.add(self.prefill_task)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return task.result()

    async def finish(self) -> None:
        """Decode's response is complete: let prefill end on its own, in the background."""
        await self.decode.close()
        self.state.pool.record_result(self.decode.worker, True)
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


async def _first_event(events: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _answer(decode: Leg) -> tuple[AsyncIterator[bytes] | None, bytes | None]:
    """Decode's head, then (its events, the first of them) when it streams, else (None,
    its whole body): one step, so that a request costs few tasks."""
    await decode.open()
    if decode.is_sse:
        events = decode.events()
        return events, await _first_event(events)
    return None, await decode.read()


async def _read_body(request: Request, timeout_s: float) -> bytes:
    """The request body, or 408 when it has not all arrived within `timeout_s`."""
    try:
        if sys.version_info >= (3, 11):  # a timer, not a task as wait_for: this runs per request
            async with asyncio.timeout(timeout_s):
                return await request.body()
        return await asyncio.wait_for(request.body(), timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(
            f"The request body did not arrive within {timeout_s:g} s (--http-body-timeout)",
            status=408,
        ) from None


async def route_pd(request: Request) -> Response | PDStreamResponse:
    """POST /generate, /v1/completions, /v1/chat/completions."""
    state: RouterState = request.app.state.router
    t0 = time.monotonic()
    try:
        raw = await _read_body(request, state.settings.http_body_timeout)
    except ClientDisconnect:  # gone before its body arrived: nothing was sent anywhere
        return Response(status_code=CLIENT_CLOSED)
    limit = state.settings.max_payload_size
    if len(raw) > limit:
        raise ProtocolError(
            f"The request body is {len(raw)} bytes; the router accepts at most {limit} "
            "(--max-payload-size)",
            status=413,
        )
    body = require_object(parse_json(raw))
    # One watcher for the request's whole life: every wait races it.
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    response: Response | PDStreamResponse | None = None
    try:
        ticket = state.admission.try_admit()
        if ticket is None:
            ticket = await until_disconnected(watch, state.admission.admit())
    except Rejected as exc:
        watch.cancel()
        logger.warning("%s", exc)
        return exc.response()
    except BaseException as exc:
        watch.cancel()
        if isinstance(exc, ClientDisconnected):
            return Response(status_code=CLIENT_CLOSED)
        raise
    try:
        response = await _route_with_retries(state, request, body, ticket, t0, watch)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not isinstance(response, PDStreamResponse):
            watch.cancel()
            ticket.release()  # a stream releases its slot (and its watcher) when it ends
    return response


async def _route_with_retries(
    state: RouterState,
    request: Request,
    body: dict[str, Any],
    ticket: Ticket,
    t0: float,
    watch: asyncio.Future[None],
) -> Response | PDStreamResponse:
    route_request = RouteRequest(body, route_text(body))
    headers = {"content-type": "application/json", **worker_headers(state, request)}
    attempts = state.settings.max_attempts
    avoid: set[Worker] = set()
    last: LegError | None = None
    for attempt in range(1, attempts + 1):
        try:
            prefill, decode = select_pair(state, route_request, avoid, last)
        except NoWorkerAvailable as exc:
            logger.warning("%s", exc)
            return exc.response()
        try:
            pair = (prefill, decode)
            return await _attempt(state, request, body, pair, headers, ticket, t0, watch)
        except LegError as exc:
            logger.warning("%s (attempt %d of %d)", exc, attempt, attempts)
            if not exc.worker_fault:
                return exc.response()
            if attempt == attempts:
                if attempts > 1:
                    state.metrics.retries_exhausted.labels(route=request.url.path).inc()
                return exc.response()
            last = exc
            avoid.add(exc.worker)
            state.metrics.retries.labels(role=exc.worker.role, reason=exc.reason).inc()
            delay = state.backoff.delay(attempt)
            await until_disconnected(watch, asyncio.sleep(delay))
    raise AssertionError("unreachable: the last attempt returns")


async def _attempt(
    state: RouterState,
    request: Request,
    body: dict[str, Any],
    pair: tuple[Worker, Worker],
    headers: dict[str, str],
    ticket: Ticket,
    t0: float,
    watch: asyncio.Future[None],
) -> Response | PDStreamResponse:
    """One attempt: both legs, up to the point where the client gets something."""
    payload = json.dumps(with_bootstrap(body, pair[0])).encode()
    path, timeout = request.scope["path"], state.settings.request_timeout_secs
    prefill, decode = (
        Leg(state.legs, w, path, payload, headers, state.metrics, timeout) for w in pair
    )
    call = PDCall(state, prefill, decode, watch)
    try:
        # A stream is committed only once decode's first event is here: a failure before
        # it is still retried, since the client has had nothing yet.
        events, data = await call.race(_answer(decode))
        if events is not None:
            state.metrics.ttft.labels(route=path).observe(time.monotonic() - t0)
            return PDStreamResponse(call, events, data, ticket)
    except LegError as exc:
        await call.cancel()
        call.decode_failed(exc)
        raise
    except BaseException:
        await call.cancel()
        raise
    status, ctype = decode.status, decode.content_type
    await call.finish()
    return Response(data, status_code=status, media_type=ctype)


class PDStreamResponse:
    """Decode's SSE stream, relayed event by event (the bytes as decode sent them).

    Ends early -- cancelling both legs -- when the client disconnects, or when either leg
    fails, in which case the client's last events are the error and `data: [DONE]`. Holds
    the request's flow-control slot until it ends.
    """

    def __init__(
        self, call: PDCall, events: AsyncIterator[bytes], first: bytes | None, ticket: Ticket
    ) -> None:
        self.call = call
        self.events = events
        self.first = first
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.call
        ctype = call.decode.content_type or "text/event-stream"
        headers = [(b"content-type", ctype.encode()), (b"cache-control", b"no-cache")]
        headers.append((b"x-accel-buffering", b"no"))
        start = {"type": "http.response.start", "status": call.decode.status, "headers": headers}
        finished = False
        try:
            await send(start)
            await call.race(self._relay(send))
            finished = True
        except ClientDisconnected:
            pass
        except LegError as exc:
            logger.warning("%s", exc)
            await call.cancel()  # stop the relay before writing after it
            call.decode_failed(exc)
            with contextlib.suppress(OSError):
                await _send_error(send, exc)
        except OSError:  # the client's socket broke
            pass
        finally:
            try:
                if finished:
                    await call.finish()
                else:
                    await call.cancel()
            finally:
                call.watch.cancel()
                self.ticket.release()

    async def _relay(self, send: Send) -> None:
        if self.first is not None:
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_error(send: Send, exc: LegError) -> None:
    body = (sse(exc.body_json()) + SSE_DONE).encode()
    await send({"type": "http.response.body", "body": body, "more_body": False})
