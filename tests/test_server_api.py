"""The routes of `pdcore serve`, against a real server process on the tiny random Llama."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_helpers import ServerProcess, sse_events, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GREEDY = {"temperature": 0, "max_new_tokens": 12}
LONG = {"max_new_tokens": 900, "ignore_eos": True}  # keeps a request busy for a while


@pytest.fixture(scope="module")
def server(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(tiny_llama_dir, log, "--served-model-name", "tiny")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


@pytest.fixture()
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def idle_load(http: httpx.Client) -> dict:
    """Wait until no request is in flight, then return /get_load's single entry."""
    assert wait_until(lambda: http.get("/get_load").json()[0]["num_reqs"] == 0), "still busy"
    return http.get("/get_load").json()[0]


# --- /generate ----------------------------------------------------------------------------


def test_generate_greedy_matches_offline_engine(http: httpx.Client, tiny_llama_dir: Path) -> None:
    from pdcore.offline import Engine

    r = http.post("/generate", json={"text": "The capital of France is", "sampling_params": GREEDY})
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 12
    assert meta["prompt_tokens"] > 0 and meta["e2e_latency"] > 0 and "cached_tokens" in meta
    engine = Engine(model_path=str(tiny_llama_dir), dtype="float32", max_total_tokens=4096)
    ref = engine.generate("The capital of France is", GREEDY)
    assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]


def test_generate_input_ids_batch_and_rid(http: httpx.Client) -> None:
    single = http.post("/generate", json={"text": "Hello there", "sampling_params": GREEDY}).json()
    body = {
        "input_ids": [[1, 2, 3], [4, 5]],
        "sampling_params": GREEDY,
        "rid": ["batch-a", "batch-b"],
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": None,
        "bootstrap_room": [1, 2],
        "some_future_field": {"x": 1},
    }
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    outs = r.json()
    assert isinstance(outs, list) and [o["meta_info"]["id"] for o in outs] == ["batch-a", "batch-b"]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 2]
    assert all(len(o["output_ids"]) == 12 for o in outs)
    assert isinstance(single, dict)


def test_generate_stream_is_cumulative_and_matches_non_stream(http: httpx.Client) -> None:
    body = {"text": "Once upon a time", "sampling_params": GREEDY}
    full = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2
    for a, b in zip(chunks, chunks[1:]):
        assert (
            b["text"].startswith(a["text"])
            and b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
        )
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_generate_logprobs(http: httpx.Client) -> None:
    r = http.post(
        "/generate", json={"text": "Hi", "sampling_params": GREEDY, "return_logprob": True}
    )
    out = r.json()
    lps = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"]
    assert all(isinstance(lp, float) and lp <= 0 and text is None for lp, _, text in lps)


