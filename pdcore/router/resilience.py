"""Fault handling of the router: per-worker circuit breakers and the retry backoff schedule.

A breaker keeps the router from sending request after request to a worker that keeps
failing them, before the health checker (which probes only every few seconds) notices. A
retry gives a request that failed *before anything reached the client* a second chance on
other workers, after a pause that grows exponentially and is jittered, so that many
requests failing together do not hit the survivors in one wave.

Both take a `clock` so the tests can drive time; the router uses `time.monotonic`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from enum import Enum

Clock = Callable[[], float]

# HTTP statuses worth another attempt: the worker is overloaded or broken, not the request.
RETRYABLE_STATUSES = frozenset({408, 429})
# LegError reasons that say the worker (not the client's input) failed.
WORKER_FAULTS = frozenset({"connect", "timeout", "closed", "error_event"})


def is_worker_fault(reason: str, status: int | None) -> bool:
    """True when a leg's failure counts against its worker (breaker) and may be retried:
    transport errors, an error event in a stream, 5xx, 408 and 429 -- never another 4xx,
    which is the client's mistake and would fail the same way anywhere."""
    if reason in WORKER_FAULTS:
        return True
    return status is not None and (status >= 500 or status in RETRYABLE_STATUSES)


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Prometheus encoding of the state, as SGLang's router exports it.
BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}


class CircuitBreaker:
    """closed -> open after `failure_threshold` failures in a row (a streak is forgotten
    when its last failure is older than `window_s`); open -> half_open once `timeout_s` has
    passed (checked lazily, when someone asks `allows()`); half_open -> closed after
    `success_threshold` successes in a row, or straight back to open on any failure.

    A disabled breaker (`enabled=False`) never opens but still counts, for `/workers`.
    """

    def __init__(
        self,
        failure_threshold: int,
        success_threshold: int,
        timeout_s: float,
        window_s: float,
        *,
        enabled: bool = True,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_s = timeout_s
        self.window_s = window_s
        self.enabled = enabled
        self.clock = clock
        self.on_change = on_change
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self._last_failure = float("-inf")
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose timeout has passed reads half_open)."""
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.timeout_s:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allows(self) -> bool:
        """May a request go to this worker now? (half_open lets requests through as probes.)"""
        return self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.consecutive_successes += 1
        if (
            self.state is BreakerState.HALF_OPEN
            and self.consecutive_successes >= self.success_threshold
        ):
            self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        now = self.clock()
        if now - self._last_failure > self.window_s:
            self.consecutive_failures = 0  # the old streak is too old to count
        self._last_failure = now
        self.consecutive_failures += 1
        self.consecutive_successes = 0
        if not self.enabled:
            return
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold
        ):
            self._opened_at = now
            self._move(BreakerState.OPEN)

    def reset(self) -> None:
        """Back to closed with clean counts (the health checker saw the worker come back)."""
        self.consecutive_failures = self.consecutive_successes = 0
        self._move(BreakerState.CLOSED)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is not new:
            self.consecutive_successes = 0
            if self.on_change is not None:
                self.on_change(old, new)


class Backoff:
    """Pause before retry n (n = 1, 2, ...): initial * multiplier**(n-1), at most max_s,
    then scaled by a random factor in [1 - jitter, 1 + jitter]."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        multiplier: float,
        jitter: float,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng or random.Random()

    def base(self, retry: int) -> float:
        """The pause before retry `retry` without jitter."""
        return min(self.max_s, self.initial_s * self.multiplier ** (retry - 1))

    def delay(self, retry: int) -> float:
        spread = self.jitter * (2 * self._rng.random() - 1)
        return max(0.0, self.base(retry) * (1 + spread))
