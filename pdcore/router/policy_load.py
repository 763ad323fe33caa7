"""What the load-aware policies agree on: a worker's key, its load, and "imbalanced".

Kept apart so power_of_two, cache_aware and kv_aware weigh load the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdcore.router.policies import Worker


def worker_key(worker: Worker) -> str:
    """The name a policy files per-worker state under (stable while the worker exists)."""
    return worker.worker_id or worker.url


def worker_load(worker: Worker) -> int:
    """Requests on `worker`: the larger of what it last reported in /get_load (every
    router's requests and direct ones, but stale between polls) and the router's own count
    (exact and current, but only this router's) -- so a burst raises it at once."""
    reported = worker.load.get("num_reqs", 0) if worker.load else 0
    return max(reported, worker.in_flight)


def is_imbalanced(loads: Sequence[int], abs_threshold: int, rel_threshold: float) -> bool:
    """SGLang's test: max - min > abs_threshold and max > rel_threshold x min."""
    if len(loads) < 2:
        return False
    hi, lo = max(loads), min(loads)
    return hi - lo > abs_threshold and hi > rel_threshold * lo


def least_loaded(loads: Sequence[int], tiebreak: Sequence[int] | None = None) -> int:
    """Index of the smallest load (then the smallest `tiebreak`, then the first)."""
    keys = tiebreak or [0] * len(loads)
    return min(range(len(loads)), key=lambda i: (loads[i], keys[i], i))
