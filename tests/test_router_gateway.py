"""The router as a gateway, against stub workers (FakeWorker: a tiny starlette app per
worker that records what it gets and answers as told); the router is a real `pdcore router`
process. Flow control, retries, circuit breakers, health, runtime worker registration,
the API key, request ids and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server_helpers import (
    slow_body_status_line,
    slow_headers_closed_after,
    sse_events,
    wait_until,
)
from tests.test_router_helpers import FakeWorker, RouterProcess, pd_flags

pytestmark = [pytest.mark.timeout(120)]

QUIET_HEALTH = ("--health-check-interval-secs", "60")  # no checks during a test
FAST_HEALTH = (
    *("--health-check-interval-secs", "0.2", "--health-failure-threshold", "2"),
    *("--health-success-threshold", "1", "--health-check-timeout-secs", "1"),
)
FAST_RETRY = ("--retry-initial-backoff-ms", "1", "--retry-max-backoff-ms", "10")


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeWorker]]:
    workers = {name: FakeWorker(name) for name in ("P0", "P1", "D0", "D1")}
    try:
        yield workers
    finally:
        for w in workers.values():
            w.stop()


@pytest.fixture(autouse=True)
def _reset(fakes: dict[str, FakeWorker]) -> Iterator[None]:
    for w in fakes.values():
        w.reset()
    yield
    # nothing may be left running on a worker after a test
    assert wait_until(lambda: all(w.active == 0 for w in fakes.values()), timeout=10)


@contextlib.contextmanager
def router(tmp: Path, *flags: str) -> Iterator[RouterProcess]:
    r = RouterProcess(tmp / "router.log", *flags)
    try:
        yield r.wait_ready()
    finally:
        assert r.stop() == 0, r.log()


def both(fakes: dict[str, FakeWorker], *extra: str) -> list[str]:
    """Two prefills (bootstrap ports 9001, 9002) and two decodes."""
    p = [(fakes["P0"].url, 9001), (fakes["P1"].url, 9002)]
    return pd_flags(p, [fakes["D0"].url, fakes["D1"].url], *extra)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- flow control -------------------------------------------------------------------------


def burst(url: str, n: int) -> list[httpx.Response]:
    """`n` requests sent together (one client, one connection each, all in flight at once)."""

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            calls = [client.post(url + "/generate", json={"text": f"q{i}"}) for i in range(n)]
            return list(await asyncio.gather(*calls))

    return asyncio.run(main())


def test_burst_of_20_gets_8_served_and_12_429s(fakes, tmp_path) -> None:
    for w in fakes.values():
        w.delay = 2.0  # slow: the burst arrives while the first four run
    flags = both(fakes, "--max-concurrent-requests", "4", "--queue-size", "4", *QUIET_HEALTH)
    with router(tmp_path, *flags) as r:
        answers = burst(r.url, 20)
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * 8 + [429] * 12, statuses
        for a in answers:
            if a.status_code == 429:
                err = a.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
                assert "--max-concurrent-requests 4" in err["message"]
                assert a.headers["retry-after"] == "1"
        decoded = len(fakes["D0"].bodies) + len(fakes["D1"].bodies)
        assert decoded == 8  # the rejected never reached a worker
        # nothing leaks: every worker's /get_load and the router's own count go back to 0
        assert wait_until(lambda: all(w.active == 0 for w in fakes.values()), timeout=10)
        load = httpx.get(r.url + "/get_load", timeout=10).json()
        for role in ("prefill", "decode"):
            for w in load[role]:
                assert w["load"][0]["num_reqs"] == 0 and w["router_in_flight"] == 0, load
        text = httpx.get(r.url + "/metrics").text
        assert metric(text, "pdcore_router_rejected_requests_total", reason="queue_full") == 12
        assert metric(text, "pdcore_router_requests_active") == 0
        assert metric(text, "pdcore_router_queue_depth") == 0


def test_queue_timeout_is_408_and_rate_limit_is_429(fakes, tmp_path) -> None:
    fakes["D0"].delay = fakes["D1"].delay = 3.0
    flags = both(fakes, "--max-concurrent-requests", "1", "--queue-timeout-secs", "0.5")
    with router(tmp_path, *flags, *QUIET_HEALTH) as r, ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, r.url + "/generate", json={"text": "a"}, timeout=30)
        time.sleep(0.3)
        t0 = time.monotonic()
        late = httpx.post(r.url + "/generate", json={"text": "b"}, timeout=30)
        assert time.monotonic() - t0 < 2.5
        assert late.status_code == 408, late.text
        assert late.json()["error"]["code"] == "queue_timeout"
        assert first.result().status_code == 200
    with router(tmp_path, *both(fakes, "--rate-limit", "1", *QUIET_HEALTH)) as r:
        answers = burst(r.url, 3)  # a bucket of one token: one gets in
        assert sorted(a.status_code for a in answers) == [200, 429, 429]
        limited = next(a for a in answers if a.status_code == 429).json()["error"]
        assert limited["code"] == "rate_limited" and "--rate-limit" in limited["message"]


# --- retries and circuit breakers -----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_decode_is_retried_elsewhere_with_a_new_room(fakes, tmp_path, stream) -> None:
    fakes["D0"].status = 503
    flags = both(fakes, *FAST_RETRY, *QUIET_HEALTH, "--cb-failure-threshold", "2")
    with router(tmp_path, *flags) as r, httpx.Client(base_url=r.url, timeout=30) as c:
        for _ in range(4):
            body = {"text": "x", "stream": stream}
            if stream:
                with c.stream("POST", "/generate", json=body) as resp:
                    assert resp.status_code == 200
                    events = sse_events(resp)
                assert events[-1] == "[DONE]" and events[0]["text"] == "D1 0"
            else:
                resp = c.post("/generate", json=body)
                assert resp.status_code == 200 and resp.json()["worker"] == "D1", resp.text
        # D0 failed twice: its breaker opened and it got no more requests
        assert len(fakes["D0"].bodies) == 2
        rooms = [b["bootstrap_room"] for _, b, _ in fakes["D0"].bodies + fakes["D1"].bodies]
        assert len(set(rooms)) == len(rooms)  # every attempt had its own room
        workers = {w["url"]: w for w in c.get("/workers").json()["workers"]}
        d0 = workers[fakes["D0"].url]
        assert d0["circuit_breaker"] == "open" and not d0["available"] and d0["healthy"]
        assert d0["consecutive_failures"] == 2
        text = c.get("/metrics").text
        assert metric(text, "pdcore_router_retries_total", reason="status", role="decode") == 2
        cb = metric(text, "pdcore_router_worker_cb_state", role="decode", worker=fakes["D0"].url)
        assert cb == 1
        # every prefill leg paired with the failed D0 was cancelled, none left running
        assert wait_until(lambda: fakes["P0"].active == fakes["P1"].active == 0, timeout=5)


def test_retries_stop_at_the_limit_and_4xx_is_never_retried(fakes, tmp_path) -> None:
    fakes["D0"].status = fakes["D1"].status = 500
    flags = both(fakes, *FAST_RETRY, *QUIET_HEALTH, "--retry-max-retries", "3")
    with router(tmp_path, *flags) as r:
        resp = httpx.post(r.url + "/generate", json={"text": "x"}, timeout=30)
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "decode_failed"
        assert len(fakes["D0"].bodies) + len(fakes["D1"].bodies) == 3
        text = httpx.get(r.url + "/metrics").text
        assert metric(text, "pdcore_router_retries_exhausted_total", route="/generate") == 1
        fakes["D0"].status = fakes["D1"].status = 400
        fakes["D0"].bodies.clear()
        fakes["D1"].bodies.clear()
        resp = httpx.post(r.url + "/generate", json={"text": "x"}, timeout=30)
        assert resp.status_code == 400
        assert len(fakes["D0"].bodies) + len(fakes["D1"].bodies) == 1


def test_no_retry_once_the_stream_reached_the_client(fakes, tmp_path) -> None:
    fakes["D0"].events, fakes["D0"].event_delay = 50, 0.05
    fakes["D0"].fail_event_at = 3  # D0 breaks after three events went out
    fakes["D1"].events, fakes["D1"].event_delay = 50, 0.05
    fakes["D1"].fail_event_at = 3
    with router(tmp_path, *both(fakes, *FAST_RETRY, *QUIET_HEALTH)) as r:
        body = {"text": "x", "stream": True}
        with httpx.stream("POST", r.url + "/generate", json=body, timeout=30) as resp:
            events = sse_events(resp)
        # decode's own error event is relayed like any other; nothing was retried
        assert [e["text"] for e in events[:3]] == ["D0 0", "D0 1", "D0 2"]
        assert "error" in events[3] and events[-1] == "[DONE]"
        assert len(fakes["D0"].bodies) + len(fakes["D1"].bodies) == 1


# --- health -----------------------------------------------------------------------------------


def test_health_takes_dead_workers_out_and_503_when_no_decode(fakes, tmp_path) -> None:
    with router(tmp_path, *both(fakes, *FAST_HEALTH)) as r, httpx.Client(base_url=r.url) as c:
        assert c.get("/health").status_code == 200
        fakes["D0"].live_status = 503
        assert wait_until(lambda: not _worker(c, fakes["D0"])["healthy"], timeout=5)
        assert c.get("/health").status_code == 200  # D1 still serves
        answers = {c.post("/generate", json={"text": "x"}).json()["worker"] for _ in range(4)}
        assert answers == {"D1"}
        fakes["D1"].live_status = 503
        assert wait_until(lambda: c.get("/health").status_code == 503, timeout=5)
        health = c.get("/health").json()["error"]["message"]
        assert "no decode server is available" in health
        assert c.get("/readiness").json()["decode"] == {"registered": 2, "available": 0}
        sent_to_prefill = len(fakes["P0"].bodies) + len(fakes["P1"].bodies)
        t0 = time.monotonic()
        resp = c.post("/generate", json={"text": "x"})
        assert time.monotonic() - t0 < 1.0
        assert resp.status_code == 503
        err = resp.json()["error"]
        assert err["code"] == "no_decode_available" and fakes["D0"].url in err["message"]
        time.sleep(0.2)
        assert len(fakes["P0"].bodies) + len(fakes["P1"].bodies) == sent_to_prefill
        fakes["D0"].live_status = fakes["D1"].live_status = 200
        assert wait_until(lambda: c.get("/health").status_code == 200, timeout=5)
        assert c.post("/generate", json={"text": "x"}).status_code == 200
        text = c.get("/metrics").text
        assert metric(text, "pdcore_router_no_available_worker_total", role="decode") == 1
        assert metric(text, "pdcore_router_worker_health", role="decode", worker=fakes["D0"].url)
        assert metric(text, "pdcore_router_workers", role="decode", state="available") == 2


def _worker(c: httpx.Client, fake: FakeWorker) -> dict:
    return next(w for w in c.get("/workers").json()["workers"] if w["url"] == fake.url)


# --- runtime registration -----------------------------------------------------------------------


def test_add_and_remove_workers_at_runtime_without_dropping_requests(fakes, tmp_path) -> None:
    flags = pd_flags([(fakes["P0"].url, 9001)], [fakes["D0"].url], *QUIET_HEALTH)
    with router(tmp_path, *flags) as r, httpx.Client(base_url=r.url, timeout=30) as c:
        listed = c.get("/workers").json()
        assert [w["id"] for w in listed["workers"]] == ["prefill-0", "decode-0"]
        assert listed["stats"]["decode"] == {"registered": 1, "available": 1}
        added = c.post("/workers", json={"url": fakes["D1"].url, "role": "decode"})
        assert added.status_code == 201, added.text
        assert added.json()["id"] == "decode-1" and added.json()["healthy"]
        dup = c.post("/workers", json={"url": fakes["D1"].url, "role": "decode"})
        assert dup.status_code == 409 and dup.json()["error"]["code"] == "worker_exists"
        bad = c.post("/workers", json={"url": fakes["D1"].url, "role": "both"})
        assert bad.status_code == 400
        # SGLang's query-string form, with a bootstrap port
        q = c.post(f"/add_worker?url={fakes['P1'].url}&role=prefill&bootstrap_port=9002")
        assert q.status_code == 201 and q.json()["bootstrap_port"] == 9002
        answers = [c.post("/generate", json={"text": "x"}).json()["worker"] for _ in range(4)]
        assert sorted(answers) == ["D0", "D0", "D1", "D1"]
        assert {b["bootstrap_port"] for _, b, _ in fakes["D1"].bodies} <= {9001, 9002}
        # remove D1 while a request is on it: that request still completes
        fakes["D1"].delay = 1.5
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(c.post, "/generate", json={"text": "y"}) for _ in range(2)]
            assert wait_until(lambda: fakes["D1"].active == 1, timeout=5)
            gone = c.delete("/workers/decode-1")
            assert gone.status_code == 200 and gone.json()["in_flight"] == 1
            assert sorted(f.result().json()["worker"] for f in slow) == ["D0", "D1"]
        assert c.delete("/workers/decode-1").status_code == 404
        before = len(fakes["D1"].bodies)
        assert {c.post("/generate", json={"text": "z"}).json()["worker"] for _ in range(3)} == {
            "D0"
        }
        assert len(fakes["D1"].bodies) == before
        assert c.post(f"/remove_worker?url={fakes['P1'].url}").status_code == 200
        assert c.get("/list_workers").json() == {
            "prefill": [fakes["P0"].url],
            "decode": [fakes["D0"].url],
        }
        # a worker given by URL in the path (SGLang's /workers/{url})
        c.post("/workers", json={"url": fakes["D1"].url, "role": "decode"})
        assert c.delete(f"/workers/{fakes['D1'].url}").status_code == 200


def test_a_new_worker_that_is_down_joins_when_healthy(fakes, tmp_path) -> None:
    fakes["D1"].live_status = 503
    flags = pd_flags([fakes["P0"].url], [fakes["D0"].url], *FAST_HEALTH)
    with router(tmp_path, *flags) as r, httpx.Client(base_url=r.url, timeout=30) as c:
        added = c.post("/workers", json={"url": fakes["D1"].url, "role": "decode"}).json()
        assert not added["healthy"] and "503" in added["last_error"]
        assert {c.post("/generate", json={"text": "x"}).json()["worker"] for _ in range(3)} == {
            "D0"
        }
        fakes["D1"].live_status = 200
        assert wait_until(lambda: _worker(c, fakes["D1"])["healthy"], timeout=5)
        answers = {c.post("/generate", json={"text": "x"}).json()["worker"] for _ in range(4)}
        assert answers == {"D0", "D1"}


# --- API key, request ids ----------------------------------------------------------------------


def test_api_key_and_request_ids(fakes, tmp_path) -> None:
    flags = both(fakes, "--api-key", "sk-router", *QUIET_HEALTH)
    with router(tmp_path, *flags) as r, httpx.Client(base_url=r.url, timeout=30) as c:
        assert c.get("/health").status_code == 200  # probes stay open
        for path, method in [("/generate", "POST"), ("/workers", "GET"), ("/metrics", "GET")]:
            denied = c.request(method, path, json={"text": "x"})
            assert denied.status_code == 401, path
            assert denied.json()["error"]["code"] == "invalid_api_key"
        wrong = c.post("/generate", json={"text": "x"}, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        auth = {"Authorization": "Bearer sk-router"}
        ok = c.post("/generate", json={"text": "x"}, headers={**auth, "X-Request-ID": "req-42"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-42"
        assert wait_until(lambda: fakes["P0"].bodies, timeout=5)
        for name in ("P0", "D0"):
            headers = fakes[name].bodies[0][2]
            assert headers["x-request-id"] == "req-42"
            assert headers["authorization"] == "Bearer sk-router"
        gen = c.post("/generate", json={"text": "x"}, headers=auth)
        rid = gen.headers["x-request-id"]
        assert len(rid) == 32 and fakes["D1"].bodies[0][2]["x-request-id"] == rid
        assert c.get("/workers", headers=auth).status_code == 200


def test_slow_headers_are_cut_off_and_a_slow_body_is_408(fakes, tmp_path) -> None:
    """Slow-loris defence: the header deadline holds though every byte restarts uvicorn's
    keep-alive timer; a body that does not arrive in time is a 408, and no worker saw it."""
    timeouts = ("--http-header-timeout", "2", "--http-body-timeout", "2")
    with router(tmp_path, *both(fakes, *QUIET_HEALTH, *timeouts)) as r:
        closed_after = slow_headers_closed_after(r.port)
        assert closed_after is not None and closed_after < 8, closed_after
        t0 = time.monotonic()
        assert slow_body_status_line(r.port).startswith(b"HTTP/1.1 408")
        assert 1.5 < time.monotonic() - t0 < 8
        assert not any(w.bodies for w in fakes.values())
        assert httpx.get(r.url + "/health").status_code == 200  # the router still serves


def test_metrics_names(fakes, tmp_path) -> None:
    with router(tmp_path, *both(fakes, *QUIET_HEALTH)) as r:
        with httpx.stream("POST", r.url + "/generate", json={"text": "x", "stream": True}) as s:
            assert sse_events(s)[-1] == "[DONE]"
        text = httpx.get(r.url + "/metrics").text
    assert metric(text, "pdcore_router_ttft_seconds_count", route="/generate") == 1
    assert (
        metric(text, "pdcore_router_worker_selections_total", role="decode", worker=fakes["D0"].url)
        == 1
    )
    for name in (
        "pdcore_router_requests_total",
        "pdcore_router_request_latency_seconds_bucket",
        "pdcore_router_worker_in_flight",
        "pdcore_router_worker_cb_state",
        "pdcore_router_worker_health",
        "pdcore_router_workers",
        "pdcore_router_requests_active",
        "pdcore_router_queue_depth",
    ):
        assert name in text, name
