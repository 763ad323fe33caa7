"""Plugins' settings on `pdcore serve` (hook pdcore_register_settings): --help sections,
validation at flag parsing, flags handed on as env vars, docs in step; and the transfer
queues' slicing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pdcore import hookimpl
from pdcore.plugins import PluginError, build_plugin_manager, reset_plugin_manager
from pdcore.settings import parse_serve_args
from pdcore.settings_base import PdcoreSettings, setting
from pdcore.settings_docs import update_doc

ROOT = Path(__file__).resolve().parents[1]
MOONCAKE_ENV = "SGLANG_MOONCAKE_CUSTOM_MEM_POOL"
PLUGIN_ENVS = (
    MOONCAKE_ENV,
    "PDCORE_MOONCAKE_CUSTOM_MEM_POOL",
    "PDCORE_DISAGGREGATION_NIXL_BACKEND",
    "SGLANG_DISAGGREGATION_NIXL_BACKEND",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch):
    for name in PLUGIN_ENVS:
        monkeypatch.delenv(name, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdcore.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_has_a_section_per_plugin_with_env_names():
    out = _serve("--help").stdout
    assert "Plugin mooncake (pd-mooncake): Mooncake transfer backend settings:" in out
    assert "--mooncake-custom-mem-pool" in out and MOONCAKE_ENV in out
    assert "Plugin nixl (pd-nixl): NIXL transfer backend settings:" in out
    assert "SGLANG_DISAGGREGATION_NIXL_BACKEND" in out
    assert "Plugin ascend (pd-ascend)" in out and "ASCEND_MF_STORE_URL" in out


def test_bad_plugin_env_var_is_one_line_naming_it_and_the_accepted_values():
    r = _serve("--disaggregation-mode", "prefill", env={MOONCAKE_ENV: "bogus"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pdcore serve: error: --mooncake-custom-mem-pool (env ")
    assert MOONCAKE_ENV in lines[0] and "NVLINK, BAREX, INTRA_NODE_NVLINK, True" in lines[0]


def test_true_means_nvlink_as_in_sglang(monkeypatch: pytest.MonkeyPatch):
    import pd_mooncake.mem_pool as mem_pool
    from pd_mooncake.settings import MooncakeSettings

    monkeypatch.setattr(mem_pool, "unavailable_reason", lambda pool: None)
    for spelling in ("True", "true", "nvlink"):
        monkeypatch.setenv(MOONCAKE_ENV, spelling)
        assert MooncakeSettings().mooncake_custom_mem_pool == "NVLINK"


def test_custom_pool_refused_where_mooncake_has_no_cuda_build():
    from pd_mooncake.mem_pool import unavailable_reason

    reason = unavailable_reason("NVLINK")
    if reason is None:
        pytest.skip("this machine has Mooncake's CUDA build and a GPU")
    r = _serve("--disaggregation-mode", "prefill", env={MOONCAKE_ENV: "True"})
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and f"{MOONCAKE_ENV}=NVLINK" in line and "CUDA" in line


def test_flag_is_handed_to_the_plugin_as_its_env_var():
    try:
        parse_serve_args(["--disaggregation-nixl-backend", "LIBFABRIC"])
        assert os.environ["PDCORE_DISAGGREGATION_NIXL_BACKEND"] == "LIBFABRIC"
        from pd_nixl.settings import NixlSettings

        assert NixlSettings().disaggregation_nixl_backend == "LIBFABRIC"
    finally:
        os.environ.pop("PDCORE_DISAGGREGATION_NIXL_BACKEND", None)


def test_default_transfer_backend_is_mooncake_as_in_the_reference():
    assert parse_serve_args([]).disaggregation_transfer_backend == "mooncake"


def test_a_plugin_setting_may_not_take_a_core_flag():
    class Clash(PdcoreSettings):
        """Clashing settings."""

        port: int = setting(1, "a second --port")

    class Plugin:
        @hookimpl
        def pdcore_register_settings(self, register):
            register(Clash)

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Plugin(), name="clash-test")
    reset_plugin_manager(pm)
    with pytest.raises(PluginError, match="'port'"):
        parse_serve_args([])


def test_configuration_doc_lists_every_plugin_setting():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert update_doc(text) == text, "run `python -m pdcore.settings_docs docs/configuration.md`"
    assert "`SGLANG_MOONCAKE_CUSTOM_MEM_POOL`" in text


def test_transfer_queue_slices_split_bytes_at_run_boundaries():
    import threading

    from pdcore.disagg.transfer_queues import TransferQueues, is_part, pack_part

    assert is_part(pack_part(7)) and not is_part(b"\x80") and not is_part(b"")
    runs = np.array([(i * 100, i * 100, 100) for i in range(10)], dtype=np.uint64)

    class NoBackend:  # only _slices is exercised; threads idle on empty queues
        pass

    tq = TransferQueues(NoBackend(), threading.RLock(), queue_size=2, thread_pool_size=8)  # type: ignore[arg-type]
    try:
        slices = tq._slices(runs)
        assert len(slices) == 4 and sum(len(s) for s in slices) == 10
        assert np.array_equal(np.concatenate(slices), runs)
        assert [tq.queue_of(p) for p in ("a", "b", "c", "a")] == [0, 1, 0, 0]
    finally:
        tq.close()
