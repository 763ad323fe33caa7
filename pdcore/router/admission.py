"""Flow control at the router's door: a concurrency limit with a bounded FIFO queue, and a
token-bucket rate limit.

Workers degrade badly when flooded (their queues grow, every request's latency with them),
so the router admits at most `--max-concurrent-requests` generation requests at a time,
lets up to `--queue-size` more wait in arrival order for up to `--queue-timeout-secs`, and
answers the rest at once: 429 when the queue is full, 408 when a request waited too long.
`--rate-limit-tokens-per-second` caps how many requests are admitted per second, with a
burst of one second's worth; a request finding the bucket empty gets 429 at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from starlette.responses import JSONResponse

from pdcore.web.errors import error_body

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens a second, holding at most `capacity`; starts full."""

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self._tokens = capacity
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def try_acquire(self, n: float = 1.0) -> bool:
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def seconds_until(self, n: float = 1.0) -> float:
        """How long until `n` tokens are there (0 if they are now)."""
        self._refill()
        return max(0.0, (n - self._tokens) / self.rate)


class Rejected(Exception):
    """A request flow control turned away; `response()` is its OpenAI-style answer."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        kind = "rate_limit_error" if self.status == 429 else "timeout_error"
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after)))
        body = error_body(str(self), type=kind, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)


class AdmissionControl(Protocol):
    """What the router asks of flow control: `Admission` in one process, `SharedAdmission`
    across the processes of `--router-processes N`."""

    @property
    def active(self) -> int:
        """Requests admitted and not yet finished."""
        ...

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        ...

    def try_admit(self) -> Ticket | None: ...

    async def admit(self) -> Ticket: ...

    def _release(self) -> None: ...


class Ticket:
    """An admitted request's slot; `release()` (idempotent) hands it to the next in line."""

    def __init__(self, admission: Limits | None) -> None:
        self._admission = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release()


class Limits:
    """The settings of flow control and the answers it gives (shared by `Admission` and
    `shared_admission.SharedAdmission`)."""

    def __init__(
        self,
        max_concurrent: int,
        queue_size: int,
        queue_timeout_s: float,
        bucket: TokenBucket | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.bucket = bucket
        self.on_reject = on_reject
        self._waiters: deque[asyncio.Future[None]] = deque()  # this process's, in order

    def _release(self) -> None:
        """A slot is free again: hand it to the line or give it back (the subclass's)."""
        raise NotImplementedError

    def _joined(self) -> None:
        """A request just joined this process's line (hook)."""

    def _withdrawn(self) -> None:
        """A request left the line without a slot (timed out, cancelled) (hook)."""

    def _drop_done(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    async def _wait_in_line(self) -> Ticket:
        """Wait in this process's line until `_release` hands over a slot; 408 after
        --queue-timeout-secs. A slot that arrives just as the wait gives up is passed on."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._joined()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
                self._withdrawn()
            self._drop_done()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._timed_out() from None
        return Ticket(self)

    def _reject(self, status: int, code: str, message: str, retry_after: float | None) -> Rejected:
        if self.on_reject is not None:
            self.on_reject(code)
        return Rejected(status, code, message, retry_after)

    def _full(self, active: int, queued: int) -> Rejected:
        return self._reject(
            429,
            "queue_full",
            f"The router is at capacity: {active} requests running "
            f"(--max-concurrent-requests {self.max_concurrent}) and {queued} waiting "
            f"(--queue-size {self.queue_size}); try again shortly",
            1.0,
        )

    def _rate_limited(self, bucket: TokenBucket) -> Rejected:
        return self._reject(
            429,
            "rate_limited",
            f"Too many requests: the router admits {bucket.rate:g} requests per "
            "second (--rate-limit-tokens-per-second); try again shortly",
            bucket.seconds_until(),
        )

    def _timed_out(self) -> Rejected:
        return self._reject(
            408,
            "queue_timeout",
            f"The request waited {self.queue_timeout_s:g}s in the router's queue "
            "(--queue-timeout-secs) without a free slot; try again later",
            None,
        )


class Admission(Limits):
    """The concurrency limit and its FIFO queue, plus the optional token bucket.

    `max_concurrent <= 0` admits everything (the queue is then unused). Not thread-safe:
    it lives on the router's event loop.
    """

    def __init__(
        self,
        max_concurrent: int,
        queue_size: int,
        queue_timeout_s: float,
        bucket: TokenBucket | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(max_concurrent, queue_size, queue_timeout_s, bucket, on_reject)
        self.active = 0

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def try_admit(self) -> Ticket | None:
        """The slot at once when one is free, nobody waits and no rate limit applies, without
        a task or a wait (the common case); None: use `admit()`."""
        if self.bucket is not None:
            return None
        if self.max_concurrent <= 0:
            return Ticket(None)
        if self.active < self.max_concurrent and not self._waiters:
            self.active += 1
            return Ticket(self)
        return None

    async def admit(self) -> Ticket:
        """A slot for one request, waiting in line if need be; raises Rejected (429/408)."""
        if self.bucket is not None and not self.bucket.try_acquire():
            raise self._rate_limited(self.bucket)
        if self.max_concurrent <= 0:
            return Ticket(None)
        if self.active < self.max_concurrent and not self.queued:
            self.active += 1
            return Ticket(self)
        if self.queued >= self.queue_size:
            raise self._full(self.active, self.queued)
        return await self._wait_in_line()

    def _release(self) -> None:
        """A slot is free: give it to the first live waiter (active stays), else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1
