"""--profile-prefill / --profile-decode write torch profiler traces that Perfetto can open."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pdcore.offline import Engine
from pdcore.profiling import PhaseProfiler
from pdcore.settings import ServerSettings
from tests.server_helpers import ServerProcess, wait_until


def assert_valid_trace(path: Path, phase: str, min_steps: int) -> None:
    """What Perfetto's JSON importer needs: a traceEvents list of complete events with
    name/ph/ts/pid, and our phase label on the recorded forward passes."""
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    assert isinstance(events, list) and len(events) > 10
    timed = [e for e in events if e.get("ph") == "X"]
    assert timed, "no complete ('X') events"
    for e in timed[:200]:
        assert {"name", "ts", "dur", "pid"} <= e.keys(), e
    labels = [e["name"] for e in timed if e["name"].startswith(f"pdcore.{phase}[")]
    assert len(labels) >= min_steps, labels
    # real work was recorded inside the passes, not just our labels
    assert any("aten::" in e["name"] for e in timed)


def test_settings_accept_sglang_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_PROFILE_DECODE", "1")
    monkeypatch.setenv("SGLANG_TORCH_PROFILER_DIR", "/tmp/somewhere")
    s = ServerSettings()
    assert s.profile_decode and not s.profile_prefill
    assert s.profile_dir == "/tmp/somewhere"


def test_profiler_is_off_without_flags() -> None:
    assert PhaseProfiler.from_settings(ServerSettings()) is None


def test_offline_engine_writes_one_trace_per_phase(tiny_llama_dir: Path, tmp_path: Path) -> None:
    engine = Engine(
        model_path=str(tiny_llama_dir),
        dtype="float32",
        max_total_tokens=2048,
        profile_prefill=True,
        profile_decode=True,
        profile_num_steps=2,
        profile_dir=str(tmp_path),
    )
    # two prompts in one prefill pass, then 7 decode passes (recorded in the prefill trace,
    # labelled as decode); the second call's prefill ends the prefill trace and its decode
    # passes make the decode trace
    engine.generate(["a b c d", "e f"], {"max_new_tokens": 8, "temperature": 0})
    engine.generate(["g h i j k"], {"max_new_tokens": 4, "temperature": 0})
    profiler = engine.core.profiler
    assert profiler is not None and profiler.done
    names = sorted(p.name.split("-")[0] for p in profiler.written)
    assert names == ["decode", "prefill"]
    for path in profiler.written:
        phase = path.name.split("-")[0]
        assert_valid_trace(path, phase, min_steps=2)


@pytest.mark.timeout(180)
def test_server_flags_write_traces(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    server = ServerProcess(
        tiny_llama_dir,
        tmp_path / "server.log",
        "--profile-prefill",
        "--profile-decode",
        "--profile-num-steps",
        "2",
        "--profile-dir",
        str(out),
    )
    try:
        server.wait_ready()
        r = httpx.post(
            server.url + "/generate",
            json={"text": "hello world", "sampling_params": {"max_new_tokens": 6}},
            timeout=60,
        )
        assert r.status_code == 200
        r = httpx.post(
            server.url + "/generate",
            json={"text": "and again", "sampling_params": {"max_new_tokens": 6}},
            timeout=60,
        )
        assert r.status_code == 200
        assert wait_until(lambda: len(list(out.glob("*.trace.json"))) == 2, timeout=30)
    finally:
        server.stop()
    for path in out.glob("*.trace.json"):
        phase = path.name.split("-")[0]
        assert_valid_trace(path, phase, min_steps=2)


@pytest.mark.timeout(180)
def test_a_profile_still_recording_is_written_when_the_server_stops(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM to the server reaches the engine's shutdown path (EngineCore.close)."""
    out = tmp_path / "profiles"
    server = ServerProcess(
        tiny_llama_dir,
        tmp_path / "server.log",
        "--profile-decode",
        "--profile-num-steps",
        "1000",
        "--profile-dir",
        str(out),
    )
    try:
        server.wait_ready()
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 4}}
        assert httpx.post(server.url + "/generate", json=body, timeout=60).status_code == 200
        assert not list(out.glob("*.trace.json"))  # 1000 passes not reached yet
    finally:
        server.stop()
    [path] = out.glob("decode-*.trace.json")
    assert_valid_trace(path, "decode", min_steps=3)
