"""Built-in schedule policies: the order in which waiting requests are admitted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from pdcore.engine.request import Request


class SchedulePolicy(Protocol):
    def order(
        self, waiting: Sequence[Request], cached_prefix_len: Callable[[Request], int]
    ) -> list[Request]:
        """Return the waiting requests in the order the scheduler should try to admit them."""
        ...


class FCFSPolicy:
    """First come, first served."""

    def order(
        self, waiting: Sequence[Request], cached_prefix_len: Callable[[Request], int]
    ) -> list[Request]:
        return sorted(waiting, key=lambda r: r.arrival_time)


class LPMPolicy:
    """Longest cached prefix first: reuse hot prefixes before the cache evicts them."""

    def order(
        self, waiting: Sequence[Request], cached_prefix_len: Callable[[Request], int]
    ) -> list[Request]:
        return sorted(waiting, key=lambda r: (-cached_prefix_len(r), r.arrival_time))
