"""One request per backend, timed: SGLang's POST /generate and OpenAI's completions/chat.

Each function sends a request, follows its SSE stream and fills a `RequestResult`; it never
raises, since a benchmark must count a failed request rather than stop. Payloads are built
by pure functions so tests (and readers) can see exactly what is sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdcore.bench.config import BACKENDS
from pdcore.bench.metrics import RequestResult, chunk_itls

ROUTES = {"sglang": "/generate", "openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class RequestSpec:
    """What to send: the prompt, how many tokens to ask for, and settings shared by all."""

    url: str
    prompt: str
    prompt_len: int
    output_len: int
    model: str | None = None
    stream: bool = True
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


def _merge(payload: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` wins, except that nested dicts (sampling_params, stream_options) merge."""
    out = dict(payload)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def sglang_payload(spec: RequestSpec) -> dict[str, Any]:
    sampling = {"temperature": 0.0, "max_new_tokens": spec.output_len}
    if spec.ignore_eos:
        sampling["ignore_eos"] = True
    payload = {"text": spec.prompt, "sampling_params": sampling, "stream": spec.stream}
    return _merge(payload, spec.extra_body)


def _openai_common(spec: RequestSpec) -> dict[str, Any]:
    payload: dict[str, Any] = {"temperature": 0.0, "max_tokens": spec.output_len}
    if spec.model is not None:
        payload["model"] = spec.model
    if spec.ignore_eos:
        payload["ignore_eos"] = True
    payload["stream"] = spec.stream
    if spec.stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def openai_payload(spec: RequestSpec) -> dict[str, Any]:
    return _merge({**_openai_common(spec), "prompt": spec.prompt}, spec.extra_body)


def chat_payload(spec: RequestSpec) -> dict[str, Any]:
    messages = [{"role": "user", "content": spec.prompt}]
    return _merge({**_openai_common(spec), "messages": messages}, spec.extra_body)


class _Timing:
    """Turns chunk arrivals into TTFT and ITLs, the way SGLang's bench_serving does."""

    def __init__(self, result: RequestResult) -> None:
        self.result = result
        self.last = 0.0
        self.tokens = 0
        self.seen = False

    def chunk(self, now: float, total_tokens: int | None) -> None:
        """A chunk with text arrived at `now`; `total_tokens` is the cumulative count when
        the server says it (else the chunk counts as one token)."""
        new = 1 if total_tokens is None else total_tokens - self.tokens
        if new <= 0:
            return
        if not self.seen:
            self.result.ttft = now - self.result.start
            self.seen = True
        else:
            self.result.itl.extend(chunk_itls(now - self.last, new))
        self.last = now
        self.tokens += new


async def _sse_data(response: httpx.Response) -> AsyncIterator[Any]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:200]
    return f"HTTP {status}: {message}"


def _usage(body: dict[str, Any], result: RequestResult) -> int | None:
    """Output tokens from an OpenAI `usage` or SGLang `meta_info`; records prompt tokens."""
    info = body.get("usage") or body.get("meta_info") or {}
    if info.get("prompt_tokens") is not None:
        result.server_prompt_tokens = int(info["prompt_tokens"])
    count = info.get("completion_tokens")
    return None if count is None else int(count)


def _text(backend: str, body: dict[str, Any]) -> tuple[str, bool]:
    """(the text this body carries, whether it is cumulative) for each backend's shape."""
    if backend == "sglang":
        return body.get("text") or "", True
    choices = body.get("choices") or []
    if not choices:
        return "", False
    if backend == "openai":
        return choices[0].get("text") or "", False
    part = choices[0].get("delta") or choices[0].get("message") or {}
    return part.get("content") or part.get("reasoning_content") or "", False


async def _send(
    backend: str, client: httpx.AsyncClient, spec: RequestSpec, payload: dict[str, Any]
) -> RequestResult:
    result = RequestResult(prompt_len=spec.prompt_len)
    timing = _Timing(result)
    reported: int | None = None
    text = ""
    result.start = time.perf_counter()
    try:
        async with client.stream("POST", spec.url, json=payload) as response:
            if response.status_code != 200:
                result.error = _error_text(response.status_code, await response.aread())
                return result
            if not spec.stream:
                body = json.loads(await response.aread())
                text, _ = _text(backend, body)
                reported = _usage(body, result)
                timing.chunk(time.perf_counter(), reported)
            else:
                async for body in _sse_data(response):
                    if not isinstance(body, dict):
                        continue
                    if "error" in body:
                        result.error = f"error in stream: {body['error']}"[:300]
                        return result
                    piece, cumulative = _text(backend, body)
                    count = _usage(body, result)
                    reported = count if count is not None else reported
                    if piece:
                        timing.chunk(time.perf_counter(), count)
                        text = piece if cumulative else text + piece
    except (httpx.HTTPError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}".strip()
        return result
    finally:
        result.end = time.perf_counter()
    result.latency = result.end - result.start
    if not spec.stream:
        result.ttft = result.latency
    result.generated_text = text
    if not timing.seen:
        result.error = "the response carried no generated text"
        return result
    result.output_tokens = reported if reported is not None else timing.tokens
    result.output_tokens_reported = reported is not None
    result.success = True
    return result


RequestFunc = Callable[[httpx.AsyncClient, RequestSpec], Awaitable[RequestResult]]
_PAYLOADS = {"sglang": sglang_payload, "openai": openai_payload, "openai-chat": chat_payload}


def request_func(backend: str) -> RequestFunc:
    """The timed request function of `backend`. When the server reports no token count,
    `output_tokens` is the number of text chunks and `output_tokens_reported` is False, for
    the caller to recount with a tokenizer if it has one."""
    if backend not in _PAYLOADS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    build = _PAYLOADS[backend]

    async def send(client: httpx.AsyncClient, spec: RequestSpec) -> RequestResult:
        return await _send(backend, client, spec, build(spec))

    return send
