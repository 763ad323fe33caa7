"""The transfer-backend conformance kit: nixl conforms, fake passes what it can, and
deliberately broken backends fail with a report naming the broken check.

The broken backends are registered through a test plugin (`Broken` below); the kit hands
the class to its receiver process, which imports it from this module (spawn).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from pdcore import hookimpl
from pdcore.disagg.transfer import TransferConfig
from pdcore.hookspecs import Register
from pdcore.plugins import UnknownPluginError, get_registry
from pdcore.testing import CHECKS, ConformanceReport, conformance_test, run_conformance
from pdcore.testing.report import DATA_CHECKS

HAVE_NIXL = "nixl" in get_registry("transfer_backend").names() and not any(
    i.name == "nixl" and not i.available for i in get_registry("transfer_backend").describe()
)
needs_nixl = pytest.mark.skipif(not HAVE_NIXL, reason="nixl not installed here")


def _nixl_class() -> Any:
    from pd_nixl.backend import NixlBackend

    return NixlBackend


def drop_every_other_run(config: TransferConfig) -> Any:
    """Writes only runs 0, 2, 4, ...: done and notified, but bytes are missing."""

    class DropRuns(_nixl_class()):  # type: ignore[misc]
        def submit(self, peer_id: str, runs: Any, notification: bytes) -> int:
            return super().submit(peer_id, list(runs)[::2], notification)

    return DropRuns(config)


def notify_before_data(config: TransferConfig) -> Any:
    """Sends the notification on its own first, then the data 500 ms later (long enough
    that a receiver slowed by a loaded machine still sees the notification first)."""

    class EarlyNotify(_nixl_class()):  # type: ignore[misc]
        def submit(self, peer_id: str, runs: Any, notification: bytes) -> int:
            super().submit(peer_id, [], notification)
            time.sleep(0.5)
            return super().submit(peer_id, runs, b"")

    return EarlyNotify(config)


def old_contract(config: TransferConfig) -> Any:
    from pd_fake.backend import FakeBackend

    class Old(FakeBackend):
        contract_version = 0

    return Old(config)


class Broken:
    """A test plugin, exactly as a third-party package would register its backends."""

    @staticmethod
    @hookimpl
    def pdcore_register_transfer_backends(register: Register) -> None:
        register("broken-drop", drop_every_other_run, description="drops every other run")
        register("broken-early", notify_before_data, description="notifies before data")
        register("broken-old", old_contract, description="contract version 0")


def assert_conforms(report: ConformanceReport, skipped: frozenset[str] = frozenset()) -> None:
    assert [r.name for r in report.results] == list(CHECKS)
    assert report.ok, report.summary()
    assert {r.name for r in report.results if r.skipped} == skipped, report.summary()


@needs_nixl
def test_nixl_passes_every_check() -> None:
    report = run_conformance("nixl")
    assert_conforms(report)
    assert "SIGKILL" in report["dead_peer"].reason


def test_fake_passes_the_checks_that_mean_something_for_it() -> None:
    from pd_fake.backend import FakeBackend

    assert FakeBackend.moves_bytes is False  # fake declares itself; nothing patched here
    report = run_conformance("fake", timeout_s=2.0)
    assert_conforms(report, skipped=DATA_CHECKS)
    assert report["byte_exact"].reason.startswith("skipped: FakeBackend declares moves_bytes")


@needs_nixl
def test_a_backend_that_drops_runs_fails_byte_exact() -> None:
    report = run_conformance("broken-drop", plugins=[Broken])
    assert not report.ok
    failed = {r.name for r in report.failures}
    assert {"byte_exact", "concurrent_rooms"} <= failed, report.summary()
    assert "scattered_writes" not in failed  # it did report done: only the bytes betray it
    assert "runs have wrong bytes" in report["byte_exact"].reason
    assert "FAIL    byte_exact" in report.summary()


@needs_nixl
def test_a_backend_that_notifies_before_data_fails_that_check() -> None:
    report = run_conformance("broken-early", plugins=[Broken])
    assert report["byte_exact"].passed, report.summary()  # the bytes do land, later
    assert report["notify_after_data"].failed
    assert "notification arrived before its data" in report["notify_after_data"].reason
    assert report["concurrent_rooms"].failed


def test_a_backend_for_another_contract_version_fails_first_check_and_blocks_the_rest() -> None:
    report = run_conformance("broken-old", plugins=[Broken])
    assert report["contract_version"].failed
    assert "implements transfer contract 0" in report["contract_version"].reason
    assert report["connect"].reason == "not run: check 'contract_version' failed first"
    assert "broken-old" not in get_registry("transfer_backend").names()  # plugin unregistered


def test_unknown_backend_raises_with_the_installed_names() -> None:
    with pytest.raises(UnknownPluginError, match="nope.*installed:.*fake"):
        run_conformance("nope")


def test_mooncake_conforms_when_installed() -> None:
    info = {i.name: i for i in get_registry("transfer_backend").describe()}
    if "mooncake" not in info:
        pytest.skip("pd_mooncake plugin not installed")
    if not info["mooncake"].available:
        pytest.skip(f"mooncake unavailable here: {info['mooncake'].reason}")
    report = run_conformance("mooncake")
    assert report.ok, report.summary()


# The one-line form a plugin's own test suite uses: one pytest item per check.
test_nixl_per_check = needs_nixl(conformance_test("nixl"))
