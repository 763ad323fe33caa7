"""Availability on this machine, computed from the real environment: check(), what
`pdcore plugins` prints, the real transports' failures, and the conformance kit's answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pd_ascend
import pytest
from pd_ascend import probe

from pdcore.registry import PluginUnavailableError

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
PDCORE = Path(sys.executable).with_name("pdcore")
NO_DRIVER = probe.driver_problem() is not None
needs_no_driver = pytest.mark.skipif(not NO_DRIVER, reason="this machine has an Ascend driver")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "ASCEND" not in k}
    return {**env, **extra}


@needs_no_driver
def test_check_says_why_not_here(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if "ASCEND" in k]:
        monkeypatch.delenv(k)
    reason = pd_ascend.check()
    assert reason is not None
    root = probe.driver_root()
    assert f"Ascend driver not found (no {root / 'driver' / 'version.info'})" in reason
    if probe.memfabric_problem() is None:  # memfabric is a dependency on Linux x86_64/aarch64
        assert reason.startswith("memfabric-hybrid ") and "is installed but cannot start" in reason
    # Fixing the driver would reveal the rest: all found, most basic first.
    found = probe.problems()
    assert found[0] == reason
    assert any("ASCEND_MF_STORE_URL is not set" in p for p in found)
    if probe.cann_problem():
        assert any(p.startswith("CANN not found") for p in found)


def test_driver_probe_reads_the_install_info(tmp_path: Path) -> None:
    info = tmp_path / "ascend_install.info"
    info.write_text("UserName=HwHiAiUser\nDriver_Install_Path_Param=/opt/ascend\n")
    assert probe.driver_root(info) == Path("/opt/ascend")
    assert probe.driver_root(tmp_path / "missing") == Path("/usr/local/Ascend")
    (tmp_path / "driver").mkdir()
    assert "Ascend driver not found" in (probe.driver_problem(tmp_path, tmp_path) or "")
    (tmp_path / "driver" / "version.info").write_text("Version=24.1.0\n")
    assert "no NPU device nodes" in (probe.driver_problem(tmp_path, tmp_path) or "")
    (tmp_path / "davinci_manager").touch()
    assert probe.driver_problem(tmp_path, tmp_path) is None


def test_mooncake_ascend_detection(tmp_path: Path) -> None:
    (tmp_path / "engine.so").write_bytes(b"\0ELF..N8mooncake12TcpTransportE..")
    assert not probe.mooncake_has_ascend(tmp_path)
    (tmp_path / "engine.so").write_bytes(b"\0ELF..N8mooncake21AscendDirectTransportE..")
    assert probe.mooncake_has_ascend(tmp_path)
    spec = __import__("importlib.util").util.find_spec("mooncake")
    if spec is None:
        pytest.skip("mooncake not installed here")
    # The PyPI wheels are built without USE_ASCEND_DIRECT.
    assert not probe.mooncake_has_ascend(Path(next(iter(spec.submodule_search_locations))))


@needs_no_driver
def test_mooncake_mode_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE", "true")
    reason = pd_ascend.check()
    assert reason is not None
    assert "-DUSE_ASCEND_DIRECT=ON" in reason or "Ascend driver not found" in reason
    monkeypatch.setenv("ASCEND_MF_STORE_URL", "tcp//oops")
    assert pd_ascend.check() == (
        "invalid setting: ASCEND_MF_STORE_URL='tcp//oops' is malformed: expected tcp://HOST:PORT "
        '(or etcd://HOST:PORT[#ID], reg://HOST:PORT[#ID]), e.g. ASCEND_MF_STORE_URL="tcp://192.168.1.1:50000"'
    )


@needs_no_driver
def test_pdcore_plugins_lists_ascend_unavailable() -> None:
    proc = subprocess.run(
        [str(PDCORE), "plugins"], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    [line] = [
        x for x in proc.stdout.splitlines() if x.split()[:3] == ["transfer", "backend", "ascend"]
    ]
    assert "unavailable" in line and "Ascend driver not found" in line


@needs_no_driver
def test_selecting_it_anyway_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if "ASCEND" in k]:
        monkeypatch.delenv(k)
    from pdcore.disagg.transfer import TransferConfig, create_transfer_backend
    from pdcore.testing import run_conformance

    with pytest.raises(PluginUnavailableError, match="'ascend' .* unavailable: .*Ascend driver"):
        create_transfer_backend("ascend", TransferConfig())
    # The conformance kit reports it unavailable instead of crashing mid-check.
    with pytest.raises(PluginUnavailableError, match="Ascend driver not found"):
        run_conformance("ascend", timeout_s=2.0)
    proc = subprocess.run(
        [sys.executable, "-m", "pdcore.testing.conformance", "ascend"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 2 and "Ascend driver not found" in proc.stderr


def _backend_here(**env: str) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "_backend_here.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(**env),
        cwd=ROOT,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT ") :])


@needs_no_driver
def test_real_memfabric_refuses_to_start_here() -> None:
    pytest.importorskip("memfabric_hybrid")
    out = _backend_here(ASCEND_MF_STORE_URL="tcp://127.0.0.1:1")
    assert out["describe"].startswith("TransferError: register_memory() first")
    assert "not a pd-ascend peer blob" in out["connect_garbage"]
    assert "not connected" in out["submit_unknown"]
    assert "moves NPU memory" in out["register_cpu"]
    # memfabric-hybrid's own initialize fails here (it logs: driver version not found).
    assert out["register_npu"].startswith(
        "TransferError: memfabric-hybrid failed to start (initialize returned -1; "
        "store tcp://127.0.0.1:1, role Prefill, NPU 0, sdma)"
    )
    assert out["closed"] == "ok"


@needs_no_driver
def test_real_mooncake_path_needs_torch_npu_here() -> None:
    pytest.importorskip("mooncake.engine", exc_type=ImportError)
    out = _backend_here(ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE="true")
    assert "moves NPU memory" in out["register_cpu"]
    assert out["register_npu"].startswith("TransferError: torch_npu cannot be imported")
    assert out["closed"] == "ok"
