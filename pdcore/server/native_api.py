"""SGLang's native POST /generate: the route SGLang's router and benchmarks speak.

Response shape follows SGLang: {"text", "output_ids", "meta_info": {...}}, a list of those
for a list input; a stream carries the cumulative text so far in each event, then
`data: [DONE]`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pdcore.engine.request import RequestOutput
from pdcore.server.generation import Generation, Result, ServerState, bootstrap_fields, make_job
from pdcore.server.protocol import GenerateRequest, parse_generate
from pdcore.web.errors import ProtocolError, parse_json
from pdcore.web.streaming import (
    SSE_DONE,
    ClientDisconnected,
    EventStreamResponse,
    sse,
    until_disconnected,
)

# Status nginx uses for "client closed the request"; never seen by the (gone) client, but
# it makes the request log and the metrics say what happened.
CLIENT_CLOSED = 499


def native_output(result: Result, return_logprob: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": result.rid,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
        "e2e_latency": result.e2e_latency,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [
            [lp, tid, None] for lp, tid in zip(result.logprobs, result.output_ids, strict=False)
        ]
    return {"text": result.text, "output_ids": list(result.output_ids), "meta_info": meta}


async def generate(request: Request) -> Response | EventStreamResponse:
    state: ServerState = request.app.state.pd
    req = parse_generate(parse_json(await request.body()), state.sampling_defaults.params)
    n = len(req.prompts)
    if req.rids is not None:
        rids = req.rids
    else:
        base = uuid.uuid4().hex
        rids = [f"{base}-{i}" for i in range(n)] if req.batch else [base]
    param = "text" if isinstance(req.prompts[0], str) else "input_ids"
    jobs = [
        make_job(
            state,
            rids[i],
            req.prompts[i],
            req.sampling_params[i],
            param=param,
            limit_given=req.limits_given[i] if req.limits_given else True,
            return_logprob=req.return_logprob[i],
            bootstrap=bootstrap_fields(
                req.bootstrap_host, req.bootstrap_port, req.bootstrap_room, i
            ),
        )
        for i in range(n)
    ]
    gen = Generation(state, jobs)
    if not req.stream:
        try:
            async with gen:
                results = await until_disconnected(request.receive, gen.wait_all())
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        outs = [native_output(r, lp) for r, lp in zip(results, req.return_logprob, strict=True)]
        return JSONResponse(outs if req.batch else outs[0])
    try:
        # The first output is awaited before answering so an error the engine reports
        # (e.g. a duplicate rid) is still a 4xx rather than an event in a 200 stream.
        first = await until_disconnected(request.receive, gen.next())
    except ClientDisconnected:
        gen.close()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        gen.close()
        raise
    return EventStreamResponse(_events(gen, req, first), on_close=gen.close)


async def _events(
    gen: Generation, req: GenerateRequest, first: tuple[int, RequestOutput]
) -> AsyncIterator[str]:
    item: tuple[int, RequestOutput] | None = first
    try:
        while item is not None:
            index = item[0]
            chunk = native_output(gen.results[index], req.return_logprob[index])
            if req.batch:
                chunk["index"] = index
            yield sse(chunk)
            item = None if gen.done else await gen.next()
    except ProtocolError as exc:
        yield sse(exc.body())
    finally:
        gen.close()
    yield SSE_DONE
