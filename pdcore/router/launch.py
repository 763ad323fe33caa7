"""`run_router`: check the port, wait for the workers, serve until SIGINT or SIGTERM.

A light process: starlette, uvicorn and httpx only -- never torch, the model or the engine
(tests/test_router_cli.py checks this), so it starts in a moment and fits anywhere.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
import uvicorn

from pdcore.plugins import get_registry
from pdcore.router import http1
from pdcore.router.admission import Admission, AdmissionControl, TokenBucket
from pdcore.router.app import build_app, build_metrics_app
from pdcore.router.cluster import ChildSpec, SupervisorLink
from pdcore.router.health import HealthChecker, probe
from pdcore.router.http_protocol import router_http_protocol
from pdcore.router.legs import CONNECT_TIMEOUT_S, make_client
from pdcore.router.metrics import RouterMetrics
from pdcore.router.pd import RouterState
from pdcore.router.policies import RoutingPolicy, Worker
from pdcore.router.resilience import Backoff, BreakerState
from pdcore.router.settings import RouterSettings
from pdcore.router.shared_admission import SharedAdmission, SharedTokenBucket
from pdcore.router.workers import ROLES, WorkerPool
from pdcore.web.errors import check_port

logger = logging.getLogger("pdcore.router")

_STARTUP_PROBE_TIMEOUT_S = 5.0
_LINK_TIMEOUT_S = 30.0  # plus the probe's: a worker change reaching every router process


class _Terminate(BaseException):
    """Raised by our SIGTERM handler (uvicorn re-raises the signal after its graceful
    shutdown), so SIGTERM ends the router with status 0 after cleaning up."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminate()


def setup_logging(settings: RouterSettings, name: str = "router") -> None:
    level = "warning" if settings.log_level == "warn" else settings.log_level
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s",
    )
    if level != "debug":  # httpx logs every request at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)


