"""The transfer contract's helpers and its version check (no transport involved)."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest

from pdcore.disagg.transfer import (
    TRANSFER_CONTRACT_VERSION,
    ContractVersionError,
    KVLayout,
    MemoryRegion,
    RegionTable,
    TransferConfig,
    TransferError,
    checked_runs,
    coalesce_runs,
    create_transfer_backend,
    kv_page_runs,
    parse_device,
)
from pdcore.hookspecs import Register, hookimpl
from pdcore.plugins import UnknownPluginError, build_plugin_manager


def test_coalesce_merges_only_when_both_sides_continue() -> None:
    runs = [(100, 1000, 10), (110, 1010, 10), (120, 1030, 10), (130, 1040, 5), (0x10, 0x20, 1)]
    assert coalesce_runs(runs).tolist() == [[100, 1000, 20], [120, 1030, 15], [16, 32, 1]]
    assert coalesce_runs([]).shape == (0, 3)
    with pytest.raises(ValueError, match="length 0"):
        coalesce_runs([(1, 2, 0)])


def test_kv_page_runs_follow_the_pool_layout() -> None:
    local = KVLayout(k_addr=1 << 20, v_addr=2 << 20, num_layers=2, num_pages=8, page_bytes=64)
    remote = KVLayout(k_addr=5 << 20, v_addr=6 << 20, num_layers=2, num_pages=4, page_bytes=64)
    runs = kv_page_runs(local, remote, [2, 3, 7], [0, 1, 3])
    # per layer and tensor: pages 2,3 -> 0,1 coalesce; 7 -> 3 stays alone
    expected = []
    for lbase, rbase in ((1 << 20, 5 << 20), (2 << 20, 6 << 20)):
        for layer in range(2):
            expected.append([lbase + (layer * 8 + 2) * 64, rbase + (layer * 4 + 0) * 64, 128])
            expected.append([lbase + (layer * 8 + 7) * 64, rbase + (layer * 4 + 3) * 64, 64])
    assert runs.tolist() == expected
    with pytest.raises(TransferError, match="layouts differ"):
        kv_page_runs(local, KVLayout(1, 2, 2, 4, 32), [1], [1])
    with pytest.raises(ValueError, match="out of range"):
        kv_page_runs(local, remote, [1], [4])


def test_region_table_checks_ranges_and_devices() -> None:
    table = RegionTable([MemoryRegion(1000, 100), MemoryRegion(5000, 100, "cuda:1")])
    a = np.array([1000, 1050], dtype=np.uint64)
    assert table.device_of(a, np.array([10, 50], dtype=np.uint64), "remote") == "cpu"
    with pytest.raises(TransferError, match="outside"):
        table.device_of(a, np.array([10, 51], dtype=np.uint64), "remote")
    both = np.array([1000, 5000], dtype=np.uint64)
    with pytest.raises(TransferError, match="one remote device"):
        table.device_of(both, np.array([1, 1], dtype=np.uint64), "remote")
    with pytest.raises(ValueError, match="overlap"):
        table.add([MemoryRegion(1099, 2)])
    assert list(RegionTable.from_wire(table.to_wire())) == list(table)
    with pytest.raises(TransferError, match="malformed"):
        RegionTable.from_wire([["x", 1, "cpu"]])
    assert parse_device("cuda:3") == ("cuda", 3)
    with pytest.raises(ValueError):
        MemoryRegion(1, 1, "gpu")


def _registry_with(version: Any) -> Any:
    from pdcore.disagg import transfer

    class Old(transfer.TransferBackend):
        contract_version = version
        closed = False

        def close(self) -> None:
            Old.closed = True

    Old.__abstractmethods__ = frozenset()  # a stub: only the version matters here
    plugin = types.ModuleType("old_plugin")

    @hookimpl
    def pdcore_register_transfer_backends(register: Register) -> None:
        register("old", Old)

    plugin.pdcore_register_transfer_backends = pdcore_register_transfer_backends  # type: ignore[attr-defined]
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="old_plugin")
    return pm.registry("transfer_backend"), Old


def test_contract_version_mismatch_is_refused() -> None:
    registry, cls = _registry_with(TRANSFER_CONTRACT_VERSION + 1)
    with pytest.raises(ContractVersionError, match="contract 2, but this pdcore speaks version 1"):
        create_transfer_backend("old", TransferConfig(), registry=registry)
    assert cls.closed  # built, refused, and closed again
    registry, _ = _registry_with(TRANSFER_CONTRACT_VERSION)
    assert create_transfer_backend("old", registry=registry).contract_version == 1
    with pytest.raises(UnknownPluginError, match="unknown transfer backend 'olf'"):
        create_transfer_backend("olf", registry=registry)


def test_region_table_refuses_ranges_that_wrap_or_fall_between_regions():
    table = RegionTable([MemoryRegion(4096, 4096), MemoryRegion(16384, 4096)])

    def u(*xs: int) -> np.ndarray:
        return np.array(xs, dtype=np.uint64)

    assert table.device_of(u(4096, 16384), u(4096, 10), "dst") == "cpu"
    for addr, length in [(4096, 2**64 - 16), (8192, 16), (12288, 10), (4096, 4097)]:
        with pytest.raises(TransferError, match="outside"):
            table.device_of(u(addr), u(length), "dst")


def test_checked_runs_turns_caller_mistakes_into_transfer_errors():
    local = RegionTable([MemoryRegion(4096, 4096)])
    remote = RegionTable([MemoryRegion(65536, 4096)])
    arr = checked_runs([(4096, 65536, 16), (4112, 65552, 16)], local, remote)
    assert arr.tolist() == [[4096, 65536, 32]]  # coalesced
    assert checked_runs([], local, remote).shape == (0, 3)
    for bad in ([(4096, 65536, 0)], [(1, 2)], [(4096, 65536 + 4090, 16)]):
        with pytest.raises(TransferError):
            checked_runs(bad, local, remote)
    with pytest.raises(TransferError, match="remote side has no registered memory"):
        checked_runs([(4096, 65536, 16)], local, RegionTable())


def test_latency_samples_go_only_to_the_draining_reader():
    """/server_info reads stats too; only /metrics (drain_samples) may take the samples."""
    from pdcore.disagg.metrics import TransferStats

    stats = TransferStats("x")
    for i in range(3):
        stats.record(i, "prefill", True, 10, 0.1 * (i + 1), None)
    assert stats.snapshot()["transfer"]["x"]["latency_samples_s"] == []
    assert stats.snapshot()["transfer"]["x"]["transfers_total"] == 3
    assert len(stats.snapshot(drain_samples=True)["transfer"]["x"]["latency_samples_s"]) == 3
    assert stats.snapshot(drain_samples=True)["transfer"]["x"]["latency_samples_s"] == []
