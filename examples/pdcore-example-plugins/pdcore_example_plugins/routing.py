"""The "least_inflight" routing policy: send each request to the least busy servers.

Runs in the router process, on its event loop, for every request: no torch, no I/O, quick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdcore.router.policies import RouteRequest, Worker


def least_busy(workers: Sequence[Worker]) -> int:
    """Index of the worker with the fewest in-flight requests; ties go to the lowest index,
    so with nothing in flight the first server on the command line is picked."""
    return min(range(len(workers)), key=lambda i: (workers[i].in_flight, i))


class LeastInflightPolicy:
    """Pick the server with the fewest requests the router has open on it
    (`Worker.in_flight`, kept current by the router), for one role.

    The router makes one of these per role (prefill, decode) and asks each separately:
    prefill load is bursty (one long forward pass per prompt) and decode load is steady (one
    token per step for the whole output), so the two choices are made independently rather
    than as fixed pairs.
    """

    def __init__(self, role: str = "", settings: Any = None) -> None:
        self.role = role

    def select(self, workers: Sequence[Worker], request: RouteRequest) -> int:
        return least_busy(workers)
