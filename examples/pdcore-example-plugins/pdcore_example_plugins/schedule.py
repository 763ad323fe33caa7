"""The "sjf" schedule policy: shortest (uncached) prompt first, starvation-aware.

The scheduler calls `order(waiting, cached_prefix_len)` every time it builds an extend
batch and tries to admit requests in the order returned (until the token budget, the page
pool or --max-running-requests stops it). Nothing else is asked of a policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdcore.engine.request import Request


class SJFPolicy:
    """Admit the request with the least prefill work first: the fewest tokens that the
    prefix cache does not already hold. Short prompts then never wait behind a long one.

    Pure SJF starves a long prompt while short ones keep arriving, so a request that has
    waited longer than `max_wait_s` counts as *overdue*: overdue requests go first, oldest
    first (FCFS among them), and everything else by uncached length, ties by arrival.
    """

    def __init__(self, max_wait_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_wait_s = max_wait_s
        self.clock = clock  # Request.arrival_time comes from time.monotonic()

    def order(
        self, waiting: Sequence[Request], cached_prefix_len: Callable[[Request], int]
    ) -> list[Request]:
        now = self.clock()

        def key(req: Request) -> tuple[bool, float, float]:
            if now - req.arrival_time > self.max_wait_s:
                return (False, req.arrival_time, req.arrival_time)  # overdue: FCFS, first
            # seq_len, not the prompt: a preempted request is recomputed with its output.
            uncached = req.seq_len - cached_prefix_len(req)
            return (True, float(uncached), req.arrival_time)

        return sorted(waiting, key=key)
