"""power_of_two: of two workers drawn at random, the less loaded one.

Two random choices keep almost all of the benefit of always picking the least loaded
worker while many routers (or a stale load report) do not all herd onto the same one.
Load is `policy_load.worker_load`: /get_load's `num_reqs` (filled by the router's health
checks) or the router's own in-flight count, whichever is larger; ties go to the worker
holding fewer KV tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from pdcore.router.policies import RouteRequest, Worker
from pdcore.router.policy_load import worker_load


def _key(worker: Worker) -> tuple[int, int]:
    tokens = worker.load.get("num_tokens", 0) if worker.load else 0
    return worker_load(worker), tokens


class PowerOfTwoPolicy:
    """Sample two distinct workers, keep the one with the lower load."""

    def __init__(self, role: str = "", settings: Any = None, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def select(self, workers: Sequence[Worker], request: RouteRequest) -> int:
        if len(workers) == 1:
            return 0
        a, b = self._random.sample(range(len(workers)), 2)
        return a if _key(workers[a]) <= _key(workers[b]) else b
