"""Helpers for the router tests: a `pdcore router` process, and a fake worker.

The fake worker is a test double of a worker (a small starlette app in a thread) that
records what the router sends and answers as told; it checks the router's wire format and
failure handling. End-to-end tests use real `pdcore serve` processes instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pdcore.web.errors import error_body
from pdcore.web.streaming import (
    SSE_DONE,
    ClientDisconnected,
    EventStreamResponse,
    sse,
    until_disconnected,
)
from tests.conftest import free_port
from tests.server_helpers import ManagedProcess, wait_until

ROUTER_START_TIMEOUT = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("PDCORE_", "SGLANG_"))}
    env["PDCORE_PLUGINS"] = ""
    env.update(extra)
    return env


class RouterProcess(ManagedProcess):
    """`python -m pdcore.cli router <flags>` on a free port."""

    name = "router"
    start_timeout = ROUTER_START_TIMEOUT

    def __init__(self, log_path: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "pdcore.cli", "router", "--port", str(self.port), *flags]
        super().__init__(args, log_path, clean_env(**(env or {})))

    def wait_ready(self, timeout: float | None = None):
        """Up and serving HTTP: /liveness answers 200 (or /health, for a router without
        /liveness) -- pdcore's /health is 503 while no prefill or no decode is available."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            for path in ("/liveness", "/health"):
                try:
                    if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not up after {timeout}s:\n{self.log()}")


def pd_flags(prefills: list[Any], decodes: list[Any], *extra: str) -> list[str]:
    """`--pd-disaggregation --prefill URL [PORT] ... --decode URL ...`; a prefill given as
    (url, port) gets the port."""
    flags = ["--pd-disaggregation"]
    for p in prefills:
        flags += ["--prefill", *(map(str, p) if isinstance(p, tuple) else [p])]
    for d in decodes:
        flags += ["--decode", d]
    return [*flags, *extra]


class FakeWorker:
    """A fake prefill or decode server. Set `status`, `delay`, `events`, `event_delay`,
    `fail_event_at`, `live_status` and `health_delay` (of /health) to shape its answers; read `bodies`,
    `arrivals`, `active`, `aborted`."""

    GENERATE = ("/generate", "/v1/completions", "/v1/chat/completions")

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bodies: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.arrivals: list[float] = []
        self.active = 0  # requests being answered now
        self.aborted = 0  # requests whose client (the router) went away
        self.reset()
        routes = [Route(p, self._generate, methods=["POST"]) for p in self.GENERATE]
        routes += [
            Route("/health", self._health),
            Route("/health_generate", self._health_generate),
            Route("/server_info", lambda r: JSONResponse({"name": self.name})),
            Route("/get_load", lambda r: JSONResponse([{"dp_rank": 0, "num_reqs": self.active}])),
            Route("/flush_cache", self._flush, methods=["GET", "POST"]),
            Route("/v1/models", lambda r: JSONResponse({"data": [{"id": self.name}]})),
        ]
        config = uvicorn.Config(
            Starlette(routes=routes), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.server.started, timeout=10), "fake worker did not start"

    def reset(self) -> None:
        self.bodies.clear()
        self.arrivals.clear()
        self.aborted = 0
        self.status = 200
        self.delay = 0.0
        self.events = 3
        self.event_delay = 0.0
        self.fail_event_at: int | None = None
        self.health_status = 200  # /health_generate
        self.live_status = 200  # /health
        self.health_delay = 0.0  # before /health answers
        self.flush_status = 200

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def _health(self, request: Request) -> Response:
        await asyncio.sleep(self.health_delay)
        return Response(status_code=self.live_status)

    async def _health_generate(self, request: Request) -> Response:
        return Response(status_code=self.health_status)

    async def _flush(self, request: Request) -> Response:
        if self.flush_status == 200:
            return Response("ok")
        return JSONResponse(error_body(f"{self.name} busy"), status_code=self.flush_status)

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.arrivals.append(time.monotonic())
        self.bodies.append((request.url.path, body, dict(request.headers)))
        self.active += 1
        try:
            await until_disconnected(request.receive, asyncio.sleep(self.delay))
        except ClientDisconnected:
            self.active -= 1
            self.aborted += 1
            return Response(status_code=499)
        if self.status != 200:
            self.active -= 1
            message = f"{self.name} says no ({self.status})"
            return JSONResponse(error_body(message, code="fake"), status_code=self.status)
        if body.get("stream"):
            return EventStreamResponse(self._events())
        self.active -= 1
        return JSONResponse({"text": f"answer from {self.name}", "worker": self.name})

    async def _events(self) -> AsyncIterator[str]:
        done = False
        try:
            for i in range(self.events):
                if i == self.fail_event_at:
                    yield sse(error_body(f"{self.name} broke at event {i}"))
                    break
                yield sse({"text": f"{self.name} {i}", "index": i})
                await asyncio.sleep(self.event_delay)
            yield SSE_DONE
            done = True
        finally:
            self.active -= 1
            if not done:
                self.aborted += 1
