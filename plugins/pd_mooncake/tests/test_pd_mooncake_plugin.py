"""pd_mooncake without a peer: the install hint when mooncake cannot be imported, the
transport choice from SGLang's settings, the loopback warning. Runs without mooncake too."""

from __future__ import annotations

import builtins
import logging
from typing import Any

import pd_mooncake
import pytest


def test_import_failure_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def broken(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("mooncake"):
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(pd_mooncake, "_import_error", None)
    monkeypatch.setattr(pd_mooncake.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(builtins, "__import__", broken)
    reason = pd_mooncake.check()
    assert reason is not None
    assert "pd-mooncake[cpu] (CPU) or pd-mooncake[cuda]" in reason
    assert "libcudart.so.12" in reason


def test_not_installed_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pd_mooncake.importlib.util, "find_spec", lambda name: None)
    reason = pd_mooncake.check()
    assert reason is not None and "pd-mooncake[cpu]" in reason


def test_transport_choice(caplog: pytest.LogCaptureFixture) -> None:
    from pd_mooncake.backend import choose_protocol

    assert choose_protocol("", None) == ("tcp", "")
    assert choose_protocol("NVLINK", None) == ("nvlink", "")
    assert choose_protocol("INTRA_NODE_NVLINK", None) == ("nvlink", "")
    assert choose_protocol("BAREX", "mlx5_0") == ("barex", "mlx5_0")
    with caplog.at_level(logging.WARNING):
        assert choose_protocol("", "no_such_hca_0") == ("tcp", "")  # absent device: TCP
    assert "no such RDMA device" in caplog.text


def test_settings_read_sglang_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import pd_mooncake.mem_pool
    from pd_mooncake.settings import MooncakeSettings

    # As if on a machine with Mooncake's CUDA build; elsewhere the pool is refused
    # (tests/test_plugin_settings.py checks that).
    monkeypatch.setattr(pd_mooncake.mem_pool, "unavailable_reason", lambda pool: None)
    monkeypatch.setenv("SGLANG_MOONCAKE_CUSTOM_MEM_POOL", "BAREX")
    assert MooncakeSettings().mooncake_custom_mem_pool == "BAREX"


def test_loopback_host_warns_that_mooncake_binds_everywhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("mooncake.engine", exc_type=ImportError)
    from pdcore.disagg.transfer import TransferConfig, create_transfer_backend

    with caplog.at_level(logging.WARNING, logger="pd_mooncake.backend"):
        backend = create_transfer_backend("mooncake", TransferConfig(host="127.0.0.1"))
    try:
        assert "0.0.0.0" in caplog.text
        assert backend.describe()
    finally:
        backend.close()
        backend.close()  # idempotent
