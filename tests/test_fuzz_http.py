"""A real `pdcore serve` under property-based fuzzing (hypothesis, fixed budget and seed) and
the HTTP limits: request bodies of /generate, /v1/completions and /v1/chat/completions with
wrong types, nesting, unicode, huge / negative / NaN numbers, missing and extra fields each
get a 2xx or a 4xx -- never a 5xx --, the process stays up, nothing is left held; oversized
bodies get 413, slow-loris clients are cut off, and secrets appear nowhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_helpers import (
    ServerProcess,
    slow_body_status_line,
    slow_headers_closed_after,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SECRET = "pd-secret-never-shown-7f3a"
MAX_BODY = 64 * 1024
FUZZ = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    srv = ServerProcess(
        tiny_llama_dir,
        log,
        "--context-length",
        "64",  # bounds every generation the fuzz may ask for
        "--max-request-body-bytes",
        str(MAX_BODY),
        "--http-header-timeout",
        "2",
        "--http-body-timeout",
        "2",
        env={"PDCORE_DISAGGREGATION_AUTH_TOKEN": SECRET},
    )
    try:
        srv.wait_ready(600)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


# --- strategies -----------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(min_value=-8, max_value=8),
    st.sampled_from([2**31, 2**63, 2**64 + 1, 10**30, 10**400, -(2**63), -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SMALL_TOKENS = st.one_of(st.integers(min_value=0, max_value=4), NUMBERS, st.none(), st.text())
scalars = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=30))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
texts = st.one_of(st.text(min_size=0, max_size=40), st.lists(st.text(max_size=10), max_size=3))
token_ids = st.one_of(
    st.lists(st.integers(min_value=-2, max_value=60000), max_size=8),
    st.lists(st.lists(st.integers(0, 100), max_size=4), max_size=3),
    st.lists(NUMBERS, max_size=3),
)
SAMPLING = {
    "temperature": st.one_of(NUMBERS, values),
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "min_p": NUMBERS,
    "seed": st.one_of(NUMBERS, values),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3), values),
    "stop_token_ids": st.one_of(token_ids, values),
    "repetition_penalty": NUMBERS,
    "frequency_penalty": NUMBERS,
    "presence_penalty": NUMBERS,
    "ignore_eos": st.one_of(st.booleans(), values),
    "n": NUMBERS,
}
EXTRA = st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=3)


def _body(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[Any]:
    structured = st.builds(
        lambda base, extra: {**extra, **base},
        st.fixed_dictionaries(required, optional=optional),
        EXTRA,
    )
    return st.one_of(structured, structured, structured, values)  # mostly near-valid


GENERATE = _body(
    {},
    {
        "text": st.one_of(texts, values),
        "input_ids": token_ids,
        "sampling_params": st.one_of(
            st.fixed_dictionaries(
                {"max_new_tokens": SMALL_TOKENS}, optional={**SAMPLING, "junk": values}
            ),
            values,
            st.lists(st.fixed_dictionaries({"max_new_tokens": SMALL_TOKENS}), max_size=3),
        ),
        "return_logprob": st.one_of(st.booleans(), values),
        "rid": values,
        "stream": st.one_of(st.booleans(), values),
        "bootstrap_room": values,
        "bootstrap_host": values,
        "bootstrap_port": NUMBERS,
    },
)
COMPLETIONS = _body(
    {"max_tokens": SMALL_TOKENS},
    {
        "prompt": st.one_of(texts, token_ids, values),
        "model": values,
        "stream": st.one_of(st.booleans(), values),
        "stream_options": values,
        "logprobs": NUMBERS,
        "echo": st.one_of(st.booleans(), values),
        "best_of": NUMBERS,
        "suffix": values,
        "max_completion_tokens": SMALL_TOKENS,
        "min_tokens": NUMBERS,
        **SAMPLING,
    },
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}
    ),
    st.fixed_dictionaries(
        {"role": values, "content": st.one_of(values, st.lists(values, max_size=2))},
        optional={"name": values, "tool_calls": values},
    ),
)
CHAT = _body(
    {"max_tokens": SMALL_TOKENS, "messages": st.one_of(st.lists(MESSAGE, max_size=3), values)},
    {
        "model": values,
        "stream": st.one_of(st.booleans(), values),
        "logprobs": st.one_of(st.booleans(), values),
        "top_logprobs": NUMBERS,
        "tools": values,
        "chat_template_kwargs": values,
        "response_format": values,
        **SAMPLING,
    },
)


def _post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity, as Python sends them
    with http.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        r.read()
    return r


def _check(r: httpx.Response, seen: list[int]) -> None:
    seen.append(r.status_code)
    assert r.status_code < 500, r.text[:500]
    assert SECRET not in r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


VALID = {
    "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}


@pytest.mark.parametrize(
    ("path", "strategy"),
    [("/generate", GENERATE), ("/v1/completions", COMPLETIONS), ("/v1/chat/completions", CHAT)],
)
def test_fuzzed_bodies_get_2xx_or_4xx(http: httpx.Client, path: str, strategy: Any) -> None:
    seen: list[int] = []
    assert _post(http, path, VALID[path]).status_code == 200

    @FUZZ
    @given(body=strategy)
    def run(body: Any) -> None:
        _check(_post(http, path, body), seen)

    run()
    assert http.get("/health").status_code == 200
    assert any(s == 400 for s in seen), seen
    print(f"{path}: statuses {sorted(set(seen))} over {len(seen)} fuzzed bodies")


def test_max_tokens_beyond_the_context_is_a_400(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = http.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 10**30}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_new_tokens"
    r = http.post("/generate", json={"input_ids": [5] * 64})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_oversized_body_is_a_413(http: httpx.Client) -> None:
    big = {"text": "a" * (MAX_BODY + 10)}
    r = http.post("/generate", json=big)
    assert r.status_code == 413
    assert "--max-request-body-bytes" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield b'{"text": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"a" * 1024
        yield b'"}'

    r = http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_slow_loris_headers_are_cut_off(server: Any) -> None:
    """A client sending its headers a byte every 0.5 s is disconnected at the 2 s header
    deadline, though every byte restarts uvicorn's own keep-alive timer."""
    closed_after = slow_headers_closed_after(server.port)
    assert closed_after is not None, "the slow client was never disconnected"
    assert closed_after < 8, closed_after


def test_slow_body_is_a_408(server: Any) -> None:
    status_line = slow_body_status_line(server.port)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line


def test_secrets_appear_nowhere_and_nothing_leaks(http: httpx.Client, server: Any) -> None:
    for path in ("/server_info", "/get_server_info", "/metrics", "/model_info"):
        r = http.get(path)
        assert r.status_code == 200 and SECRET not in r.text, path
    info = http.get("/server_info").json()
    assert "disaggregation_auth_token" not in info and info["disaggregation_auth"] is True
    assert wait_until(lambda: http.get("/get_load").json()[0]["num_reqs"] == 0, 30)
    assert http.post("/flush_cache").status_code == 200
    assert http.get("/get_load").json()[0]["num_tokens"] == 0
    assert SECRET not in server.log()
    assert "Traceback" not in server.log(), server.log()[-3000:]
