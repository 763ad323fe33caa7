"""What every generating route shares: the server state, turning a prompt into a checked
engine job, and following a batch of jobs to completion while recording metrics.

The native and OpenAI routes differ only in how they parse bodies and shape responses; the
rules about prompts (empty, longer than the context, max_new_tokens clamped to what is
left, SGLang-style) live here once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pdcore.engine.request import RequestOutput
from pdcore.model.generation_defaults import GenerationDefaults
from pdcore.server.dp_client import DataParallelClient
from pdcore.server.engine_client import (
    EngineDeadError,
    RequestRejected,
    Stream,
)
from pdcore.server.engine_messages import Generate
from pdcore.server.metrics import Metrics
from pdcore.settings import ServerSettings
from pdcore.web.errors import ProtocolError


@dataclass
class ServerState:
    """Everything the routes need; one per server, stored on app.state.pd."""

    settings: ServerSettings
    client: DataParallelClient  # one replica, or --dp-size of them
    tokenizer: Any
    model_name: str
    max_context_len: int
    engine_info: dict[str, Any]
    metrics: Metrics
    vocab_size: int
    # --sampling-defaults: what a request's unset sampling fields take (model or openai).
    sampling_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    health_timeout: float = 10.0
    started_at: float = field(default_factory=time.time)


def unavailable(message: str) -> ProtocolError:
    return ProtocolError(message, status=503, type="service_unavailable_error")


def make_job(
    state: ServerState,
    rid: str,
    prompt: str | list[int],
    sampling: dict[str, Any],
    *,
    param: str,
    return_logprob: bool = False,
    add_special_tokens: bool = True,
    clamp_only: bool = True,
    bootstrap: dict[str, Any] | None = None,
    limit_given: bool = True,
) -> Generate:
    """Tokenize (if text) and check a prompt; fit max_new_tokens into the context.

    With `clamp_only` False the limit was left to the server, so the job may use the whole
    rest of the context (OpenAI chat without max_tokens). A limit the client gave
    (`limit_given`) that exceeds the whole context is a 400; the server's own default is
    only clamped.
    """
    if isinstance(prompt, str):
        ids = list(state.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    else:
        ids = list(prompt)
    n, ctx = len(ids), state.max_context_len
    if n == 0:
        raise ProtocolError("The prompt is empty", param=param)
    if n >= ctx:
        raise ProtocolError(
            f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens).",
            param=param,
        )
    vocab = state.vocab_size
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise ProtocolError(f"Token id {bad} is out of range (vocabulary: {vocab})", param=param)
    sp = dict(sampling)
    if (
        limit_given and sp["max_new_tokens"] > ctx
    ):  # can never be met; one that merely overruns is clamped
        raise ProtocolError(
            f"max_tokens ({sp['max_new_tokens']}) is larger than the model's context length "
            f"({ctx} tokens).",
            param="max_new_tokens" if param in ("text", "input_ids") else "max_tokens",
        )
    room = ctx - n
    sp["max_new_tokens"] = min(sp["max_new_tokens"], room) if clamp_only else room
    return Generate(
        rid=rid,
        input_ids=ids,
        sampling_params=sp,
        return_logprob=return_logprob,
        bootstrap=bootstrap,
    )


def bootstrap_fields(
    host: Any, port: Any, room: Any, index: int | None = None
) -> dict[str, Any] | None:
    """The PD routing fields of one prompt, checked. For a batch, SGLang's routers send a
    list for each of the three fields, one entry per prompt."""

    def pick(value: Any, name: str) -> Any:
        if not isinstance(value, list):
            return value
        if index is None or index >= len(value):
            raise ProtocolError(f"{name} must have one entry per prompt", param=name)
        return value[index]

    host, port = pick(host, "bootstrap_host"), pick(port, "bootstrap_port")
    room = pick(room, "bootstrap_room")
    if room is None:
        return None
    if isinstance(room, bool) or not isinstance(room, int) or room < 0:
        raise ProtocolError("bootstrap_room must be a non-negative integer", param="bootstrap_room")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        raise ProtocolError("bootstrap_port must be a port number or null", param="bootstrap_port")
    if host is not None and not isinstance(host, str):
        raise ProtocolError("bootstrap_host must be a string", param="bootstrap_host")
    return {"host": host, "port": port, "room": room}


@dataclass
class Result:
    """The output of one job so far, accumulated from the engine's deltas."""

    rid: str
    start: float = field(default_factory=time.monotonic)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def e2e_latency(self) -> float:
        return (self.finished_at or time.monotonic()) - self.start

    def update(self, out: RequestOutput, metrics: Metrics) -> None:
        now = time.monotonic()
        new_ids = out.new_token_ids
        if new_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.ttft.observe(now - self.start)
            elif self.last_token_at is not None:
                gap = (now - self.last_token_at) / len(new_ids)
                for _ in new_ids:
                    metrics.itl.observe(gap)
            self.last_token_at = now
        self.output_ids.extend(new_ids)
        self.text += out.new_text
        self.logprobs.extend(out.new_logprobs or [])
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.finished:
            self.finished_at = now
            self.finish_reason = out.finish_reason
            metrics.e2e.observe(now - self.start)
            reason = str((self.finish_reason or {}).get("type", "unknown"))
            metrics.observe_finished(
                self.prompt_tokens, self.completion_tokens, self.cached_tokens, reason
            )


class Generation:
    """A batch of jobs in the engine. Use as `async with`: leaving it early aborts what has
    not finished, which is how a disconnected client frees its KV pages."""

    def __init__(self, state: ServerState, jobs: list[Generate]) -> None:
        self.state = state
        self.results = [Result(rid=job.rid) for job in jobs]
        try:
            self.stream: Stream = state.client.submit(jobs)
        except RequestRejected as exc:
            raise ProtocolError(str(exc), param="rid") from exc
        except EngineDeadError as exc:
            raise unavailable(f"The engine is not available: {exc}") from exc

    @property
    def done(self) -> bool:
        return self.stream.done

    async def next(self) -> tuple[int, RequestOutput]:
        """The next engine output as (job index, output delta); updates `results`."""
        try:
            index, out = await self.stream.next()
        except RequestRejected as exc:
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            raise ProtocolError(str(exc), status=exc.status, type=kind) from exc
        except EngineDeadError as exc:
            raise unavailable(f"The engine is not available: {exc}") from exc
        self.results[index].update(out, self.state.metrics)
        reason = out.finish_reason or {}
        if reason.get("status_code"):  # the engine could not serve it (e.g. a PD transfer failed)
            raise ProtocolError(
                str(reason.get("message", "request failed")),
                status=int(reason["status_code"]),
                type=(
                    "service_unavailable_error"
                    if int(reason["status_code"]) == 503
                    else "server_error"
                ),
            )
        return index, out

    async def wait_all(self) -> list[Result]:
        while not self.done:
            await self.next()
        return self.results

    def close(self) -> None:
        self.stream.close()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
