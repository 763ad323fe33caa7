"""The router's wire format and failure handling, against fake workers (test doubles that
record what the router sends). The router itself is a real `pdcore router` process."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.server_helpers import sse_events, wait_until
from tests.test_router_helpers import FakeWorker, RouterProcess, pd_flags

pytestmark = [pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[1]

TIMEOUT_S = 3  # the routers' --request-timeout-secs
SINGLE_ATTEMPT = ("--disable-retries", "--disable-circuit-breaker")


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeWorker]]:
    workers = {name: FakeWorker(name) for name in ("P0", "P1", "D0", "D1")}
    try:
        yield workers
    finally:
        for w in workers.values():
            w.stop()


LIVE_ROUTERS: list[RouterProcess] = []


def _router_idle(router: RouterProcess) -> bool:
    load = httpx.get(router.url + "/get_load", timeout=10).json()
    return all(w["router_in_flight"] == 0 for ws in load.values() for w in ws)


@pytest.fixture(autouse=True)
def _reset(fakes: dict[str, FakeWorker]) -> None:
    # A prefill leg may outlive its test's response: let it end before the next test.
    for router in LIVE_ROUTERS:
        assert wait_until(lambda r=router: _router_idle(r), timeout=10), router.log()
    for w in fakes.values():
        w.reset()


@contextlib.contextmanager
def _router(tmp: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[RouterProcess]:
    # One attempt per request and no breakers: these tests pin down how a single attempt
    # fails; retries and breakers have their own tests (test_router_gateway*.py).
    flags = (*flags, "--request-timeout-secs", str(TIMEOUT_S), *SINGLE_ATTEMPT)
    router = RouterProcess(tmp / "router.log", *flags, env=env)
    try:
        LIVE_ROUTERS.append(router.wait_ready())
        yield router
    finally:
        if router in LIVE_ROUTERS:
            LIVE_ROUTERS.remove(router)
        assert router.stop() == 0, router.log()


@pytest.fixture(scope="module")
def router(fakes, tmp_path_factory) -> Iterator[RouterProcess]:
    """One prefill (P0, bootstrap port 9001) and one decode (D0)."""
    flags = pd_flags([(fakes["P0"].url, 9001)], [fakes["D0"].url])
    with _router(tmp_path_factory.mktemp("router11"), *flags) as router:
        yield router


@pytest.fixture(scope="module")
def router22(fakes, tmp_path_factory) -> Iterator[RouterProcess]:
    """Two prefills (P0 on bootstrap port 9001, P1 with none) and two decodes."""
    p = [(fakes["P0"].url, 9001), (fakes["P1"].url, "none")]
    flags = pd_flags(p, [fakes["D0"].url, fakes["D1"].url])
    with _router(tmp_path_factory.mktemp("router22"), *flags) as router:
        yield router


@pytest.fixture()
def http(router: RouterProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=router.url, timeout=30.0) as client:
        yield client


def only_body(worker: FakeWorker) -> dict:
    # The client has decode's answer when prefill's request may still be on its way.
    assert wait_until(lambda: worker.bodies, timeout=5), f"{worker.name} got nothing"
    assert len(worker.bodies) == 1, worker.bodies
    return worker.bodies[0][1]


# --- what the workers receive ----------------------------------------------------------


def test_same_body_with_bootstrap_fields_to_both(http, fakes) -> None:
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}, "custom": [1, {"a": 2}]}
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": "answer from D0", "worker": "D0"}  # decode's answer
    sent_p, sent_d = only_body(fakes["P0"]), only_body(fakes["D0"])
    assert sent_p == sent_d
    assert {k: sent_d[k] for k in body} == body
    assert sent_d["bootstrap_host"] == "127.0.0.1" and sent_d["bootstrap_port"] == 9001
    room = sent_d["bootstrap_room"]
    assert isinstance(room, int) and 0 <= room < 2**63
    http.post("/generate", json=body)
    assert fakes["D0"].bodies[1][1]["bootstrap_room"] != room  # a new room per request


@pytest.mark.parametrize(
    "prompt, n",
    [
        ({"text": ["a", "b", "c"]}, 3),
        ({"input_ids": [[1, 2], [3]]}, 2),
        ({"input_ids": [1, 2, 3]}, None),
        ({"text": "a"}, None),
    ],
)
def test_generate_batch_gets_one_room_per_item(http, fakes, prompt, n) -> None:
    assert http.post("/generate", json=prompt).status_code == 200
    sent = only_body(fakes["D0"])
    assert sent == only_body(fakes["P0"])
    if n is None:
        assert isinstance(sent["bootstrap_room"], int)
        return
    assert sent["bootstrap_host"] == ["127.0.0.1"] * n
    assert sent["bootstrap_port"] == [9001] * n
    rooms = sent["bootstrap_room"]
    assert len(set(rooms)) == n and all(0 <= r < 2**63 for r in rooms)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_openai_routes_and_authorization_are_forwarded(http, fakes, path) -> None:
    body = {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    r = http.post(path, json=body, headers={"Authorization": "Bearer sk-test"})
    assert r.status_code == 200, r.text
    for name in ("P0", "D0"):
        only_body(fakes[name])
        got_path, sent, headers = fakes[name].bodies[0]
        assert got_path == path and headers["authorization"] == "Bearer sk-test"
        assert isinstance(sent["bootstrap_room"], int) and sent["bootstrap_port"] == 9001


def test_round_robin_pairs_and_null_bootstrap_port(router22, fakes) -> None:
    with httpx.Client(base_url=router22.url, timeout=30.0) as c:
        answers = [c.post("/generate", json={"text": "x"}).json()["worker"] for _ in range(4)]
    assert answers == ["D0", "D1", "D0", "D1"]
    counts = lambda: [len(fakes[n].bodies) for n in ("P0", "P1", "D0", "D1")]  # noqa: E731
    assert wait_until(lambda: counts() == [2, 2, 2, 2], timeout=5), counts()
    assert fakes["P1"].bodies[0][1]["bootstrap_port"] is None  # `--prefill URL none`
    assert fakes["D1"].bodies[0][1]["bootstrap_port"] is None  # paired with P1
    assert fakes["D0"].bodies[0][1]["bootstrap_port"] == 9001


def test_legs_start_together_and_decode_answer_is_not_held(http, fakes) -> None:
    fakes["P0"].delay = 1.5
    t0 = time.monotonic()
    r = http.post("/generate", json={"text": "x"})
    assert r.status_code == 200 and r.json()["worker"] == "D0"
    assert time.monotonic() - t0 < 1.2  # decode answered; prefill finishes on its own
    assert wait_until(lambda: fakes["P0"].arrivals, timeout=5)
    assert abs(fakes["D0"].arrivals[0] - fakes["P0"].arrivals[0]) < 0.5
    assert wait_until(lambda: fakes["P0"].active == 0, timeout=5)
    assert fakes["P0"].aborted == 0  # prefill was left to finish, not cancelled


def test_stream_relays_decode_events(http, fakes) -> None:
    fakes["D0"].events = fakes["P0"].events = 4
    with http.stream("POST", "/generate", json={"text": "x", "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events == [*({"text": f"D0 {i}", "index": i} for i in range(4)), "[DONE]"]
    assert only_body(fakes["P0"])["stream"] is True  # prefill streams too, and is drained
    assert wait_until(lambda: fakes["P0"].active == 0, timeout=5) and fakes["P0"].aborted == 0


def test_third_party_policy_from_the_docs(fakes, tmp_path) -> None:
    """docs/router.md's StickyPolicy, installed as a plugin package, picks the decodes."""
    doc = (ROOT / "docs" / "router.md").read_text(encoding="utf-8")
    source = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "class Sticky" in b)
    site = tmp_path / "site"
    (site / "my_pdcore_policy").mkdir(parents=True)
    (site / "my_pdcore_policy" / "__init__.py").write_text(source)
    info = site / "my_pdcore_policy-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-pdcore-policy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pdcore]\nsticky = my_pdcore_policy\n")
    p = [fakes["P0"].url, fakes["P1"].url]
    flags = pd_flags(p, [fakes["D0"].url, fakes["D1"].url], "--policy", "sticky")
    env = {"PYTHONPATH": str(site), "PDCORE_PLUGINS": "sticky"}
    with _router(tmp_path, *flags, env=env) as router:
        for user in ["alice", "bob", "carol"] * 3:
            r = httpx.post(router.url + "/generate", json={"text": "x", "user": user}, timeout=30)
            assert r.status_code == 200, r.text
    for user in ("alice", "bob", "carol"):
        decodes = {n for n in ("D0", "D1") for _, b, _ in fakes[n].bodies if b["user"] == user}
        assert len(decodes) == 1, (user, decodes)
    assert wait_until(lambda: len(fakes["P0"].bodies) + len(fakes["P1"].bodies) == 9, timeout=5)


