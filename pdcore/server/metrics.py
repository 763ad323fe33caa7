"""Prometheus metrics of one server: request counts, token counters, latency histograms, and
gauges of the engine's queues and KV pool.

Each server owns its own CollectorRegistry (not the global one) so that several servers in
one test process never collide. The gauges are not pushed by the engine: `/metrics` asks the
engine for its stats on each scrape and sets them, so they are exactly as fresh as the scrape.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

# Engine stats key -> gauge name (without the prefix) and help.
_STAT_GAUGES = {
    "num_running_reqs": "Requests in the running batch.",
    "num_waiting_reqs": "Requests waiting to be scheduled.",
    "kv_pages_used": "KV cache pages in use (requests and prefix cache).",
    "kv_pages_total": "KV cache pages in the pool.",
    "num_tokens": "KV cache tokens held (requests and prefix cache).",
    "prefix_cache_tokens": "Tokens held by the prefix cache.",
    "num_bootstrap_queue_reqs": "Prefill: requests waiting for their decode's page list.",
    "num_inflight_queue_reqs": "Prefill: requests whose KV is being sent.",
    "num_prealloc_queue_reqs": "Decode: requests waiting to pre-allocate pages.",
    "num_transfer_queue_reqs": "Decode: requests waiting for their KV to arrive.",
    "num_quarantined_pages": "Decode: KV pages held back after a failed or aborted transfer "
    "(a write may still land in them), freed after ABORT_QUARANTINE_S.",
    "quarantine_max_overdue_seconds": "Decode: the longest any quarantined page was (or is) "
    "held past its quarantine timeout, since start; ~0 when the engine loop keeps up.",
}
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _PDCounters:
    """PD control-plane counters, kept by the engine's KV manager and exposed as Prometheus
    counters with the totals of the last scrape: peers declared dead after missed heartbeats,
    messages refused by --disaggregation-auth-token, and failed rooms by reason."""

    def __init__(self) -> None:
        self.control: dict[str, int] = {}
        self.by_reason: dict[tuple[str, str, str], int] = {}

    def update(self, stats: Any) -> None:
        if not isinstance(stats, dict):
            return
        control = stats.get("control")
        if isinstance(control, dict):
            self.control = {k: int(v) for k, v in control.items()}
        for backend, t in (stats.get("transfer") or {}).items():
            for item in t.get("failures_by_reason", ()):
                key = (backend, str(item["role"]), str(item["reason"]))
                self.by_reason[key] = int(item["count"])

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        heartbeat = CounterMetricFamily(
            "pdcore_pd_heartbeat_failures",
            "PD peers declared dead after missed heartbeats (decode: a prefill; prefill: a "
            "decode), since start.",
        )
        heartbeat.add_metric([], self.control.get("heartbeat_failures", 0))
        refused = CounterMetricFamily(
            "pdcore_pd_auth_refusals",
            "PD control messages and bootstrap queries refused by authentication "
            "(--disaggregation-auth-token), since start.",
        )
        refused.add_metric([], self.control.get("auth_refusals", 0))
        failures = CounterMetricFamily(
            "pdcore_kv_transfer_failures_by_reason",
            "Failed PD rooms since start, per backend, side and reason (bootstrap_timeout, "
            "waiting_timeout, heartbeat, peer_restarted, refused, unreachable, write_failed, "
            "aborted, shutdown, other).",
            labels=["backend", "role", "reason"],
        )
        for (backend, role, reason), n in sorted(self.by_reason.items()):
            failures.add_metric([backend, role, reason], n)
        return [heartbeat, refused, failures]


class Metrics:
    """The collectors of one server and the few calls the routes make."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.requests = Counter(
            "pdcore_http_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pdcore_prompt_tokens",
            "Prompt tokens of finished requests.",
            ["model_name"],
            registry=r,
        ).labels(**labels)
        self.generation_tokens = Counter(
            "pdcore_generation_tokens", "Generated tokens.", ["model_name"], registry=r
        ).labels(**labels)
        self.cached_tokens = Counter(
            "pdcore_cached_tokens",
            "Prompt tokens served from the prefix cache.",
            ["model_name"],
            registry=r,
        ).labels(**labels)
        self.finished = Counter(
            "pdcore_requests_finished",
            "Finished generation requests by finish reason.",
            ["model_name", "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "pdcore_time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.itl = Histogram(
            "pdcore_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.e2e = Histogram(
            "pdcore_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            ["model_name"],
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.engine_up = Gauge(
            "pdcore_engine_up", "1 while the engine process answers, else 0.", registry=r
        )
        self.gauges = {
            key: Gauge(f"pdcore_{key}", doc, ["model_name"], registry=r).labels(**labels)
            for key, doc in _STAT_GAUGES.items()
        }
        self.transfer_bytes = Gauge(
            "pdcore_kv_transfer_bytes",
            "KV bytes moved by successful PD transfers since start, per backend.",
            ["backend"],
            registry=r,
        )
        self.transfers = Gauge(
            "pdcore_kv_transfers",
            "Successful PD KV transfers since start, per backend.",
            ["backend"],
            registry=r,
        )
        self.transfer_failures = Gauge(
            "pdcore_kv_transfer_failures",
            "Failed PD KV transfers (and rooms) since start, per backend.",
            ["backend"],
            registry=r,
        )
        self.transfer_latency = Histogram(
            "pdcore_kv_transfer_latency_seconds",
            "Latency of PD KV transfers, per backend.",
            ["backend"],
            buckets=_TRANSFER_BUCKETS,
            registry=r,
        )
        self.model_name = model_name
        self.pd_counters = _PDCounters()
        r.register(self.pd_counters)

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_finished(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, reason: str
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.finished.labels(model_name=self.model_name, finish_reason=reason).inc()

    def set_engine_stats(self, stats: dict[str, Any] | None) -> None:
        """Refresh the gauges from the engine's get_stats(); None means it did not answer."""
        self.engine_up.set(0 if stats is None else 1)
        for key, gauge in self.gauges.items():
            value = (stats or {}).get(key)
            if isinstance(value, (int, float)):
                gauge.set(value)
        self.pd_counters.update(stats or {})
        for backend, t in ((stats or {}).get("transfer") or {}).items():
            self.transfer_bytes.labels(backend=backend).set(t.get("bytes_total", 0))
            self.transfers.labels(backend=backend).set(t.get("transfers_total", 0))
            self.transfer_failures.labels(backend=backend).set(t.get("failures_total", 0))
            for sample in t.get("latency_samples_s", ()):
                self.transfer_latency.labels(backend=backend).observe(sample)

    def render(self) -> bytes:
        return generate_latest(self.registry)
