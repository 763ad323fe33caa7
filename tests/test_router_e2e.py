"""The router in front of two real `pdcore serve` processes on the tiny random Llama.

The PD pipelines are not built yet, so both servers run unified: each generates the whole
answer, and the router must return the decode server's. Greedy decoding makes that answer
checkable: it equals what the decode server returns when asked directly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server_helpers import ServerProcess, pid_alive, sse_events, wait_until
from tests.test_router_helpers import RouterProcess, clean_env, pd_flags

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GREEDY = {"temperature": 0, "max_new_tokens": 12}
LONG = {"max_new_tokens": 900, "ignore_eos": True}  # keeps a request busy for a while
PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3,"]


def start_server(log: Path, *extra: str, model: Path) -> ServerProcess:
    srv = ServerProcess(model, log, "--served-model-name", "tiny", *extra, env=clean_env())
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def prefill(tiny_llama_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("p") / "prefill.log", model=tiny_llama_dir)
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def decode(tiny_llama_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("d") / "decode.log", model=tiny_llama_dir)
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


def start_router(log: Path, prefill_url: str, decode_url: str) -> RouterProcess:
    return RouterProcess(log, *pd_flags([prefill_url], [decode_url])).wait_ready()


@pytest.fixture(scope="module")
def router(prefill, decode, tmp_path_factory) -> Iterator[RouterProcess]:
    r = start_router(tmp_path_factory.mktemp("r") / "router.log", prefill.url, decode.url)
    try:
        yield r
    finally:
        assert r.stop() == 0, r.log()


def num_reqs(server: ServerProcess) -> int:
    return httpx.get(server.url + "/get_load", timeout=10).json()[0]["num_reqs"]


def idle(*servers: ServerProcess, timeout: float = 15.0) -> bool:
    return wait_until(lambda: all(num_reqs(s) == 0 for s in servers), timeout=timeout)


def strip_ids(out: Any) -> Any:
    """A response without what differs between two identical requests (ids, timings)."""
    if isinstance(out, list):
        return [strip_ids(o) for o in out]
    if isinstance(out, dict):
        drop = {"id", "e2e_latency", "created", "system_fingerprint"}
        return {k: strip_ids(v) for k, v in out.items() if k not in drop}
    return out


# --- same answers as the decode server -------------------------------------------------


def ask_generate(url: str, text: str | list[str], stream: bool) -> Any:
    body = {"text": text, "sampling_params": GREEDY, "stream": stream}
    with httpx.Client(timeout=60) as c:
        if not stream:
            r = c.post(url + "/generate", json=body)
            assert r.status_code == 200, r.text
            return strip_ids(r.json())
        with c.stream("POST", url + "/generate", json=body) as r:
            assert r.status_code == 200, r.read()
            return strip_ids(sse_events(r))


@pytest.mark.parametrize("stream", [False, True])
def test_generate_equals_decode_direct(router, decode, stream) -> None:
    with ThreadPoolExecutor(4) as pool:  # concurrent requests through the router
        via_router = list(pool.map(lambda p: ask_generate(router.url, p, stream), PROMPTS))
    assert via_router == [ask_generate(decode.url, p, stream) for p in PROMPTS]


@pytest.mark.parametrize("stream", [False, True])
def test_generate_batch_equals_decode_direct(router, decode, stream) -> None:
    # The router sends lists of bootstrap_host/port/room for a batch, as SGLang's does.
    via_router = ask_generate(router.url, PROMPTS[:2], stream)
    assert via_router == ask_generate(decode.url, PROMPTS[:2], stream)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_completions_and_chat_equal_decode_direct(router, decode, stream) -> None:
    def ask(url: str) -> tuple[str, str]:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        kw: dict[str, Any] = {"model": "tiny", "max_tokens": 10, "temperature": 0}
        if not stream:
            comp = client.completions.create(prompt="Hello there", **kw)
            chat = client.chat.completions.create(
                messages=[{"role": "user", "content": "Hi!"}], **kw
            )
            return comp.choices[0].text, chat.choices[0].message.content or ""
        comp_text = "".join(
            c.choices[0].text
            for c in client.completions.create(prompt="Hello there", stream=True, **kw)
            if c.choices
        )
        chat_text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                messages=[{"role": "user", "content": "Hi!"}], stream=True, **kw
            )
            if c.choices
        )
        return comp_text, chat_text

    via_router = ask(router.url)
    assert via_router == ask(decode.url)
    assert all(via_router)


# --- admin routes ----------------------------------------------------------------------


def test_admin_routes(router, prefill, decode) -> None:
    with httpx.Client(base_url=router.url, timeout=90) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health_generate").status_code == 200
        assert c.get("/v1/models").json() == httpx.get(decode.url + "/v1/models").json()
        info = c.get("/get_server_info").json()
        assert info["router"]["decode"] == [decode.url]
        assert [w["server_info"]["served_model_name"] for w in info["prefill"]] == ["tiny"]
        assert info["decode"][0]["server_info"]["disaggregation_mode"] == "null"
        assert c.get("/get_model_info").json()["served_model_name"] == "tiny"
        c.post("/generate", json={"text": "warm the prefix cache", "sampling_params": GREEDY})
        assert idle(prefill, decode)
        assert c.post("/flush_cache").status_code == 200
        load = c.get("/get_load").json()
        for role in ("prefill", "decode"):
            assert load[role][0]["load"][0]["num_tokens"] == 0, load  # nothing leaked
        metrics = c.get("/metrics").text
        assert 'pdcore_router_requests_total{route="/flush_cache",status="200"}' in metrics


# --- failures ----------------------------------------------------------------------------


def test_client_disconnect_mid_stream_frees_both_servers(router, prefill, decode) -> None:
    body = {"text": "Tell me a story", "sampling_params": LONG, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", router.url + "/generate", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert num_reqs(prefill) == num_reqs(decode) == 1
    assert idle(prefill, decode, timeout=10), "a leg was not cancelled"


def test_decode_400_passes_through_and_frees_prefill(prefill, tiny_llama_dir, tmp_path) -> None:
    # A decode server with a short context refuses a prompt that the prefill accepts.
    small = start_server(tmp_path / "small.log", "--context-length", "64", model=tiny_llama_dir)
    router = start_router(tmp_path / "router.log", prefill.url, small.url)
    try:
        body = {"text": "word " * 100, "sampling_params": LONG}
        direct = httpx.post(small.url + "/generate", json=body, timeout=30)
        assert direct.status_code == 400
        r = httpx.post(router.url + "/generate", json=body, timeout=30)
        assert r.status_code == 400
        assert r.json() == direct.json()
        assert idle(prefill, timeout=10), "prefill's leg was not cancelled"
    finally:
        assert router.stop() == 0, router.log()
        assert small.stop() == 0, small.log()


@pytest.mark.parametrize("stream", [False, True])
def test_killed_prefill_fails_the_request_and_frees_decode(
    decode, tiny_llama_dir, tmp_path, stream
) -> None:
    doomed = start_server(tmp_path / "doomed.log", model=tiny_llama_dir)
    engines = doomed.engine_pids()
    router = start_router(tmp_path / "router.log", doomed.url, decode.url)
    result: dict[str, Any] = {}
    started = threading.Event()  # the stream has begun (or, non-stream, the request is sent)

    def client() -> None:
        body = {"text": "Tell me a story", "sampling_params": LONG, "stream": stream}
        with (
            httpx.Client(timeout=60) as c,
            c.stream("POST", router.url + "/generate", json=body) as r,
        ):
            result["status"] = r.status_code
            if stream:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        started.set()
                        data = line[len("data: ") :]
                        events.append(data if data == "[DONE]" else json.loads(data))
                result["events"] = events
            else:
                result["body"] = json.loads(r.read())
            result["t"] = time.monotonic()

    thread = threading.Thread(target=client)
    try:
        thread.start()
        assert wait_until(lambda: num_reqs(doomed) == 1 and num_reqs(decode) == 1, timeout=30)
        assert started.wait(30) if stream else True
        killed_at = time.monotonic()
        os.kill(doomed.proc.pid, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive(), "the client was left hanging"
        assert result["t"] - killed_at < 10
        if stream:  # the stream had begun: its last events are the error and [DONE]
            assert result["status"] == 200 and result["events"][-1] == "[DONE]"
            err = result["events"][-2]["error"]
        else:
            assert result["status"] == 502
            err = result["body"]["error"]
        assert err["code"] == "prefill_failed" and doomed.url in err["message"]
        assert "prefill leg" in err["message"]
        assert idle(decode, timeout=10), "decode's leg was not cancelled"
    finally:
        thread.join(30)
        assert router.stop() == 0, router.log()
        doomed.stop()
        for pid in engines:  # the engine follows its server; never leave one behind
            if not wait_until(lambda pid=pid: not pid_alive(pid), timeout=10):
                os.kill(pid, signal.SIGKILL)