def run_router(settings: RouterSettings) -> int:
    """Serve the router on settings.host:settings.port; returns the exit status.

    Raises SystemExit with a message when the port cannot be listened on or a worker is
    not healthy within --worker-startup-timeout-secs. With --router-processes N > 1 this
    process becomes the supervisor of N router processes (supervisor.py).
    """
    setup_logging(settings, "router supervisor" if settings.router_processes > 1 else "router")
    check_port("pdcore router", settings.host, settings.port)
    if settings.prometheus_port is not None:
        check_port("pdcore router", settings.prometheus_host, settings.prometheus_port)
    if settings.router_processes > 1:
        from pdcore.router.supervisor import run_supervisor

        return run_supervisor(settings)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _event_loop_runner()(_serve(settings))
    except (KeyboardInterrupt, _Terminate):
        logger.info("router stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop's `run` when uvloop is installed (it roughly halves the event loop's cost per
    request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def make_pool(settings: RouterSettings, metrics: RouterMetrics) -> WorkerPool:
    """The workers from --prefill and --decode, in command-line order."""

    def breaker_changed(worker: Worker, old: BreakerState, new: BreakerState) -> None:
        metrics.cb_transitions.labels(
            worker=worker.url, role=worker.role, from_state=old.value, to_state=new.value
        ).inc()

    pool = WorkerPool(settings, on_breaker_change=breaker_changed)
    for p in settings.prefill:
        pool.add(p.url, "prefill", p.bootstrap_port)
    for url in settings.decode:
        pool.add(url, "decode")
    return pool


def make_policies(settings: RouterSettings) -> dict[str, RoutingPolicy]:
    """One policy object per role, each made by its factory with (role=, settings=)."""
    registry = get_registry("routing_policy")
    return {
        role: registry.create(settings.role_policy(role), role=role, settings=settings)
        for role in ROLES
    }


def make_state(
    settings: RouterSettings,
    client: httpx.AsyncClient,
    legs: http1.Client,
    spec: ChildSpec | None = None,
) -> RouterState:
    """The router's state; `spec`: this process's share of --router-processes N > 1 (flow
    control in shared memory, metrics in the multiprocess folder, the supervisor's link)."""
    metrics_dir = spec.metrics_dir if spec is not None else None
    metrics = RouterMetrics(settings.prometheus_duration_buckets, metrics_dir)
    rate = settings.rate_limit_tokens_per_second

    def rejected(reason: str) -> None:
        metrics.rejected.labels(reason=reason).inc()

    admission: AdmissionControl
    limits = (settings.max_concurrent_requests, settings.queue_size, settings.queue_timeout_secs)
    if spec is None:
        bucket = TokenBucket(rate, max(1.0, rate)) if rate else None
        admission = Admission(*limits, bucket, on_reject=rejected)
    else:
        shared = SharedTokenBucket(spec.slots, rate, max(1.0, rate)) if rate else None
        admission = SharedAdmission(spec.slots, *limits, shared, on_reject=rejected)
    backoff = Backoff(
        settings.retry_initial_backoff_ms / 1000,
        settings.retry_max_backoff_ms / 1000,
        settings.retry_backoff_multiplier,
        settings.retry_jitter_factor,
    )
    return RouterState(
        settings,
        make_pool(settings, metrics),
        make_policies(settings),
        client,
        legs,
        metrics,
        admission,
        backoff,
        link=SupervisorLink(spec.link, _LINK_TIMEOUT_S + settings.health_check_timeout_secs)
        if spec is not None
        else None,
    )


def _client(settings: RouterSettings) -> httpx.AsyncClient:
    t = settings.request_timeout_secs
    return httpx.AsyncClient(
        timeout=httpx.Timeout(t, connect=min(t, CONNECT_TIMEOUT_S), pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=False,  # never send worker traffic through an HTTP(S)_PROXY
    )


def _auth(settings: RouterSettings) -> dict[str, str]:
    return {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


def _background(state: RouterState) -> list[asyncio.Task[Any]]:
    """The health checker and each policy's own `run` task, if it has one."""
    s = state.settings
    tasks = []
    if not s.disable_health_check:
        checker = HealthChecker(state.pool, state.client, s, state.metrics, _auth(s))
        tasks.append(asyncio.create_task(checker.run(), name="health-checker"))
    for role, policy in state.policies.items():
        run = getattr(policy, "run", None)
        if run is not None:
            workers = functools.partial(state.pool.workers, role)
            tasks.append(asyncio.create_task(run(state.client, workers), name=f"policy-{role}"))
    return tasks


async def _serve(settings: RouterSettings, spec: ChildSpec | None = None) -> None:
    """Serve until told to stop; `spec`: as one of --router-processes N > 1 (on the
    supervisor's sockets, which waited for the workers already)."""
    async with _client(settings) as client, make_client(settings.request_timeout_secs) as legs:
        state = make_state(settings, client, legs, spec)
        if spec is None and not settings.disable_health_check:
            workers = [m.worker for m in state.pool]
            await stop_on_signals(wait_for_workers(client, workers, settings, _auth(settings)))
        level = "warning" if settings.log_level == "warn" else settings.log_level
        servers = [
            uvicorn.Server(
                uvicorn.Config(
                    build_app(state),
                    http=router_http_protocol(settings.http_header_timeout),
                    host=settings.host,
                    port=settings.port,
                    log_level=level,
                    access_log=level == "debug",
                    timeout_graceful_shutdown=round(settings.shutdown_grace_period_secs),
                    lifespan="off",
                )
            )
        ]
        if settings.prometheus_port is not None:
            config = uvicorn.Config(
                build_metrics_app(state),
                host=settings.prometheus_host,
                port=settings.prometheus_port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
            servers.append(_MetricsServer(config))
        sockets: list[list[socket.socket] | None] = [None, None]
        if spec is None:
            logger.info(
                "PD router on http://%s:%d: prefill %s; decode %s; policies prefill=%s decode=%s",
                settings.host,
                settings.port,
                ", ".join(f"{w.url} (bootstrap port {w.bootstrap_port})" for w in state.prefills),
                ", ".join(w.url for w in state.decodes),
                settings.role_policy("prefill"),
                settings.role_policy("decode"),
            )
        else:
            sockets = [spec.sockets, spec.metrics_sockets]

            def supervisor_gone() -> None:
                if not servers[0].should_exit:
                    logger.error("the router supervisor is gone: stopping")
                for srv in servers:
                    srv.should_exit = True

            assert state.link is not None
            await state.link.start(state, supervisor_gone)
        tasks = _background(state)
        extra: list[asyncio.Future[None]] = []
        try:
            main = asyncio.ensure_future(servers[0].serve(sockets[0]))
            extra = [asyncio.ensure_future(srv.serve(sockets[1])) for srv in servers[1:]]
            if state.link is not None:
                tasks.append(asyncio.create_task(_report_ready(servers, state.link)))
            await main
        finally:
            for srv in servers[1:]:
                srv.should_exit = True
            for task in [*tasks, *list(state.background)]:
                task.cancel()
            await asyncio.gather(*tasks, *state.background, *extra, return_exceptions=True)


async def _report_ready(servers: list[uvicorn.Server], link: SupervisorLink) -> None:
    while not all(srv.started for srv in servers):
        await asyncio.sleep(0.01)
    link.ready()


class _MetricsServer(uvicorn.Server):
    """The --prometheus-port server: signals are the main server's business."""

    def install_signal_handlers(self) -> None:
        return None


async def stop_on_signals(awaitable: Awaitable[None]) -> None:
    """Await `awaitable` (the start-up wait for the workers, up to
    --worker-startup-timeout-secs); SIGTERM or SIGINT meanwhile stop it and raise
    `_Terminate`, the router's clean stop (exit 0). Under uvloop an exception raised by a
    plain `signal.signal` handler does not reach a coroutine waiting on I/O, so SIGTERM
    used to be ignored until the wait timed out. The handlers in place before are
    restored afterwards (uvicorn's shutdown relies on them)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:
        loop.add_signal_handler(sig, stop)
    try:
        await task
    except asyncio.CancelledError:
        if stopped:
            raise _Terminate() from None
        raise
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])


async def wait_for_workers(
    client: httpx.AsyncClient,
    workers: list[Worker],
    settings: RouterSettings,
    headers: dict[str, str] | None = None,
) -> None:
    """Return once every worker's health endpoint answers 200; exit naming those that do
    not after --worker-startup-timeout-secs (0: do not wait)."""
    timeout = settings.worker_startup_timeout_secs
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    pending = list(workers)
    path = settings.health_check_endpoint
    logger.info("waiting up to %gs for %d workers to be healthy", timeout, len(pending))
    while pending:
        results = await asyncio.gather(
            *(probe(client, w, path, _STARTUP_PROBE_TIMEOUT_S, headers) for w in pending)
        )
        last = {w.url: r for w, r in zip(pending, results, strict=True) if r is not None}
        pending = [w for w in pending if w.url in last]
        if not pending:
            return
        if time.monotonic() >= deadline:
            names = "; ".join(f"{w.role} {w.url}: {last[w.url]}" for w in pending)
            raise SystemExit(
                f"pdcore router: workers not healthy after {timeout:g}s "
                f"(--worker-startup-timeout-secs): {names}"
            )
        await asyncio.sleep(settings.worker_startup_check_interval)


if __name__ == "__main__":  # python -m pdcore.router.launch [pdcore router flags]
    from pdcore.router.settings import parse_router_args

    sys.exit(run_router(parse_router_args(sys.argv[1:])))
