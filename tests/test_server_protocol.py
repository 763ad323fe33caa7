"""Request parsing and validation (pdcore.server.protocol), without an engine."""

from __future__ import annotations

import pytest

from pdcore.server.protocol import (
    openai_finish_reason,
    parse_chat,
    parse_completion,
    parse_generate,
)
from pdcore.web.errors import ProtocolError, error_body, parse_json


def _err(fn, body) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(body)
    return info.value


def test_error_body_has_openai_shape() -> None:
    assert error_body("bad", param="x") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}
    }
    exc = ProtocolError("nope", status=401, type="authentication_error")
    assert exc.body()["error"]["type"] == "authentication_error" and exc.status == 401


@pytest.mark.parametrize("raw", [b"", b"  ", b"{bad", b"\xff\xfe"])
def test_parse_json_rejects_malformed(raw: bytes) -> None:
    assert _err(parse_json, raw).status == 400


def test_generate_single_text() -> None:
    req = parse_generate({"text": "hi", "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
    assert req.prompts == ["hi"] and not req.batch and not req.stream
    assert req.sampling_params[0]["max_new_tokens"] == 5
    assert req.sampling_params[0]["temperature"] == 0.0
    assert req.return_logprob == [False] and req.rids is None


def test_generate_batch_and_per_prompt_fields() -> None:
    req = parse_generate(
        {
            "input_ids": [[1, 2], [3]],
            "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}],
            "return_logprob": True,
            "rid": ["a", "b"],
            "stream": True,
        }
    )
    assert req.batch and req.prompts == [[1, 2], [3]] and req.stream
    assert [sp["max_new_tokens"] for sp in req.sampling_params] == [1, 2]
    assert req.return_logprob == [True, True] and req.rids == ["a", "b"]


def test_generate_keeps_router_fields_and_ignores_unknown() -> None:
    req = parse_generate(
        {
            "text": "hi",
            "bootstrap_host": "10.0.0.1",
            "bootstrap_port": None,
            "bootstrap_room": 12345,
            "sampling_params": {"skip_special_tokens": True, "no_stop_trim": False},
            "log_metrics": True,
        }
    )
    assert (req.bootstrap_host, req.bootstrap_port, req.bootstrap_room) == ("10.0.0.1", None, 12345)
    assert req.extra == {"log_metrics": True}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "text"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({"text": 5}, "text"),
        ({"text": ""}, "text"),
        ({"text": []}, "text"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, "x"]}, "input_ids"),
        ({"input_ids": [-1]}, "input_ids"),
        ({"text": "a", "sampling_params": "x"}, "sampling_params"),
        ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"text": "a", "sampling_params": {"temperature": -0.5}}, "temperature"),
        ({"text": "a", "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"text": "a", "sampling_params": {"bogus": 1}}, "bogus"),
        ({"text": "a", "sampling_params": {"n": 2}}, "n"),
        ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
        ({"text": "a", "rid": 7}, "rid"),
        ({"text": ["a", "b"], "rid": "x"}, "rid"),
        ({"text": "a", "stream": "yes"}, "stream"),
        ({"text": "a", "return_logprob": "yes"}, "return_logprob"),
        ({"text": "a", "image_data": "http://x"}, "image_data"),
    ],
)
def test_generate_rejects(body: dict, param: str) -> None:
    exc = _err(parse_generate, body)
    assert exc.status == 400 and exc.param == param, exc.message


def test_generate_body_must_be_object() -> None:
    assert _err(parse_generate, [1, 2]).status == 400


def test_completion_maps_openai_fields() -> None:
    req = parse_completion(
        {
            "model": "m",
            "prompt": "hi",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 3,
            "min_p": 0.1,
            "seed": 3,
            "stop": "x",
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "stop_token_ids": [5],
            "min_tokens": 1,
            "logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
        }
    )
    sp = req.sampling
    assert sp["max_new_tokens"] == 7 and sp["min_new_tokens"] == 1 and sp["stop"] == ["x"]
    assert (sp["top_k"], sp["seed"], sp["ignore_eos"], sp["stop_token_ids"]) == (3, 3, True, [5])
    assert req.logprobs == 2 and req.stream and req.include_usage and req.prompts == ["hi"]


def test_completion_defaults_and_prompt_forms() -> None:
    assert parse_completion({"prompt": "hi"}).sampling["max_new_tokens"] == 16
    assert parse_completion({"prompt": [1, 2]}).prompts == [[1, 2]]
    assert parse_completion({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion({"prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    # The router's rename: max_completion_tokens wins.
    req = parse_completion({"prompt": "a", "max_tokens": 3, "max_completion_tokens": 4})
    assert req.sampling["max_new_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "a", "max_completion_tokens": "x"}, "max_completion_tokens"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "top_p": 1.01}, "top_p"),
        ({"prompt": "a", "n": 2}, "n"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "stop": 5}, "stop"),
        ({"prompt": "a", "logprobs": 50}, "logprobs"),
        ({"prompt": "a", "stream": 1}, "stream"),
        ({"prompt": "a", "model": 1}, "model"),
        ({"prompt": "a", "min_tokens": -2}, "min_tokens"),
    ],
)
def test_completion_rejects(body: dict, param: str) -> None:
    exc = _err(parse_completion, body)
    assert exc.status == 400 and exc.param == param, exc.message


def test_chat_parses_text_parts_and_defaults() -> None:
    req = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
            "logprobs": True,
            "top_logprobs": 2,
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert [m["content"] for m in req.messages] == ["be brief", "a\nb", ""]
    assert not req.max_tokens_given and req.logprobs == 2
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert parse_chat(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    ).max_tokens_given


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "user", "content": "x"}], "n": 3},
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99, "logprobs": True},
    ],
)
def test_chat_rejects(body: dict) -> None:
    assert _err(parse_chat, body).status == 400


def test_finish_reason_mapping() -> None:
    assert openai_finish_reason({"type": "stop", "matched": 2}) == "stop"
    assert openai_finish_reason({"type": "length", "length": 4}) == "length"
    assert openai_finish_reason(None) is None
