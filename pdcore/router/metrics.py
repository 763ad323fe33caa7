"""Prometheus metrics of the router: requests by route and status, requests and failures
per worker and leg, requests in flight per worker, and request latency.

Like the server's, the collectors live in a registry of their own, so several routers in
one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

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


class RouterMetrics:
    """The router's collectors and the calls the app makes on them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
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
            buckets=_LATENCY_BUCKETS,
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
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def leg_started(self, worker: str, role: str) -> None:
        self.worker_requests.labels(worker=worker, role=role).inc()
        self.in_flight.labels(worker=worker, role=role).inc()

    def leg_ended(self, worker: str, role: str, failure: str | None) -> None:
        self.in_flight.labels(worker=worker, role=role).dec()
        if failure is not None:
            self.leg_failures.labels(worker=worker, role=role, reason=failure).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
