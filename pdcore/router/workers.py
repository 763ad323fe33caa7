"""The router's workers: who they are, whether they may take requests, and changes at runtime.

Each worker is a `policies.Worker` (what policies see) plus the router's own bookkeeping in
a `Member`: its circuit breaker and its health-check streaks. A worker is *available* --
offered to the routing policy -- when its last health checks passed and its breaker is not
open. Removing a worker only takes it out of rotation: requests already on it keep their
reference and finish normally.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pdcore.router.policies import Worker
from pdcore.router.resilience import BreakerState, CircuitBreaker
from pdcore.router.settings import RouterSettings

logger = logging.getLogger("pdcore.router")

ROLES = ("prefill", "decode")


@dataclass(eq=False)
class Member:
    """A worker and the router's state about it."""

    worker: Worker
    breaker: CircuitBreaker
    health_failures: int = 0  # consecutive failed health checks
    health_successes: int = 0  # consecutive passed health checks
    last_error: str | None = None

    @property
    def available(self) -> bool:
        return self.worker.healthy and self.breaker.allows()

    def detail(self) -> dict[str, Any]:
        """What `GET /workers` shows for this worker."""
        w = self.worker
        return {
            "id": w.worker_id,
            "url": w.url,
            "role": w.role,
            "bootstrap_port": w.bootstrap_port,
            "healthy": w.healthy,
            "available": self.available,
            "circuit_breaker": self.breaker.state.value,
            "in_flight": w.in_flight,
            "load": w.load,
            "consecutive_failures": self.breaker.consecutive_failures,
            "consecutive_health_failures": self.health_failures,
            "last_error": self.last_error,
        }


class WorkerExists(ValueError):
    """A worker with that URL and role is registered already."""


class WorkerPool:
    """Every registered worker, in registration order, by role; ids are `prefill-N` and
    `decode-N` and never reused, so a removed worker's id cannot point at a new one."""

    def __init__(
        self,
        settings: RouterSettings,
        on_breaker_change: Callable[[Worker, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_breaker_change = on_breaker_change
        self._members: dict[str, Member] = {}
        self._ids = {role: itertools.count() for role in ROLES}

    def add(
        self,
        url: str,
        role: str,
        bootstrap_port: int | None = None,
        *,
        healthy: bool = True,
        worker_id: str | None = None,
    ) -> Member:
        """A new worker; `worker_id`: the id the supervisor gave it (`--router-processes`
        N > 1, where the supervisor numbers workers for every process), else the next one."""
        if role not in ROLES:
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        if role == "decode" and bootstrap_port is not None:
            raise ValueError("bootstrap_port is for prefill workers only")
        if self.find(url, role) is not None:
            raise WorkerExists(f"{role} worker {url} is registered already")
        if worker_id is None:
            worker_id = f"{role}-{next(self._ids[role])}"
        elif worker_id in self._members:
            raise WorkerExists(f"worker id {worker_id} is taken")
        worker = Worker(url, role, bootstrap_port, worker_id=worker_id)
        worker.healthy = healthy
        s = self.settings

        def changed(old: BreakerState, new: BreakerState) -> None:
            logger.warning("%s %s: circuit breaker %s -> %s", role, url, old.value, new.value)
            if self.on_breaker_change is not None:
                self.on_breaker_change(worker, old, new)

        breaker = CircuitBreaker(
            s.cb_failure_threshold,
            s.cb_success_threshold,
            s.cb_timeout_duration_secs,
            s.cb_window_duration_secs,
            enabled=not s.disable_circuit_breaker,
            on_change=changed,
        )
        member = Member(worker, breaker)
        self._members[worker.worker_id] = member
        return member

    def remove(self, member: Member) -> None:
        self._members.pop(member.worker.worker_id, None)

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._members.values()))

    def get(self, worker_id: str) -> Member | None:
        return self._members.get(worker_id)

    def find(self, url: str, role: str | None = None) -> Member | None:
        url = url.rstrip("/")
        for m in self._members.values():
            if m.worker.url == url and role in (None, m.worker.role):
                return m
        return None

    def member(self, worker: Worker) -> Member | None:
        """The member of a worker object (None once the worker was removed)."""
        m = self._members.get(worker.worker_id)
        return m if m is not None and m.worker is worker else None

    def workers(self, role: str) -> list[Worker]:
        """Every registered worker of `role`, available or not."""
        return [m.worker for m in self._members.values() if m.worker.role == role]

    def available(self, role: str) -> list[Worker]:
        """Workers of `role` a request may go to now: healthy, breaker not open."""
        return [m.worker for m in self._members.values() if m.worker.role == role and m.available]

    def record_result(self, worker: Worker, ok: bool) -> None:
        """A leg's outcome feeds its worker's breaker (a removed worker's is dropped)."""
        m = self.member(worker)
        if m is None:
            return
        if ok:
            m.breaker.record_success()
        else:
            m.breaker.record_failure()

    def record_health(self, member: Member, ok: bool, error: str | None = None) -> bool | None:
        """One health check's result; returns the new `healthy` when it changed, else None.

        Healthy -> unhealthy after `--health-failure-threshold` failures in a row;
        unhealthy -> healthy after `--health-success-threshold` passes in a row, which also
        closes the breaker (the worker proved itself again; a stale open breaker would keep
        it out for `--cb-timeout-duration-secs` more).
        """
        s, w = self.settings, member.worker
        if ok:
            member.health_failures = 0
            member.health_successes += 1
            member.last_error = None
            if not w.healthy and member.health_successes >= s.health_success_threshold:
                w.healthy = True
                member.breaker.reset()
                logger.warning("%s %s is healthy again: back in rotation", w.role, w.url)
                return True
            return None
        member.health_successes = 0
        member.health_failures += 1
        member.last_error = error
        if w.healthy and member.health_failures >= s.health_failure_threshold:
            w.healthy = False
            logger.warning(
                "%s %s failed %d health checks in a row (%s): out of rotation",
                w.role,
                w.url,
                member.health_failures,
                error,
            )
            return False
        return None