def test_stop_token_ids_and_stop_strings(http: httpx.Client) -> None:
    base = http.post("/generate", json={"text": "Stop test", "sampling_params": GREEDY}).json()
    stop_id = base["output_ids"][3]
    first = base["output_ids"].index(stop_id)
    sp = {**GREEDY, "stop_token_ids": [stop_id]}
    out = http.post("/generate", json={"text": "Stop test", "sampling_params": sp}).json()
    assert out["output_ids"] == base["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    word = base["text"][len(base["text"]) // 2 :][:3]
    if word.strip():
        sp = {**GREEDY, "stop": [word]}
        out = http.post("/generate", json={"text": "Stop test", "sampling_params": sp}).json()
        assert word not in out["text"] and base["text"].startswith(out["text"])


def test_max_new_tokens_is_clamped_to_the_context(
    http: httpx.Client, server: ServerProcess
) -> None:
    ctx = http.get("/model_info").json()["context_length"]
    prompt = [5] * (ctx - 3)
    out = http.post(
        "/generate",
        json={"input_ids": prompt, "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}},
    ).json()
    assert out["meta_info"]["completion_tokens"] <= 3
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    for n in (ctx, ctx + 10):
        r = http.post("/generate", json={"input_ids": [5] * n})
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/generate", b"{not json", None),
        ("/generate", b"", None),
        ("/generate", b'{"text": ""}', "text"),
        ("/generate", b'{"text": 12}', "text"),
        ("/generate", b'{"input_ids": [99999999]}', "input_ids"),
        ("/generate", b'{"text": "a", "sampling_params": {"temperature": -1}}', "temperature"),
        ("/v1/completions", b'{"prompt": "a", "max_tokens": -1}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "a", "temperature": -0.1}', "temperature"),
        ("/v1/completions", b'{"prompt": "a", "top_p": 1.5}', "top_p"),
        ("/v1/completions", b'{"prompt": "a", "n": 2}', "n"),
        ("/v1/completions", b'{"prompt": ""}', "prompt"),
        ("/v1/completions", b'{"prompt": "a", "max_tokens": "ten"}', "max_tokens"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', "messages"),
        ("/abort_request", b'{"rid": 5}', "rid"),
    ],
)
def test_bad_input_is_a_400_with_openai_body(
    http: httpx.Client, path: str, body: bytes, param
) -> None:
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}
    assert http.get("/health").status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = http.delete("/generate")
    assert r.status_code == 405 and "error" in r.json()


# --- OpenAI routes, through the official client -------------------------------------------


def test_openai_completions(oai: openai.OpenAI, http: httpx.Client) -> None:
    native = http.post(
        "/generate",
        json={"text": "Hello world", "sampling_params": {**GREEDY, "max_new_tokens": 8}},
    ).json()
    resp = oai.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert resp.object == "text_completion" and resp.model == "tiny"
    assert choice.text == native["text"] and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    stream = oai.completions.create(
        model="tiny",
        prompt="Hello world",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == native["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_openai_completions_logprobs_and_batch(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(
        model="tiny", prompt=["a b", "c"], max_tokens=3, temperature=0, logprobs=1
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(len(c.logprobs.token_logprobs) == 3 for c in resp.choices)
    assert resp.usage.completion_tokens == 6


def test_openai_chat(oai: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
    ]
    resp = oai.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=6, temperature=0
    )
    msg = resp.choices[0].message
    assert resp.object == "chat.completion" and msg.role == "assistant"
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 6
    stream = oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens


def test_openai_chat_logprobs_and_models(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=1,
    )
    assert len(resp.choices[0].logprobs.content) == 3
    assert [m.id for m in oai.models.list()] == ["tiny"]


def test_openai_errors_surface_in_the_client(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt="a", max_tokens=4, n=2)
    assert "n=1" in str(info.value)


# --- admin routes -------------------------------------------------------------------------


def test_info_routes(http: httpx.Client, tiny_llama_dir: Path) -> None:
    for path in ("/server_info", "/get_server_info"):
        info = http.get(path).json()
        assert info["model_path"] == str(tiny_llama_dir)
        assert (info["tp_size"], info["dp_size"], info["disaggregation_mode"]) == (1, 1, "null")
        assert info["version"] and info["page_size"] == 16 and "api_key" not in info
    for path in ("/model_info", "/get_model_info"):
        info = http.get(path).json()
        assert info["is_generation"] is True and info["model_path"] == str(tiny_llama_dir)
        assert "tokenizer_path" in info
    load = http.get("/get_load").json()
    assert isinstance(load, list) and set(load[0]) >= {  # SGLang's keys, plus tp_size/ranks
        "dp_rank",
        "num_reqs",
        "num_waiting_reqs",
        "num_tokens",
    }
    assert http.get("/health_generate").status_code == 200


def test_metrics(http: httpx.Client) -> None:
    http.post("/generate", json={"text": "metrics", "sampling_params": GREEDY})
    text = http.get("/metrics").text
    for name in (
        'pdcore_http_requests_total{route="/generate",status="200"}',
        "pdcore_prompt_tokens_total",
        "pdcore_generation_tokens_total",
        "pdcore_time_to_first_token_seconds_bucket",
        "pdcore_inter_token_latency_seconds_bucket",
        "pdcore_e2e_request_latency_seconds_bucket",
        "pdcore_num_running_reqs",
        "pdcore_num_waiting_reqs",
        "pdcore_kv_pages_used",
        "pdcore_kv_pages_total",
    ):
        assert name in text, name
    total = [ln for ln in text.splitlines() if ln.startswith("pdcore_kv_pages_total{")]
    assert float(total[0].split()[-1]) > 0


# --- disconnects, aborts, flushing --------------------------------------------------------


def test_disconnect_mid_stream_frees_everything(http: httpx.Client, server: ServerProcess) -> None:
    body = {
        "text": "Tell me a long story",
        "sampling_params": LONG,
        "stream": True,
        "rid": "gone-1",
    }
    with (
        httpx.Client(base_url=server.url, timeout=30) as other,
        other.stream("POST", "/generate", json=body) as r,
    ):
        lines = r.iter_lines()
        got = [ln for _, ln in zip(range(6), lines)]
        assert any(ln.startswith("data: ") for ln in got)
        # The rid is taken while the request runs.
        dup = http.post("/generate", json={"text": "x", "rid": "gone-1"})
        assert dup.status_code == 400
    # Leaving the `with` closed the connection mid-stream.
    assert idle_load(http)["num_reqs"] == 0
    assert http.post("/flush_cache").status_code == 200
    assert http.get("/get_load").json()[0]["num_tokens"] == 0


def test_disconnect_while_waiting_non_stream(http: httpx.Client, server: ServerProcess) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/generate", json={"text": "long", "sampling_params": LONG}, timeout=0.5
        )
    idle_load(http)
    assert http.post("/flush_cache").status_code == 200
    assert http.get("/get_load").json()[0]["num_tokens"] == 0


def test_abort_request_and_flush_while_busy(http: httpx.Client, server: ServerProcess) -> None:
    result: dict = {}

    def call() -> None:
        body = {"text": "abort me", "sampling_params": LONG, "rid": "to-abort"}
        result["r"] = httpx.post(server.url + "/generate", json=body, timeout=60)

    worker = threading.Thread(target=call)
    worker.start()
    assert wait_until(lambda: http.get("/get_load").json()[0]["num_reqs"] == 1)
    busy = http.post("/flush_cache")
    assert busy.status_code == 400 and busy.json()["error"]["message"]
    assert http.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
    worker.join(30)
    out = result["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
    idle_load(http)
    assert http.post("/flush_cache").status_code == 200
    assert http.get("/get_load").json()[0]["num_tokens"] == 0
