"""Decode admission control with a tiny KV pool: pre-allocation never overcommits it, and a
request that finds it full waits (bounded by --disaggregation-prealloc-timeout) and then gets
a 503 -- it never hangs (SGLang #30033). Real prefill and decode processes (pd_fake)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.server_helpers import ServerProcess, wait_until
from tests.test_pd_e2e import ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

POOL_TOKENS = 64  # four 16-token pages
PROMPT = [5] * 20  # two pages


@pytest.fixture(scope="module")
def pair(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("admission")
    port = free_port()
    common = ("--backend", "fake")
    env = {**ENV, "PDCORE_DISAGGREGATION_HEARTBEAT_INTERVAL": "1"}
    prefill = ServerProcess(
        tiny_llama_dir,
        tmp / "prefill.log",
        *common,
        "--disaggregation-mode",
        "prefill",
        "--disaggregation-bootstrap-port",
        str(port),
        env=env,
    )
    decode = ServerProcess(
        tiny_llama_dir,
        tmp / "decode.log",
        *common,
        "--disaggregation-mode",
        "decode",
        "--max-total-tokens",
        str(POOL_TOKENS),
        "--disaggregation-prealloc-timeout",
        "2",
        env=env,
    )
    try:
        prefill.wait_ready(600)  # a loaded CI machine may take minutes
        decode.wait_ready(600)
        yield prefill, decode, port
    finally:
        decode.stop()
        prefill.stop()


def _body(port: int, room: int, rid: str, max_new: int = 4) -> dict[str, Any]:
    return {
        "input_ids": PROMPT,
        "rid": rid,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": port,
        "bootstrap_room": room,
    }


def _post(url: str, body: dict[str, Any], out: dict[str, Any], key: str) -> threading.Thread:
    def run() -> None:
        out[key] = httpx.post(url + "/generate", json=body, timeout=120)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_pool_waits_then_503_never_hangs_nor_overcommits(pair: Any) -> None:
    prefill, decode, port = pair
    total = httpx.get(decode.url + "/server_info").json()["max_total_tokens"]
    assert total <= POOL_TOKENS
    out: dict[str, Any] = {}
    # 1. A request sent to decode only: it pre-allocates its pages and holds them, waiting
    #    for KV that prefill never computes (the prefill leg never came).
    holder = _post(decode.url, _body(port, 101, "holder"), out, "holder")
    assert wait_until(
        lambda: httpx.get(decode.url + "/get_load").json()[0]["num_tokens"] > 0, 30
    ), "decode never pre-allocated"
    # 2. The next request (both legs) finds the pool full: it waits, then is refused with a
    #    503 at the prealloc timeout (2 s) -- long before any transfer timeout.
    start = time.monotonic()
    legs = [
        _post(decode.url, _body(port, 102, "refused"), out, "refused"),
        _post(prefill.url, _body(port, 102, "refused-p"), out, "refused-p"),
    ]
    peak = 0
    while legs[0].is_alive() and time.monotonic() - start < 30:
        peak = max(peak, httpx.get(decode.url + "/get_load").json()[0]["num_tokens"])
        time.sleep(0.05)
    legs[0].join(30)
    elapsed = time.monotonic() - start
    r = out["refused"]
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert "--disaggregation-prealloc-timeout" in err["message"]
    assert err["type"] == "service_unavailable_error"
    assert 1.5 < elapsed < 15, elapsed
    assert peak <= total, f"decode held {peak} KV tokens of a {total}-token pool"
    legs[1].join(60)
    assert out["refused-p"].status_code >= 500  # decode told prefill to drop the room
    # 3. A request that arrives while the pool is full but frees up in time is served: the
    #    holder is aborted 0.5 s after it arrived, and it completes.
    waiting = [
        _post(decode.url, _body(port, 103, "served"), out, "served"),
        _post(prefill.url, _body(port, 103, "served-p"), out, "served-p"),
    ]
    time.sleep(0.5)
    assert httpx.post(decode.url + "/abort_request", json={"rid": "holder"}).status_code == 200
    holder.join(30)
    for leg in waiting:
        leg.join(60)
    assert out["served"].status_code == 200, out["served"].text
    assert len(out["served"].json()["output_ids"]) == 4
    # Nothing held afterwards on either side.
    for srv in (decode, prefill):
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            assert wait_until(lambda: client.get("/get_load").json()[0]["num_reqs"] == 0, 30)
            assert client.post("/flush_cache").status_code == 200
            assert client.get("/get_load").json()[0]["num_tokens"] == 0
