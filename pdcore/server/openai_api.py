"""OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models.

Shapes follow OpenAI's API so the official client libraries work unchanged; the extra
fields SGLang adds (`matched_stop`, `prompt_tokens_details.cached_tokens`) ride along.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pdcore.engine.request import RequestOutput
from pdcore.server.engine_messages import Generate
from pdcore.server.generation import Generation, Result, ServerState, bootstrap_fields, make_job
from pdcore.server.native_api import CLIENT_CLOSED
from pdcore.server.protocol import (
    OpenAIRequest,
    openai_finish_reason,
    parse_chat,
    parse_completion,
)
from pdcore.web.errors import ProtocolError, parse_json
from pdcore.web.streaming import (
    SSE_DONE,
    ClientDisconnected,
    EventStreamResponse,
    sse,
    until_disconnected,
)


def _usage(results: list[Result]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)},
    }


def _token_strings(state: ServerState, ids: list[int]) -> list[str]:
    return [state.tokenizer.decode([t]) for t in ids]


def _completion_logprobs(
    state: ServerState, ids: list[int], logprobs: list[float], top: int, offset: int = 0
) -> dict[str, Any]:
    tokens = _token_strings(state, ids)
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs, strict=False)] if top else None,
        "text_offset": offsets,
    }


def _chat_logprobs(
    state: ServerState, ids: list[int], logprobs: list[float], top: int
) -> dict[str, Any]:
    content = []
    for tok, lp in zip(_token_strings(state, ids), logprobs, strict=False):
        entry = {"token": tok, "logprob": lp, "bytes": list(tok.encode())}
        content.append({**entry, "top_logprobs": [entry] if top else []})
    return {"content": content}


class _Call:
    """One OpenAI call: its parsed request, its jobs in the engine, and the response shapes."""

    def __init__(
        self, state: ServerState, req: OpenAIRequest, call_id: str, jobs: list[Generate], chat: bool
    ) -> None:
        self.state = state
        self.req = req
        self.chat = chat
        self.id = call_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.prompt_texts = [
            p if isinstance(p, str) else state.tokenizer.decode(p) for p in req.prompts
        ]
        self.gen = Generation(state, jobs)

    def envelope(self, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }

    def logprobs(self, ids: list[int], lps: list[float]) -> dict[str, Any] | None:
        top = self.req.logprobs
        if top is None:
            return None
        if self.chat:
            return _chat_logprobs(self.state, ids, lps, top)
        return _completion_logprobs(self.state, ids, lps, top)

    def choice(self, index: int, r: Result) -> dict[str, Any]:
        reason = openai_finish_reason(r.finish_reason)
        out: dict[str, Any] = {"index": index}
        if self.chat:
            out["message"] = {"role": "assistant", "content": r.text, "tool_calls": None}
        else:
            echo = self.prompt_texts[index] if self.req.echo else ""
            out["text"] = echo + r.text
        out["logprobs"] = self.logprobs(r.output_ids, r.logprobs)
        out["finish_reason"] = reason
        out["matched_stop"] = (r.finish_reason or {}).get("matched")
        return out

    def delta(self, index: int, update: RequestOutput) -> dict[str, Any]:
        text = update.new_text
        out: dict[str, Any] = {"index": index}
        if self.chat:
            out["delta"] = {"content": text} if text else {}
        else:
            out["text"] = text
        out["logprobs"] = self.logprobs(update.new_token_ids, update.new_logprobs or [])
        out["finish_reason"] = None
        return out

    async def respond(self, request: Request) -> Response | EventStreamResponse:
        if not self.req.stream:
            try:
                async with self.gen:
                    results = await until_disconnected(request.receive, self.gen.wait_all())
            except ClientDisconnected:
                return Response(status_code=CLIENT_CLOSED)
            body = self.envelope([self.choice(i, r) for i, r in enumerate(results)])
            body["usage"] = _usage(results)
            return JSONResponse(body)
        try:
            first = await until_disconnected(request.receive, self.gen.next())
        except ClientDisconnected:
            self.gen.close()
            return Response(status_code=CLIENT_CLOSED)
        except BaseException:
            self.gen.close()
            raise
        return EventStreamResponse(self.events(first), on_close=self.gen.close)

    async def events(self, first: tuple[int, RequestOutput]) -> AsyncIterator[str]:
        n = len(self.gen.results)
        for i in range(n):
            if self.chat:
                head = {"index": i, "delta": {"role": "assistant", "content": ""}}
                yield sse(self.envelope([{**head, "logprobs": None, "finish_reason": None}], True))
            elif self.req.echo:
                head = {"index": i, "text": self.prompt_texts[i], "logprobs": None}
                yield sse(self.envelope([{**head, "finish_reason": None}], True))
        item: tuple[int, RequestOutput] | None = first
        try:
            while item is not None:
                index, out = item
                # Tokens that end mid-character carry no text yet; send them only when the
                # client wants their logprobs.
                if out.new_text or (out.new_token_ids and self.req.logprobs is not None):
                    yield sse(self.envelope([self.delta(index, out)], True))
                if out.finished:
                    reason = openai_finish_reason(self.gen.results[index].finish_reason)
                    end: dict[str, Any] = {
                        "index": index,
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                    if self.chat:
                        end["delta"] = {}
                    else:
                        end["text"] = ""
                    end["matched_stop"] = (out.finish_reason or {}).get("matched")
                    yield sse(self.envelope([end], True))
                item = None if self.gen.done else await self.gen.next()
            if self.req.include_usage:
                final = self.envelope([], True)
                final["usage"] = _usage(self.gen.results)
                yield sse(final)
        except ProtocolError as exc:
            yield sse(exc.body())
        finally:
            self.gen.close()
        yield SSE_DONE


async def completions(request: Request) -> Response | EventStreamResponse:
    state: ServerState = request.app.state.pd
    req = parse_completion(parse_json(await request.body()), state.sampling_defaults.params)
    base = req.rid or f"cmpl-{uuid.uuid4().hex}"
    n = len(req.prompts)
    jobs = [
        make_job(
            state,
            base if n == 1 else f"{base}-{i}",
            prompt,
            req.sampling,
            param="prompt",
            return_logprob=req.logprobs is not None,
            bootstrap=bootstrap_fields(
                req.bootstrap_host, req.bootstrap_port, req.bootstrap_room, i
            ),
        )
        for i, prompt in enumerate(req.prompts)
    ]
    return await _Call(state, req, base, jobs, chat=False).respond(request)


async def chat_completions(request: Request) -> Response | EventStreamResponse:
    state: ServerState = request.app.state.pd
    req = parse_chat(parse_json(await request.body()), state.sampling_defaults.params)
    prompt = render_chat(state, req)
    req.prompts = [prompt]
    call_id = req.rid or f"chatcmpl-{uuid.uuid4().hex}"
    job = make_job(
        state,
        call_id,
        prompt,
        req.sampling,
        param="messages",
        return_logprob=req.logprobs is not None,
        add_special_tokens=False,  # the template already wrote BOS and friends
        clamp_only=req.max_tokens_given,
        bootstrap=bootstrap_fields(req.bootstrap_host, req.bootstrap_port, req.bootstrap_room, 0),
    )
    return await _Call(state, req, call_id, [job], chat=True).respond(request)


def render_chat(state: ServerState, req: OpenAIRequest) -> str:
    """The prompt text from the model's chat template, ending with the assistant's turn."""
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ProtocolError(
            "This model has no chat template; use /v1/completions", param="messages"
        )
    kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
    if req.tools:
        kwargs["tools"] = req.tools
    try:
        text = tokenizer.apply_chat_template(
            req.messages, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except Exception as exc:  # jinja errors: raise_exception() in templates, bad roles, ...
        raise ProtocolError(f"The chat template failed: {exc}", param="messages") from exc
    return str(text)


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.pd
    card = {
        "id": state.model_name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "pdcore",
        "root": state.engine_info.get("model_path") or state.settings.model_path,
        "max_model_len": state.max_context_len,
    }
    return JSONResponse({"object": "list", "data": [card]})
