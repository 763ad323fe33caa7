"""The router in front of 2 prefill + 2 decode real `pdcore serve` processes (tiny random
Llama, PD mode over the "fake" transfer backend, which moves no KV -- the tokens are noise,
the control plane is real) under a steady load of concurrent streams: kill -9 a decode,
later a prefill; the router keeps answering, shows the dead worker, and takes it back when
it restarts -- without restarting the router. And with no decode alive it answers 503 at
once without sending anything to a prefill."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.server_helpers import ServerProcess, pid_alive, wait_until
from tests.test_router_helpers import RouterProcess, pd_flags

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

START_TIMEOUT_S = 600.0  # four servers loading at once on a small shared CI machine

INTERVAL_S, THRESHOLD = 0.5, 2  # --health-check-interval-secs, --health-failure-threshold
DETECT_S = INTERVAL_S * THRESHOLD
SLACK_S = 3.0  # a loaded CI machine (2 cores, load 20+): probes run late by this much
HEALTH = (
    *("--health-check-interval-secs", str(INTERVAL_S)),
    *("--health-failure-threshold", str(THRESHOLD), "--health-success-threshold", "1"),
    *("--health-check-timeout-secs", "1"),
)
RETRY = ("--retry-initial-backoff-ms", "20", "--retry-max-backoff-ms", "200")
STREAM = {"max_new_tokens": 16, "ignore_eos": True}
# the caller's PDCORE_/SGLANG_ settings out, plugins (the fake transfer backend) in
PLUGINS_ON = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}


class Server:
    """A `pdcore serve` in PD mode on a fixed port (so a restart keeps its URL)."""

    def __init__(self, model: Path, tmp: Path, name: str, mode: str) -> None:
        self.model, self.tmp, self.name, self.mode = model, tmp, name, mode
        self.port = free_port()
        self.boot_port = free_port() if mode == "prefill" else None
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: ServerProcess | None = None
        self.starts = 0

    def start(self) -> Server:
        return self.spawn().wait()

    def wait(self) -> Server:
        assert self.proc is not None
        self.proc.wait_ready(START_TIMEOUT_S)
        return self

    def spawn(self) -> Server:
        self.starts += 1
        extra = ["--backend", "fake", "--disaggregation-mode", self.mode]
        if self.boot_port is not None:
            extra += ["--disaggregation-bootstrap-port", str(self.boot_port)]
        log = self.tmp / f"{self.name}.{self.starts}.log"
        # a later --port wins in argparse: the server keeps its port across restarts
        proc = ServerProcess(self.model, log, *extra, "--port", str(self.port), env=PLUGINS_ON)
        proc.port, proc.url = self.port, self.url
        self.proc = proc
        return self

    def kill9(self) -> float:
        """SIGKILL the server (and its engine); returns when it was killed."""
        assert self.proc is not None
        engines = self.proc.engine_pids()
        os.kill(self.proc.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for pid in engines:  # the engine would follow on its own; do not wait for it
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.stop()
        return killed_at

    def stop(self) -> None:
        if self.proc is not None:
            engines = self.proc.engine_pids()
            self.proc.stop()
            for pid in engines:
                if not wait_until(lambda pid=pid: not pid_alive(pid), timeout=10):
                    os.kill(pid, signal.SIGKILL)

    def generate_count(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("pdcore_http_requests_total{") and 'route="/generate"' in line
        )


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("pd4")
    servers = {
        "P0": Server(tiny_llama_dir, tmp, "P0", "prefill"),
        "P1": Server(tiny_llama_dir, tmp, "P1", "prefill"),
        "D0": Server(tiny_llama_dir, tmp, "D0", "decode"),
        "D1": Server(tiny_llama_dir, tmp, "D1", "decode"),
    }
    try:
        for s in servers.values():  # all four load at once
            s.spawn()
        for s in servers.values():
            s.wait()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@dataclass
class Result:
    started: float
    ok: bool
    detail: str


@dataclass
class Load:
    """`clients` threads, each sending one stream after another until stopped."""

    url: str
    clients: int = 4
    results: list[Result] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def one(self, client: httpx.Client, i: int) -> Result:
        body = {"text": f"request {i}: tell me", "sampling_params": STREAM, "stream": True}
        t0 = time.monotonic()
        try:
            with client.stream("POST", self.url + "/generate", json=body) as r:
                if r.status_code != 200:
                    return Result(t0, False, f"HTTP {r.status_code}: {r.read()[:300]!r}")
                events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        except httpx.HTTPError as exc:
            return Result(t0, False, f"{type(exc).__name__}: {exc}")
        if events[-1:] != ["[DONE]"]:
            return Result(t0, False, f"no [DONE]: {events[-2:]}")
        last = json.loads(events[-2]) if len(events) > 1 else {}
        if "error" in last:
            return Result(t0, False, f"error event: {last['error']}")
        return Result(t0, True, f"{len(events) - 1} events")

    def run(self, n: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                self.results.append(self.one(client, n * 100000 + i))
                i += 1

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(self.clients)
        ]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def since(self, t: float) -> list[Result]:
        return [r for r in list(self.results) if r.started >= t]


def _workers(url: str) -> dict[str, dict]:
    return {w["url"]: w for w in httpx.get(url + "/workers", timeout=10).json()["workers"]}


def _clear_error(r: Result) -> bool:
    """A failed request's error names the failing leg (or the missing role)."""
    return any(k in r.detail for k in ("decode_failed", "prefill_failed", "_available"))


