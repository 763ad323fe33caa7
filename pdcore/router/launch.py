"""`run_router`: check the port, wait for the workers, serve until SIGINT or SIGTERM.

A light process: starlette, uvicorn and httpx only -- never torch, the model or the engine
(tests/test_router_cli.py checks this), so it starts in a moment and fits anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import Any

import httpx
import uvicorn

from pdcore.plugins import get_registry
from pdcore.router.app import build_app
from pdcore.router.legs import CONNECT_TIMEOUT_S
from pdcore.router.metrics import RouterMetrics
from pdcore.router.pd import RouterState
from pdcore.router.policies import Worker
from pdcore.router.settings import RouterSettings
from pdcore.web.errors import check_port

logger = logging.getLogger("pdcore.router")

GRACEFUL_SHUTDOWN_S = 5
_STARTUP_POLL_S = 0.5


class _Terminate(BaseException):
    """Raised by our SIGTERM handler (uvicorn re-raises the signal after its graceful
    shutdown), so SIGTERM ends the router with status 0 after cleaning up."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminate()


def run_router(settings: RouterSettings) -> int:
    """Serve the router on settings.host:settings.port; returns the exit status.

    Raises SystemExit with a message when the port cannot be listened on or a worker is
    not healthy within --worker-startup-timeout-secs.
    """
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s [router] %(levelname)s %(name)s: %(message)s",
    )
    if settings.log_level != "debug":  # httpx logs every request at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    check_port("pdcore router", settings.host, settings.port)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        asyncio.run(_serve(settings))
    except (KeyboardInterrupt, _Terminate):
        logger.info("router stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def make_workers(settings: RouterSettings) -> tuple[list[Worker], list[Worker]]:
    prefills = [Worker(p.url, "prefill", p.bootstrap_port) for p in settings.prefill]
    decodes = [Worker(url, "decode") for url in settings.decode]
    return prefills, decodes


def _client(settings: RouterSettings) -> httpx.AsyncClient:
    t = settings.request_timeout_secs
    return httpx.AsyncClient(
        timeout=httpx.Timeout(t, connect=min(t, CONNECT_TIMEOUT_S), pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=False,  # never send worker traffic through an HTTP(S)_PROXY
    )


async def _serve(settings: RouterSettings) -> None:
    prefills, decodes = make_workers(settings)
    policy = get_registry("routing_policy").create(settings.policy)
    async with _client(settings) as client:
        await wait_for_workers(client, [*prefills, *decodes], settings.worker_startup_timeout_secs)
        state = RouterState(settings, prefills, decodes, policy, client, RouterMetrics())
        config = uvicorn.Config(
            build_app(state),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=settings.log_level == "debug",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            lifespan="off",
        )
        logger.info(
            "PD router on http://%s:%d: prefill %s; decode %s; policy %s",
            settings.host,
            settings.port,
            ", ".join(f"{w.url} (bootstrap port {w.bootstrap_port})" for w in prefills),
            ", ".join(w.url for w in decodes),
            settings.policy,
        )
        try:
            await uvicorn.Server(config).serve()
        finally:
            for task in list(state.background):
                task.cancel()
            await asyncio.gather(*state.background, return_exceptions=True)


async def wait_for_workers(
    client: httpx.AsyncClient, workers: list[Worker], timeout: float
) -> None:
    """Return once every worker's /health answers 200; exit naming those that do not."""
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    pending = list(workers)
    logger.info("waiting up to %gs for %d workers to be healthy", timeout, len(pending))
    while pending:
        results = await asyncio.gather(*(_health(client, w) for w in pending))
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
        await asyncio.sleep(_STARTUP_POLL_S)


async def _health(client: httpx.AsyncClient, worker: Worker) -> str | None:
    """None when healthy, else why not."""
    try:
        r = await client.get(worker.url + "/health", timeout=5.0)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None if r.status_code == 200 else f"/health answered {r.status_code}"


if __name__ == "__main__":  # python -m pdcore.router.launch [pdcore router flags]
    from pdcore.router.settings import parse_router_args

    sys.exit(run_router(parse_router_args(sys.argv[1:])))