# --- failures ----------------------------------------------------------------------------


def test_decode_5xx_is_a_502_naming_decode_and_cancels_prefill(http, fakes) -> None:
    fakes["D0"].status, fakes["P0"].delay = 500, 20
    t0 = time.monotonic()
    r = http.post("/generate", json={"text": "x"})
    assert time.monotonic() - t0 < 5
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "decode_failed" and err["type"] == "server_error"
    assert "decode leg" in err["message"] and fakes["D0"].url in err["message"]
    assert "HTTP 500: D0 says no (500)" in err["message"]
    assert wait_until(lambda: fakes["P0"].aborted == 1, timeout=5), "prefill not cancelled"


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_5xx_before_decode_answers_is_a_502(http, fakes, stream) -> None:
    fakes["P0"].status, fakes["D0"].delay = 503, 20
    r = http.post("/generate", json={"text": "x", "stream": stream})
    assert r.status_code == 502  # nothing was streamed yet: a plain error response
    err = r.json()["error"]
    assert err["code"] == "prefill_failed" and "HTTP 503: P0 says no (503)" in err["message"]
    assert wait_until(lambda: fakes["D0"].aborted == 1, timeout=5), "decode not cancelled"


@pytest.mark.parametrize("failing, other", [("D0", "P0"), ("P0", "D0")])
def test_a_legs_4xx_is_passed_through_and_cancels_the_other(http, fakes, failing, other):
    fakes[failing].status, fakes[other].delay = 400, 20
    r = http.post("/generate", json={"text": "x"})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": f"{failing} says no (400)",
            "type": "invalid_request_error",
            "param": None,
            "code": "fake",
        }
    }
    assert wait_until(lambda: fakes[other].aborted == 1, timeout=5)


