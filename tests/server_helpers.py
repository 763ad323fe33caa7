"""Start and stop real `pdcore serve` processes for the server tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from pdcore.testing.processes import pid_alive, spawned_children
from tests.conftest import free_port

START_TIMEOUT = 180.0


class ManagedProcess:
    """A pdcore process (server or router) on a free port, its log kept in a file; stopped
    with SIGTERM, then SIGKILL, so no test leaves it behind."""

    name = "process"
    start_timeout = START_TIMEOUT

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float | None = None):
        timeout = timeout or self.start_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not healthy after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log.close()
        return self.proc.returncode


class ServerProcess(ManagedProcess):
    """`python -m pdcore.server.launch <flags>` on a free port."""

    name = "server"

    def __init__(
        self, model_path: str | Path | None, log_path: Path, *extra: str, env: dict | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "pdcore.server.launch",
            *(["--model-path", str(model_path)] if model_path else []),
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-total-tokens",
            "4096",
            *extra,
        ]
        super().__init__(args, log_path, {**os.environ, **(env or {})})

    def engine_pids(self) -> list[int]:
        """The server's spawned children (the engine; not multiprocessing's resource
        tracker)."""
        return spawned_children(self.proc.pid)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent-event stream, JSON-decoded ("[DONE]" kept)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_kill_under_load_fails_fast(server: ServerProcess, victim: int) -> None:
    """Four long generations in flight, then SIGKILL `victim` (a TP rank or PP stage of
    `server`): every request gets an error within 15 s, the server exits non-zero, the
    victim is gone. Shared by the TP and PP fault tests."""
    results: list[tuple[float, int | str]] = []

    def call() -> None:
        body = {"text": "x", "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
        try:
            r = httpx.post(server.url + "/generate", json=body, timeout=60)
            results.append((time.monotonic(), r.status_code))
        except httpx.HTTPError as exc:
            results.append((time.monotonic(), type(exc).__name__))

    workers = [threading.Thread(target=call) for _ in range(4)]
    for w in workers:
        w.start()
    assert wait_until(lambda: httpx.get(server.url + "/get_load").json()[0]["num_reqs"] == 4, 10)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for w in workers:
        w.join(20)
    assert not any(w.is_alive() for w in workers)
    assert len(results) == 4 and all(status != 200 for _, status in results), results
    assert all(at - killed < 15 for at, _ in results)
    assert wait_until(lambda: server.proc.poll() is not None, 15), server.log()
    assert server.proc.returncode != 0
    assert not pid_alive(victim)


def slow_headers_closed_after(port: int, give_up_s: float = 15.0) -> float | None:
    """Send a request's headers a byte every 0.5 s (slow-loris); seconds until the server
    closed the connection, or None if it never did within `give_up_s`."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    start = time.monotonic()
    try:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.5)
                if sock.recv(1024) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - start
            if time.monotonic() - start > give_up_s:
                return None
    finally:
        sock.close()
    return None


def slow_body_status_line(port: int) -> bytes:
    """POST /generate announcing 100 body bytes and sending 1; the first line answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        return sock.recv(4096).split(b"\r\n", 1)[0]
    finally:
        sock.close()


class NodeProcess(ManagedProcess):
    name = "node 1"


def start_two_nodes(model: Path, tmp_path: Path, *flags: str) -> tuple[ServerProcess, NodeProcess]:
    """A 2-node `pdcore serve` on one machine: node 0 (HTTP and rank 0) on 127.0.0.2, node 1
    on 127.0.0.3, so nothing may assume 127.0.0.1; `flags` say how the ranks split."""
    init = f"127.0.0.2:{free_port()}"
    common = [*flags, "--nnodes", "2", "--dist-init-addr", init]
    node0 = ServerProcess(
        model, tmp_path / "node0.log", "--host", "127.0.0.2", *common, "--node-rank", "0"
    )
    node0.url = f"http://127.0.0.2:{node0.port}"
    argv = [sys.executable, "-m", "pdcore.server.launch", "--model-path", str(model)]
    argv += ["--dtype", "float32", "--max-total-tokens", "4096", "--host", "127.0.0.3"]
    node1 = NodeProcess(
        [*argv, *common, "--node-rank", "1"], tmp_path / "node1.log", dict(os.environ)
    )
    return node0, node1
