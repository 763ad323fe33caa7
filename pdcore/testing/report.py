"""What a conformance run returns: one result per check, each pass, fail or skip with a reason.

Kept apart from the checks so a caller (a plugin's CI, `pdcore.testing.conformance_test`)
can inspect a report without importing the machinery that spawns processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PASS, FAIL, SKIP = "pass", "fail", "skip"

CHECKS: tuple[str, ...] = (
    "contract_version",
    "register_memory",
    "describe",
    "connect",
    "scattered_writes",
    "notification",
    "notify_only",
    "byte_exact",
    "notify_after_data",
    "concurrent_rooms",
    "abort",
    "bad_input",
    "release_close",
    "dead_peer",
)
"""Every check, in the order they run; later ones rely on the earlier ones' setup."""

DATA_CHECKS = frozenset({"byte_exact", "notify_after_data"})
"""Checks skipped for a backend that declares `moves_bytes = False` (e.g. fake)."""


class CheckFailed(Exception):
    """Raised inside a check; its message becomes the check's reason."""


class CheckSkipped(Exception):
    """Raised inside a check the backend declared not meaningful for itself."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check. `reason` says what was seen: why it failed, why it was
    skipped, or what passing measured (so a report is useful even when green)."""

    name: str
    status: str
    reason: str
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @property
    def skipped(self) -> bool:
        return self.status == SKIP

    def __str__(self) -> str:
        word = {PASS: "PASS", FAIL: "FAIL", SKIP: "skipped"}[self.status]
        return f"{word:7} {self.name:18} {self.reason} ({self.seconds:.2f} s)"


@dataclass
class ConformanceReport:
    """All results of one `run_conformance(backend)`; `ok` when no check failed."""

    backend: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check {name!r}; checks: {', '.join(CHECKS)}")

    def summary(self) -> str:
        head = f"transfer backend {self.backend!r}: " + (
            "conforms" if self.ok else f"{len(self.failures)} check(s) failed"
        )
        return "\n".join([head, *(f"  {r}" for r in self.results)])

    def __str__(self) -> str:
        return self.summary()
