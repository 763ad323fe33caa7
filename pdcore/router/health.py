"""Active health checks: every `--health-check-interval-secs`, probe each worker.

A worker that fails `--health-failure-threshold` checks in a row leaves rotation; one that
passes `--health-success-threshold` in a row comes back (see `WorkerPool.record_health`).
A worker that is still loading its model does not answer 200 (pdcore serve listens only
once its engine is ready), so it is not healthy. The same round polls each healthy worker's
`/get_load` into `Worker.load` for the load-aware policies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from pdcore.router.metrics import RouterMetrics
from pdcore.router.policies import Worker
from pdcore.router.settings import RouterSettings
from pdcore.router.workers import Member, WorkerPool

logger = logging.getLogger("pdcore.router")

LOAD_KEYS = ("num_reqs", "num_waiting_reqs", "num_tokens")


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def probe(
    client: httpx.AsyncClient,
    worker: Worker,
    path: str,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> str | None:
    """None when `worker` answers 200 on `path` within `timeout`, else why not."""
    try:
        r = await client.get(worker.url + path, timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        return _error(exc)
    return None if r.status_code == 200 else f"{path} answered {r.status_code}"


def sum_load(answer: Any) -> dict[str, int] | None:
    """A /get_load answer (one dict, or a list with one per dp rank) summed into one dict."""
    entries = answer if isinstance(answer, list) else [answer]
    total = dict.fromkeys(LOAD_KEYS, 0)
    seen = False
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        for key in LOAD_KEYS:
            value = entry.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] += int(value)
                seen = True
    return total if seen else None


class HealthChecker:
    """The background task that keeps `Worker.healthy` and `Worker.load` current."""

    def __init__(
        self,
        pool: WorkerPool,
        client: httpx.AsyncClient,
        settings: RouterSettings,
        metrics: RouterMetrics,
        headers: dict[str, str],
    ) -> None:
        self.pool = pool
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.headers = headers

    async def run(self) -> None:
        """Check every worker each interval, forever (cancelled at shutdown)."""
        interval = self.settings.health_check_interval_secs
        while True:
            started = time.monotonic()
            await self.check_all()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(m) for m in self.pool))

    async def check(self, member: Member) -> bool:
        """Probe one worker now and record the result; True when it passed."""
        s, w = self.settings, member.worker
        error = await probe(
            self.client, w, s.health_check_endpoint, s.health_check_timeout_secs, self.headers
        )
        self.metrics.health_checks.labels(
            worker=w.url, role=w.role, result="ok" if error is None else "failed"
        ).inc()
        if self.pool.member(w) is not member:
            return error is None  # removed while we probed
        self.pool.record_health(member, error is None, error)
        if error is None:
            await self.poll_load(w)
        return error is None

    async def poll_load(self, worker: Worker) -> None:
        try:
            r = await self.client.get(
                worker.url + "/get_load",
                timeout=self.settings.health_check_timeout_secs,
                headers=self.headers,
            )
            if r.status_code == 200:
                worker.load = sum_load(r.json())
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("%s %s: /get_load failed: %s", worker.role, worker.url, _error(exc))
