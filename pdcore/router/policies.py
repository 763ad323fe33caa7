"""Routing policies: which worker of one role (prefill or decode) serves a request.

A policy picks one worker from a list of *available* workers (healthy, breaker closed) of
one role. The router holds one policy object per role (`--prefill-policy`,
`--decode-policy`, both defaulting to `--policy`), each made by a factory registered
through `pdcore_register_routing_policies` and called as `factory(role=..., settings=...)`
(`settings` is the router's `RouterSettings`; a policy reads its own thresholds there).

    select(workers: Sequence[Worker], request: RouteRequest) -> int   # index into workers

`select` runs on the router's event loop for every request: it must be quick and must not
block (no I/O). A policy that needs to learn something from the workers (their cached
prefixes, say) may also define

    async def run(self, client: httpx.AsyncClient, workers: Callable[[], Sequence[Worker]])

which the router starts as a background task at start-up and cancels at shutdown; and

    def forget(self, worker: Worker) -> None

called when a worker is removed, so per-worker state does not outlive it.
See docs/router.md for how to write and install one.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(eq=False)
class Worker:
    """A server behind the router, as a policy sees it.

    The router keeps these fields up to date; policies read them, never write them.
    `in_flight`: requests the router has open on this worker right now. `load`: the worker's
    last `/get_load` answer summed over its dp ranks (`num_reqs`, `num_waiting_reqs`,
    `num_tokens`), or None before the first poll.
    """

    url: str
    role: str  # "prefill" or "decode"
    bootstrap_port: int | None = None
    in_flight: int = 0
    worker_id: str = ""
    healthy: bool = True
    load: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at: the request body and its prompt as one string.

    `text` is the prompt the way a prefix cache would see it: `text` or `prompt` as given,
    chat messages' contents joined in order, or token ids joined with spaces; "" when the
    body has none (a /generate batch routes on its first item).
    """

    body: dict[str, Any]
    text: str = ""


class RoutingPolicy(Protocol):
    """What the router asks of a policy object."""

    def select(self, workers: Sequence[Worker], request: RouteRequest) -> int: ...


class RoundRobinPolicy:
    """Each request goes to the next worker in turn (one counter per role)."""

    def __init__(self, role: str = "", settings: Any = None) -> None:
        self._counter = itertools.count()

    def select(self, workers: Sequence[Worker], request: RouteRequest) -> int:
        return next(self._counter) % len(workers)


class RandomPolicy:
    """A uniformly random worker: no state, no coordination between routers."""

    def __init__(self, role: str = "", settings: Any = None) -> None:
        self._random = random.Random()

    def select(self, workers: Sequence[Worker], request: RouteRequest) -> int:
        return self._random.randrange(len(workers))