def test_unreachable_prefill_is_a_502_naming_prefill(fakes, tmp_path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    flags = pd_flags([dead], [fakes["D0"].url], "--worker-startup-timeout-secs", "0")
    fakes["D0"].delay = 20
    with _router(tmp_path, *flags) as router:
        r = httpx.post(router.url + "/generate", json={"text": "x"}, timeout=30)
        assert r.status_code == 502
        err = r.json()["error"]
        assert err["code"] == "prefill_failed" and dead in err["message"]
        assert "prefill leg" in err["message"] and "cannot connect" in err["message"]
        # decode was cancelled: before its request arrived, or by a disconnect after
        d0 = fakes["D0"]
        assert wait_until(lambda: d0.active == 0 and d0.aborted == len(d0.bodies), timeout=5)


def test_silent_worker_times_out(http, fakes) -> None:
    fakes["D0"].delay = 30
    t0 = time.monotonic()
    r = http.post("/generate", json={"text": "x"})
    assert TIMEOUT_S - 0.5 < time.monotonic() - t0 < TIMEOUT_S + 5
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "decode leg" in message and f"no progress for {TIMEOUT_S}s" in message
    assert wait_until(lambda: fakes["D0"].aborted == 1, timeout=5)


def test_prefill_error_event_ends_the_client_stream(http, fakes) -> None:
    fakes["P0"].fail_event_at, fakes["P0"].event_delay = 2, 0.3  # fails after decode began
    fakes["D0"].events, fakes["D0"].event_delay = 50, 0.1
    with http.stream("POST", "/generate", json={"text": "x", "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == "prefill_failed" and "P0 broke at event 2" in err["message"]
    assert all("error" not in e for e in events[:-2]) and len(events) < 20
    assert wait_until(lambda: fakes["D0"].aborted == 1, timeout=5), "decode not cancelled"


def test_client_disconnect_mid_stream_cancels_both_legs(http, fakes) -> None:
    for name in ("P0", "D0"):
        fakes[name].events, fakes[name].event_delay = 200, 0.05
    with http.stream("POST", "/generate", json={"text": "x", "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert wait_until(lambda: fakes["P0"].aborted == fakes["D0"].aborted == 1, timeout=5)


def test_client_disconnect_while_waiting_cancels_both_legs(router, fakes) -> None:
    fakes["P0"].delay = fakes["D0"].delay = 20
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/generate", json={"text": "x"}, timeout=1.0)
    assert wait_until(lambda: fakes["P0"].aborted == fakes["D0"].aborted == 1, timeout=5)


@pytest.mark.parametrize(
    "raw, status, fragment",
    [
        (b"{not json", 400, "Malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b"", 400, "empty"),
    ],
)
def test_bad_bodies_are_refused_by_the_router(http, fakes, raw, status, fragment) -> None:
    r = http.post("/generate", content=raw)
    assert r.status_code == status and fragment in r.json()["error"]["message"]
    assert not fakes["D0"].bodies and not fakes["P0"].bodies


def test_unknown_route_and_method(http) -> None:
    r = http.get("/nope")
    assert r.status_code == 404 and "Not found" in r.json()["error"]["message"]
    assert http.get("/generate").status_code == 405


# --- admin routes and metrics ------------------------------------------------------------


def test_admin_routes_fan_out(router22, fakes) -> None:
    with httpx.Client(base_url=router22.url, timeout=30.0) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health_generate").status_code == 200
        fakes["D1"].health_status = 503
        r = c.get("/health_generate")
        assert r.status_code == 503 and fakes["D1"].url in r.json()["error"]["message"]
        assert c.get("/v1/models").json() == {"data": [{"id": "D0"}]}  # the first decode
        load = c.get("/get_load").json()
        assert [w["url"] for w in load["prefill"]] == [fakes["P0"].url, fakes["P1"].url]
        assert [w["load"][0]["num_reqs"] for w in load["decode"]] == [0, 0]
        info = c.get("/get_server_info").json()
        assert info["router"]["policy"] == "round_robin"
        assert info["router"]["prefill"][0] == {"url": fakes["P0"].url, "bootstrap_port": 9001}
        assert [w["server_info"] for w in info["decode"]] == [{"name": "D0"}, {"name": "D1"}]
        assert [w["bootstrap_port"] for w in info["prefill"]] == [9001, None]
        assert c.post("/flush_cache").status_code == 200
        fakes["P1"].flush_status = 400
        r = c.post("/flush_cache")
        assert r.status_code == 400 and "P1 busy" in r.json()["error"]["message"]


def test_metrics(http, fakes) -> None:
    http.post("/generate", json={"text": "x"})
    fakes["D0"].status = 500
    http.post("/generate", json={"text": "x"})
    text = http.get("/metrics").text
    assert 'pdcore_router_requests_total{route="/generate",status="200"}' in text
    assert 'pdcore_router_requests_total{route="/generate",status="502"}' in text
    p0, d0 = fakes["P0"].url, fakes["D0"].url
    assert f'pdcore_router_worker_requests_total{{role="prefill",worker="{p0}"}}' in text
    failure = f'pdcore_router_leg_failures_total{{reason="status",role="decode",worker="{d0}"}}'
    assert failure in text
    assert 'pdcore_router_request_latency_seconds_bucket{le="0.5",route="/generate"}' in text
    assert f'pdcore_router_worker_in_flight{{role="decode",worker="{d0}"}} 0.0' in text


def test_router_process_never_loads_torch(router) -> None:
    maps = Path(f"/proc/{router.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps
    assert json.loads(httpx.get(router.url + "/get_server_info").text)["router"]["mode"] == "pd"
