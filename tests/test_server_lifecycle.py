"""Start-up, shutdown, API keys and a dying engine: the server process as a whole."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_helpers import ServerProcess, pid_alive, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def keyed(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    srv = ServerProcess(tiny_llama_dir, log, "--api-key", KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/get_load", "/v1/models", "/server_info", "/metrics"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", KEY, "Basic c2s="])
def test_api_key_required_except_health(keyed: ServerProcess, path: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = httpx.get(keyed.url + path, headers=headers)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["message"]
    assert (
        httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    )
    assert httpx.get(keyed.url + "/health").status_code == 200


def test_api_key_with_openai_client(keyed: ServerProcess) -> None:
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    resp = good.completions.create(model="m", prompt="hi", max_tokens=2, temperature=0)
    assert resp.usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt="hi", max_tokens=2)
    r = httpx.post(keyed.url + "/generate", json={"text": "hi"})
    assert r.status_code == 401


def test_engine_start_failure_exits_nonzero_with_its_message(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "no-such-model", tmp_path / "server.log")
    try:
        assert srv.proc.wait(120) != 0
    finally:
        srv.stop()
    log = srv.log()
    assert "engine failed to start" in log and "does not exist" in log, log


def test_busy_port_fails_fast(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        # --port given twice: argparse keeps the last, the busy one.
        srv = ServerProcess(tiny_llama_dir, tmp_path / "busy.log", "--port", str(port))
        try:
            assert srv.proc.wait(60) != 0
            assert "cannot listen" in srv.log()
        finally:
            srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server_and_engine(tiny_llama_dir: Path, tmp_path: Path, sig: int) -> None:
    srv = ServerProcess(tiny_llama_dir, tmp_path / "server.log")
    try:
        srv.wait_ready()
        engines = srv.engine_pids()
        assert len(engines) == 1
        srv.proc.send_signal(sig)
        assert srv.proc.wait(30) == 0, srv.log()
        assert wait_until(lambda: not pid_alive(engines[0]), 10)
    finally:
        srv.stop()


def test_dead_engine_turns_health_and_requests_into_503(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    srv = ServerProcess(tiny_llama_dir, tmp_path / "server.log")
    try:
        srv.wait_ready()
        (engine,) = srv.engine_pids()
        pending: dict = {}

        def call() -> None:
            body = {"text": "x", "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
            pending["r"] = httpx.post(srv.url + "/generate", json=body, timeout=60)

        worker = threading.Thread(target=call)
        worker.start()
        assert wait_until(lambda: httpx.get(srv.url + "/get_load").json()[0]["num_reqs"] == 1, 10)
        os.kill(engine, signal.SIGKILL)
        worker.join(30)
        assert not worker.is_alive()
        assert pending["r"].status_code == 503 and "error" in pending["r"].json()
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        r = httpx.post(srv.url + "/generate", json={"text": "x"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["message"]
        assert httpx.get(srv.url + "/get_load", timeout=10).status_code == 503
    finally:
        assert srv.stop() == 0, srv.log()
