"""Transfer counters one manager keeps, per backend, for /metrics and observation hooks."""

from __future__ import annotations

import threading
from typing import Any


class TransferStats:
    """Bytes, counts, failures and latency samples of one side's transfers. Latency samples
    are handed out once (`snapshot(drain_samples=True)`, which only /metrics asks for), so
    a histogram observes each exactly once and other readers (/server_info) take none."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._bytes = 0
        self._ok = 0
        self._failed = 0
        self._samples: list[float] = []
        self._events: list[dict[str, Any]] = []
        self._by_reason: dict[tuple[str, str], int] = {}  # (role, failure kind) -> count
        self._control: dict[str, int] = {"heartbeat_failures": 0, "auth_refusals": 0}

    def count(self, name: str, n: int = 1) -> None:
        """Bump a control-plane counter: heartbeat_failures (a peer declared dead after
        missed heartbeats) or auth_refusals (a message that failed authentication)."""
        with self._lock:
            self._control[name] = self._control.get(name, 0) + n

    def record(
        self, room: int, role: str, ok: bool, nbytes: int, latency_s: float, error: str | None
    ) -> None:
        with self._lock:
            if ok:
                self._ok += 1
                self._bytes += nbytes
                if len(self._samples) >= 10_000:  # /metrics never scraped: stay bounded
                    del self._samples[:1000]
                self._samples.append(latency_s)
            else:
                self._failed += 1
                key = (role, failure_kind(error))
                self._by_reason[key] = self._by_reason.get(key, 0) + 1
            if len(self._events) >= 10_000:  # nobody emits them: keep memory bounded
                del self._events[:1000]
            self._events.append(
                {
                    "bootstrap_room": room,
                    "backend": self.backend,
                    "role": role,
                    "success": ok,
                    "bytes": nbytes,
                    "latency_s": latency_s,
                    "error": error,
                }
            )

    def snapshot(self, drain_samples: bool = False) -> dict[str, Any]:
        """{"transfer": {backend: {bytes_total, transfers_total, failures_total,
        latency_samples_s, failures_by_reason}}, "control": {heartbeat_failures,
        auth_refusals}}; with `drain_samples`, the samples since the last drain (and
        they are handed out), else none."""
        with self._lock:
            samples: list[float] = []
            if drain_samples:
                samples, self._samples = self._samples[-10_000:], []
            return {
                "transfer": {
                    self.backend: {
                        "bytes_total": self._bytes,
                        "transfers_total": self._ok,
                        "failures_total": self._failed,
                        "latency_samples_s": samples,
                        "failures_by_reason": [
                            {"role": role, "reason": kind, "count": n}
                            for (role, kind), n in sorted(self._by_reason.items())
                        ],
                    }
                },
                "control": dict(self._control),
            }

    def emit_events(self) -> None:
        """Call the pdcore_kv_transfer_finished hook for rooms ended since the last call; on
        the engine thread, outside every control-plane lock, so a slow observer delays
        nothing but itself."""
        with self._lock:
            events, self._events = self._events, []
        if events:
            from pdcore.plugins import notify

            for info in events:
                notify("pdcore_kv_transfer_finished", {"rid": None, **info})


# Failure reasons (the texts the control plane writes) -> a small, fixed label set.
_KINDS = (
    ("bootstrap timeout", "bootstrap_timeout"),
    ("waiting timeout", "waiting_timeout"),
    ("heartbeat", "heartbeat"),
    ("silent for", "heartbeat"),
    ("restarted", "peer_restarted"),
    ("refused", "refused"),
    ("cannot reach", "unreachable"),
    ("write", "write_failed"),
    ("aborted on decode", "aborted"),
    ("aborted on prefill", "aborted"),
    ("shutting down", "shutdown"),
)


def failure_kind(reason: str | None) -> str:
    """The label a failed room's reason is counted under in /metrics."""
    text = (reason or "").lower()
    return next((kind for needle, kind in _KINDS if needle in text), "other")
