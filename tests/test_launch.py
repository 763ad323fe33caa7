"""`pdcore launch` brings up router + prefill + decode, serves, and stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.server_helpers import pid_alive
from tests.test_pd_e2e import ENV, nixl_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not nixl_available, reason="the nixl transfer backend is not installed"),
]


def _descendants(pid: int) -> list[int]:
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            found.append(int(child))
            found.extend(_descendants(int(child)))
    return found


def test_launch_serves_and_stops_everything(tiny_llama_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "launch.log"
    cmd = [sys.executable, "-m", "pdcore.cli", "launch", "--port", str(port)]
    cmd += ["--model-path", str(tiny_llama_dir), "--serve-arg=--dtype=float32"]
    cmd += ["--prefill-tp", "2", "--decode-tp", "1"]  # PD across tp sizes (tiny: 2 KV heads)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + 240
            while b"ready at" not in log.read_bytes():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            assert b"prefill (tp 2) and 1 decode (tp 1)" in log.read_bytes()
            body = {"text": "Hello", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
            r = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=120)
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 8
            children = _descendants(proc.pid)
            assert len(children) >= 3  # router, prefill, decode (and their engines)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            time.sleep(1)
            assert not [pid for pid in children if pid_alive(pid)], "orphaned processes"
        finally:
            if proc.poll() is None:
                proc.kill()
                for pid in _descendants(proc.pid):
                    os.kill(pid, signal.SIGKILL)


def test_launch_refuses_an_unknown_backend() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pdcore.cli", "launch", "--backend", "moon"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert r.returncode != 0 and "--backend" in r.stderr and "nixl" in r.stderr
