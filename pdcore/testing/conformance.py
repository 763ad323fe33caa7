"""The transfer-backend conformance kit: `run_conformance("nixl")` drives a real backend
between this process (the sender) and a spawned receiver process, and reports per check.

Why a kit: the control plane trusts every backend to keep the contract of
`pdcore.disagg.transfer` (bytes exact, notification only after data, bounded failure,
clear errors for caller mistakes). A backend author gets that verdict in one call instead
of rediscovering it in a PD deployment. See docs/transfer-backends.md, "Conformance kit".

A backend that cannot meaningfully run a check declares it on its class: `moves_bytes =
False` skips the byte checks; `conformance_skips = {"check": "why"}` skips any other.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from pdcore.disagg.transfer import (
    RunArray,
    TransferBackend,
    TransferConfig,
    create_transfer_backend,
)
from pdcore.testing._peer import (
    CHUNK,
    GRACE_S,
    Receiver,
    register_plugins,
    unregister_plugins,
    wait_batches,
)
from pdcore.testing.report import CHECKS, FAIL, PASS, SKIP, CheckFailed, CheckResult, CheckSkipped
from pdcore.testing.report import ConformanceReport as ConformanceReport
from pdcore.testing.runs import expected_chunk, scattered_runs

SRC_BYTES = 4 << 20


class Conformance:
    """One run against one backend; `run()` executes every check in order (see CHECKS)."""

    def __init__(self, name: str, plugins: Sequence[Any], timeout_s: float, rooms: int) -> None:
        self.name, self.timeout_s, self.rooms = name, timeout_s, rooms
        self.plugins = [p.__name__ if isinstance(p, ModuleType) else p for p in plugins]
        self.limit_s = timeout_s + GRACE_S
        self.chunks = rooms + 3  # 0: scattered; 1..rooms: concurrent; then abort + after
        self.results: list[CheckResult] = []
        self.blocked: str | None = None
        self.rng = np.random.default_rng(0)
        self.src = self.rng.integers(0, 256, SRC_BYTES, dtype=np.uint8)
        self.sender: TransferBackend | None = None
        self.batches: list[int] = []
        self.skips: dict[str, str] = {}

    # -- bookkeeping ---------------------------------------------------------------------

    def check(self, name: str, fn: Callable[[], str], *, setup: bool = False) -> None:
        """Run one check; a setup check that fails blocks the ones after it."""
        t0 = time.monotonic()
        if self.blocked is not None:
            status, reason = FAIL, f"not run: check {self.blocked!r} failed first"
        elif name in self.skips:
            status, reason = SKIP, self.skips[name]
        else:
            try:
                status, reason = PASS, fn()
            except CheckSkipped as exc:
                status, reason = SKIP, str(exc)
            except CheckFailed as exc:
                status, reason = FAIL, str(exc)
            except Exception as exc:
                status, reason = FAIL, f"unexpected {type(exc).__name__}: {exc}"
        self.results.append(CheckResult(name, status, reason, time.monotonic() - t0))
        if setup and status == FAIL and self.blocked is None:
            self.blocked = name

    def new_sender(self, local_id: str) -> TransferBackend:
        config = TransferConfig(local_id=local_id, timeout_s=self.timeout_s)
        return create_transfer_backend(self.name, config)

    def submit_room(
        self, backend: TransferBackend, peer: str, hello: dict[str, Any], chunk: int
    ) -> tuple[int, bytes, RunArray, np.ndarray]:
        """Submit a scattered batch into `chunk`; returns (batch id, payload, runs, expected)."""
        runs = scattered_runs(self.rng, len(self.src), chunk * CHUNK, CHUNK)
        base = np.array([self.src.ctypes.data, hello["addr"], 0], dtype=np.uint64)
        payload = b"room:%d:\x00\xff binary" % chunk
        batch = backend.submit(peer, runs + base, payload)
        return batch, payload, runs, expected_chunk(self.src, runs, chunk * CHUNK, CHUNK)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> ConformanceReport:
        from pdcore.plugins import get_registry
        from pdcore.testing import checks

        added = register_plugins(self.plugins)
        try:
            get_registry("transfer_backend").require(self.name)  # unknown/unavailable: raise
        except BaseException:
            unregister_plugins(added)
            raise
        receiver = Receiver(self.name, self.chunks, self.plugins, self.timeout_s)
        doomed = Receiver(self.name, 1, self.plugins, self.timeout_s)
        try:
            checks.run_all(self, receiver, doomed)
        finally:
            for r in (receiver, doomed):
                r.kill()
            if self.sender is not None:
                with contextlib.suppress(Exception):
                    self.sender.close()
            unregister_plugins(added)
        return ConformanceReport(self.name, self.results)


def run_conformance(
    backend: str,
    *,
    plugins: Sequence[Any] = (),
    timeout_s: float = 5.0,
    rooms: int = 32,
) -> ConformanceReport:
    """Run every conformance check against the transfer backend registered as `backend`.

    `plugins`: extra plugin objects (picklable: a module, a class) or module names that
    register the backend, for a backend not installed through an entry point (the receiver
    process registers them too). `timeout_s` is the backend's `TransferConfig.timeout_s`;
    a dead peer must fail within it plus 5 s. Raises PluginError (UnknownPluginError,
    PluginUnavailableError) when the backend cannot be built here at all; everything else,
    including a contract version mismatch, is a failed check in the report.
    """
    return Conformance(backend, plugins, timeout_s, rooms).run()


def conformance_test(backend: str, **kwargs: Any) -> Callable[..., None]:
    """A pytest test, parametrized over the checks, for a plugin's own test suite::

        test_conformance = conformance_test("mooncake")

    The kit runs once per backend (cached); each check is its own pytest item, skipped with
    the kit's reason when skipped, and the whole test skipped when the backend is
    unavailable here.
    """
    import pytest

    from pdcore.registry import PluginUnavailableError

    cache: dict[str, ConformanceReport | str] = {}

    @pytest.mark.parametrize("check", CHECKS)
    def test_conformance(check: str) -> None:
        if "report" not in cache:
            try:
                cache["report"] = run_conformance(backend, **kwargs)
            except PluginUnavailableError as exc:
                cache["report"] = str(exc)
        report = cache["report"]
        if isinstance(report, str):
            pytest.skip(report)
        result = report[check]
        if result.skipped:
            pytest.skip(result.reason)
        assert result.passed, f"{backend}: check {check!r} failed: {result.reason}"

    return test_conformance


__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "ConformanceReport",
    "conformance_test",
    "run_conformance",
    "wait_batches",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m pdcore.testing.conformance NAME [TIMEOUT_S]`: print the report; exit 1 on
    any failed check, 2 when the backend cannot be built here."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m pdcore.testing.conformance BACKEND [TIMEOUT_S]")
        return 2
    from pdcore.registry import PluginError

    try:
        report = run_conformance(args[0], timeout_s=float(args[1]) if len(args) > 1 else 5.0)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
