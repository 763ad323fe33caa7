"""Flow control across the processes of `pdcore router --router-processes N`.

The limits stay global: `--max-concurrent-requests`, `--queue-size` and the token bucket of
`--rate-limit-tokens-per-second` count every process's requests, in four numbers in shared
memory (requests running, requests waiting, the bucket's tokens and when it was last
refilled) under one lock that the supervisor creates and every router process inherits.

A process's waiting requests form a FIFO of their own. While it has any, the process polls
the shared count every millisecond (`POLL_S`) and hands each freed slot to its first
waiter; a slot freed in the same process goes to its own first waiter at once. So a waiter
in one process gets a slot freed in another within about a millisecond, but the order
across processes is not strictly FIFO: whichever process looks first takes the slot. A new
request does not jump the queue: it takes a free slot at once only when nobody waits in
any process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any

from pdcore.router.admission import Limits, Ticket, TokenBucket

POLL_S = 0.001  # how often a process with waiters looks for a slot freed elsewhere

_ACTIVE, _QUEUED, _TOKENS, _STAMP = range(4)


class SharedSlots:
    """The shared numbers and their lock. Made by the supervisor, handed to each router
    process at its start (multiprocessing's spawn passes the lock and the memory)."""

    def __init__(self, ctx: BaseContext, bucket_capacity: float = 0.0) -> None:
        self.lock = ctx.Lock()
        self.values: Any = ctx.RawArray("d", 4)  # ctypes array of doubles
        self.values[_TOKENS] = bucket_capacity
        self.values[_STAMP] = time.monotonic()  # CLOCK_MONOTONIC: the same in every process


class SharedTokenBucket(TokenBucket):
    """`TokenBucket` whose tokens live in `SharedSlots`: one bucket for all processes."""

    def __init__(self, slots: SharedSlots, rate: float, capacity: float) -> None:
        super().__init__(rate, capacity)
        self.slots = slots

    def _refill_shared(self) -> float:
        """Refill (caller holds the lock); returns the tokens there now."""
        v = self.slots.values
        now = self.clock()
        tokens = min(self.capacity, v[_TOKENS] + (now - v[_STAMP]) * self.rate)
        v[_TOKENS], v[_STAMP] = tokens, now
        return float(tokens)

    def try_acquire(self, n: float = 1.0) -> bool:
        with self.slots.lock:
            if self._refill_shared() >= n:
                self.slots.values[_TOKENS] -= n
                return True
            return False

    def seconds_until(self, n: float = 1.0) -> float:
        with self.slots.lock:
            return max(0.0, (n - self._refill_shared()) / self.rate)


class SharedAdmission(Limits):
    """`Admission` with its counts in `SharedSlots` (see the module docstring). `active`
    and `queued` are the totals over all processes."""

    def __init__(
        self,
        slots: SharedSlots,
        max_concurrent: int,
        queue_size: int,
        queue_timeout_s: float,
        bucket: TokenBucket | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(max_concurrent, queue_size, queue_timeout_s, bucket, on_reject)
        self.slots = slots
        self._poller: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return int(self.slots.values[_ACTIVE])

    @property
    def queued(self) -> int:
        return int(self.slots.values[_QUEUED])

    def try_admit(self) -> Ticket | None:
        if self.bucket is not None:
            return None
        if self.max_concurrent <= 0:
            return Ticket(None)
        v = self.slots.values
        with self.slots.lock:
            if v[_ACTIVE] < self.max_concurrent and v[_QUEUED] == 0:
                v[_ACTIVE] += 1
                return Ticket(self)
        return None

    async def admit(self) -> Ticket:
        if self.bucket is not None and not self.bucket.try_acquire():
            raise self._rate_limited(self.bucket)
        if self.max_concurrent <= 0:
            return Ticket(None)
        v = self.slots.values
        with self.slots.lock:
            active, queued = int(v[_ACTIVE]), int(v[_QUEUED])
            if active < self.max_concurrent and queued == 0:
                v[_ACTIVE] += 1
                return Ticket(self)
            full = queued >= self.queue_size
            if not full:
                v[_QUEUED] += 1
        if full:
            raise self._full(active, queued)
        return await self._wait_in_line()

    def _joined(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="admission-poller")

    def _withdrawn(self) -> None:
        with self.slots.lock:
            self.slots.values[_QUEUED] -= 1

    def _grant(self) -> None:
        """Give free slots to this process's first waiters (each moves from queued to
        active in the shared counts)."""
        self._drop_done()
        live = [w for w in self._waiters if not w.done()]
        if not live:
            return
        v = self.slots.values
        with self.slots.lock:
            n = min(len(live), max(0, self.max_concurrent - int(v[_ACTIVE])))
            if n:
                v[_ACTIVE] += n
                v[_QUEUED] -= n
        for waiter in live[:n]:
            waiter.set_result(None)
        self._drop_done()

    async def _poll(self) -> None:
        """While this process has waiters: look for a free slot every POLL_S."""
        while self._waiters:
            self._grant()
            if self._waiters:
                await asyncio.sleep(POLL_S)

    def _release(self) -> None:
        with self.slots.lock:
            self.slots.values[_ACTIVE] -= 1
        if self._waiters:
            self._grant()  # our own first waiter need not wait for the poll
