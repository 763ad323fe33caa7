"""Prometheus metrics of the router, named in the spirit of SGLang's router (whose Rust
gateway exports `smg_router_ttft_seconds`, `smg_worker_cb_state`, `smg_worker_retries_total`,
...): requests by route and status, latency and TTFT, and per worker its selections, legs,
failures, in-flight requests, health and circuit breaker; retries; flow control.

Like the server's, the collectors live in a registry of their own, so several routers in
one process (tests) never collide.

With `--router-processes N > 1` each router process counts into prometheus_client's
multiprocess files (PROMETHEUS_MULTIPROC_DIR, a folder the supervisor makes and removes)
and /metrics, on any process, merges them: counters and histograms are summed, the
in-flight gauges summed over live processes, `pdcore_router_process_requests` has one
sample per live process (label `pid`). The gauges set at scrape time from the pool --
breakers, health, registered/available counts -- are the answering process's view (each
process runs its own health checks and breakers); the flow-control gauges are global
(shared memory, see shared_admission.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pdcore.router.resilience import BREAKER_GAUGE

if TYPE_CHECKING:
    from pdcore.router.workers import Member

CONTENT_TYPE = CONTENT_TYPE_LATEST
M = TypeVar("M", bound=MetricWrapperBase)

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
)


def _family(
    name: str, doc: str, labels: list[str], samples: list[tuple[tuple[str, str], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


class PoolGauges(Collector):
    """The gauges set from the worker pool and flow control just before a scrape (a
    prometheus_client custom collector, so a removed worker's samples disappear, and with
    several router processes they are never merged from stale copies)."""

    def __init__(self) -> None:
        self.cb_state: list[tuple[str, str, float]] = []
        self.health: list[tuple[str, str, float]] = []
        self.pool_size: dict[tuple[str, str], int] = {}
        self.active = 0
        self.queued = 0

    def collect(self) -> Iterator[Metric]:
        yield _family(
            "pdcore_router_worker_cb_state",
            "Circuit breaker state of each worker: 0 closed, 1 open, 2 half-open.",
            ["worker", "role"],
            [((w, r), v) for w, r, v in self.cb_state],
        )
        yield _family(
            "pdcore_router_worker_health",
            "1 while a worker passes its health checks, else 0.",
            ["worker", "role"],
            [((w, r), v) for w, r, v in self.health],
        )
        yield _family(
            "pdcore_router_workers",
            "Registered workers per role, and how many of them are available.",
            ["role", "state"],
            list(self.pool_size.items()),
        )
        yield GaugeMetricFamily(
            "pdcore_router_requests_active",
            "Generation requests admitted and not yet finished.",
            value=self.active,
        )
        yield GaugeMetricFamily(
            "pdcore_router_queue_depth",
            "Generation requests waiting for a slot (--max-concurrent-requests).",
            value=self.queued,
        )


class RouterMetrics:
    """The router's collectors and the calls the app makes on them.

    `multiprocess_dir`: the PROMETHEUS_MULTIPROC_DIR of `--router-processes N > 1` (this
    process's values are in its files already: prometheus_client reads the variable when
    imported); `render` then merges every process's files."""

    def __init__(
        self, buckets: Sequence[float] | None = None, multiprocess_dir: str | None = None
    ) -> None:
        buckets = tuple(buckets) if buckets else _LATENCY_BUCKETS
        self.registry = r = CollectorRegistry()
        self.pool_gauges = PoolGauges()
        if multiprocess_dir is None:
            r.register(self.pool_gauges)
            self._scrape = r
        else:
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape, multiprocess_dir)
            self._scrape.register(self.pool_gauges)
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}
        self.requests = Counter(
            "pdcore_router_requests",
            "HTTP requests to the router by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "pdcore_router_request_latency_seconds",
            "Time from a request's arrival at the router to the end of its response.",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.ttft = Histogram(
            "pdcore_router_ttft_seconds",
            "Time from a streamed request's arrival at the router to its first event leaving "
            "for the client (retries included).",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.selections = Counter(
            "pdcore_router_worker_selections",
            "Times the routing policy picked each worker.",
            ["worker", "role"],
            registry=r,
        )
        self.retries = Counter(
            "pdcore_router_retries",
            "Attempts retried, by the role of the leg that failed and why.",
            ["role", "reason"],
            registry=r,
        )
        self.retries_exhausted = Counter(
            "pdcore_router_retries_exhausted",
            "Requests that failed after their last allowed attempt (--retry-max-retries).",
            ["route"],
            registry=r,
        )
        self.no_worker = Counter(
            "pdcore_router_no_available_worker",
            "Requests answered 503 because no worker of a role was available.",
            ["role"],
            registry=r,
        )
        self.cb_transitions = Counter(
            "pdcore_router_worker_cb_transitions",
            "Circuit breaker state changes per worker.",
            ["worker", "role", "from_state", "to_state"],
            registry=r,
        )
        self.health_checks = Counter(
            "pdcore_router_worker_health_checks",
            "Health checks per worker, by result (ok, failed).",
            ["worker", "role", "result"],
            registry=r,
        )
        self.rejected = Counter(
            "pdcore_router_rejected_requests",
            "Requests turned away by flow control, by reason "
            "(queue_full, queue_timeout, rate_limited).",
            ["reason"],
            registry=r,
        )
        self.worker_requests = Counter(
            "pdcore_router_worker_requests",
            "Requests the router sent to each worker, by leg (prefill or decode).",
            ["worker", "role"],
            registry=r,
        )
        self.leg_failures = Counter(
            "pdcore_router_leg_failures",
            "Legs that failed, by worker, leg and reason "
            "(connect, timeout, status, closed, error_event).",
            ["worker", "role", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "pdcore_router_worker_in_flight",
            "Requests the router has open on each worker.",
            ["worker", "role"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.process_requests = Gauge(
            "pdcore_router_process_requests",
            "HTTP requests this router process answered (with --router-processes > 1, one "
            "sample per live process, label pid).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.processes = Gauge(
            "pdcore_router_processes",
            "Router processes serving (--router-processes; live ones).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.processes.set(1)

    def _child(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)`, remembered: labels() costs more than the increment, and
        the per-request metrics are counted several times a request. Only for metrics whose
        label sets are never cleared."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, str(status)).inc()
        self._child(self.latency, route).observe(seconds)
        self.process_requests.inc()

    def leg_started(self, worker: str, role: str) -> None:
        self._child(self.worker_requests, worker, role).inc()
        self._child(self.in_flight, worker, role).inc()

    def leg_ended(self, worker: str, role: str, failure: str | None) -> None:
        self._child(self.in_flight, worker, role).dec()
        if failure is not None:
            self.leg_failures.labels(worker=worker, role=role, reason=failure).inc()

    def selected(self, worker: str, role: str) -> None:
        self._child(self.selections, worker, role).inc()

    def sync_workers(self, members: Iterable[Member], active: int, queued: int) -> None:
        """Set the per-worker gauges from the pool as it is now (called before a scrape, so
        lazily changing states such as an expiring breaker are always current)."""
        g = self.pool_gauges
        counts = {
            (role, st): 0 for role in ("prefill", "decode") for st in ("registered", "available")
        }
        g.cb_state, g.health = [], []
        for m in members:
            w = m.worker
            g.cb_state.append((w.url, w.role, BREAKER_GAUGE[m.breaker.state]))
            g.health.append((w.url, w.role, 1 if w.healthy else 0))
            counts[(w.role, "registered")] += 1
            counts[(w.role, "available")] += int(m.available)
        g.pool_size = counts
        g.active, g.queued = active, queued

    def render(self) -> bytes:
        return generate_latest(self._scrape)