def test_kill_a_decode_then_a_prefill_under_load_and_bring_them_back(
    cluster: dict[str, Server], tmp_path: Path
) -> None:
    c = cluster
    prefills = [(c["P0"].url, c["P0"].boot_port), (c["P1"].url, c["P1"].boot_port)]
    flags = pd_flags(prefills, [c["D0"].url, c["D1"].url], *HEALTH, *RETRY)
    router = RouterProcess(tmp_path / "router.log", *flags, "--request-timeout-secs", "30")
    report: dict[str, Any] = {}
    try:
        router.wait_ready()
        with Load(router.url) as load:
            assert wait_until(lambda: len(load.results) >= 8, timeout=60), load.results
            assert all(r.ok for r in load.results), [r.detail for r in load.results]

            for name in ("D1", "P1"):  # a decode first, later a prefill
                dead = c[name]
                killed_at = dead.kill9()
                gone = wait_until(
                    lambda d=dead: not _workers(router.url)[d.url]["healthy"], timeout=10
                )
                detected = time.monotonic() - killed_at
                assert gone and detected <= DETECT_S + SLACK_S, detected
                assert httpx.get(router.url + "/health").status_code == 200  # others serve
                dead.spawn()  # its restart loads while the survivors carry the load
                # steady load on the survivors: wait for a few requests started after
                # detection to finish (each takes seconds on a loaded machine)
                after = killed_at + DETECT_S + SLACK_S
                assert wait_until(lambda a=after: len(load.since(a)) >= 6, timeout=120)
                late = load.since(after)
                assert late and all(r.ok for r in late), [r.detail for r in late if not r.ok]
                window = [r for r in load.since(killed_at) if r not in late]
                # requests caught on the dead worker: a clear error, or retried to success
                bad = [r.detail for r in window if not r.ok and not _clear_error(r)]
                assert not bad, bad
                report[name] = {
                    "detected_s": round(detected, 2),
                    "window_ok": sum(r.ok for r in window),
                    "window_failed": sum(not r.ok for r in window),
                    "after_ok": len(late),
                }
                # back without restarting the router
                dead.wait()
                assert wait_until(
                    lambda d=dead: _workers(router.url)[d.url]["available"], timeout=15
                )
                back_at = time.monotonic()
                before = dead.generate_count()
                assert wait_until(lambda d=dead, b=before: d.generate_count() > b, timeout=20)
                report[name]["back_in_s"] = round(time.monotonic() - back_at, 2)
            time.sleep(1)
        tail = load.since(back_at)
        assert all(r.ok for r in tail), [r.detail for r in tail if not r.ok]
        metrics = httpx.get(router.url + "/metrics").text
        assert "pdcore_router_worker_health_checks_total" in metrics
        print("fault report:", json.dumps(report), f"({len(load.results)} requests)")
    finally:
        assert router.stop() == 0, router.log()


def test_no_decode_alive_is_503_at_once_and_prefill_gets_nothing(
    cluster: dict[str, Server], tmp_path: Path
) -> None:
    p0 = cluster["P0"]
    dead = f"http://127.0.0.1:{free_port()}"
    flags = pd_flags(
        [(p0.url, p0.boot_port)], [dead], *HEALTH, "--worker-startup-timeout-secs", "0"
    )
    router = RouterProcess(tmp_path / "router.log", *flags)
    try:
        router.wait_ready()
        assert wait_until(
            lambda: httpx.get(router.url + "/health").status_code == 503, timeout=DETECT_S + 5
        )
        before = p0.generate_count()
        for stream in (False, True):
            t0 = time.monotonic()
            body = {"text": "hello", "sampling_params": STREAM, "stream": stream}
            r = httpx.post(router.url + "/generate", json=body, timeout=30)
            assert time.monotonic() - t0 < 1.0
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "no_decode_available" and dead in err["message"]
        assert p0.generate_count() == before  # prefill never saw those requests
        health = httpx.get(router.url + "/health").json()["error"]["message"]
        assert "no decode server is available" in health
    finally:
        assert router.stop() == 0, router.log()
