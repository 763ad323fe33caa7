"""Routing policies: which prefill server and which decode server serve a request.

A policy is any object with

    select(prefills: Sequence[Worker], decodes: Sequence[Worker], request: dict)
        -> tuple[int, int]          # (index into prefills, index into decodes)

made by a factory registered through `pdcore_register_routing_policies` and called with no
arguments. `select` runs on the router's event loop for every request: it must be quick and
must not block (no I/O). See docs/router.md for how to write and install one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Worker:
    """A server behind the router, as a policy sees it.

    `in_flight` is how many requests the router has open on this worker right now (kept up
    to date by the router; policies read it, never write it).
    """

    url: str
    role: str  # "prefill" or "decode"
    bootstrap_port: int | None = None
    in_flight: int = 0


class RoutingPolicy(Protocol):
    """What the router asks of a policy object."""

    def select(
        self, prefills: Sequence[Worker], decodes: Sequence[Worker], request: dict[str, Any]
    ) -> tuple[int, int]: ...


class RoundRobinPolicy:
    """Each request goes to the next prefill and the next decode server in turn.

    One counter drives both lists, so with as many prefills as decodes the pairs are fixed
    ((0, 0), (1, 1), ...) and every server gets the same share of requests.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(
        self, prefills: Sequence[Worker], decodes: Sequence[Worker], request: dict[str, Any]
    ) -> tuple[int, int]:
        n = next(self._counter)
        return n % len(prefills), n % len(decodes)
