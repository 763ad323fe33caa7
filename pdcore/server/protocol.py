"""Parsing and validation of request bodies, and the OpenAI-style error body.

Everything a client can get wrong is caught here, before the engine sees anything, and
becomes a `ProtocolError` naming the field -- so a bad request costs a 4xx and nothing
else. Pure functions over JSON values: tested without an engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdcore.engine.sampling_params import SamplingParams, SamplingParamsError
from pdcore.web.errors import ProtocolError, require_object

# --- small type checks --------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_int_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(t) and t >= 0 for t in x)


def _opt(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None
) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"'{name}' must be of type {names}", param=name)
    return value


def validate_sampling(
    data: dict[str, Any],
    renames: dict[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate with SamplingParams; return the normalized dict the engine receives.

    `renames` maps our field names back to the client's (max_new_tokens -> max_tokens) so
    the error names the field the client actually sent. `defaults` are the model's sampling
    defaults (`--sampling-defaults model`): they fill what the request leaves unset.
    """
    n = data.get("n")
    if n is not None and n != 1:
        raise ProtocolError("Only n=1 is supported", param="n")
    try:
        return SamplingParams.from_dict(data, defaults).to_dict()
    except SamplingParamsError as exc:
        param = (renames or {}).get(exc.param, exc.param)
        raise ProtocolError(str(exc).replace(exc.param, param, 1), param=param) from exc
    except TypeError as exc:
        raise ProtocolError(f"invalid sampling parameters: {exc}", param="sampling_params") from exc


# --- SGLang native /generate --------------------------------------------------------------

_UNSUPPORTED_INPUTS = ("input_embeds", "image_data", "audio_data", "video_data")


@dataclass
class GenerateRequest:
    """A /generate body. `prompts` holds text or token ids per prompt; `batch` says whether
    the client sent a list (and so gets a list back)."""

    prompts: list[str | list[int]]
    batch: bool
    sampling_params: list[dict[str, Any]]
    return_logprob: list[bool]
    rids: list[str] | None
    stream: bool = False
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Per prompt: did the client set max_new_tokens (else the server's default applies)?
    limits_given: list[bool] = field(default_factory=list)


def _per_prompt(value: Any, n: int, name: str, ok: Any) -> list[Any]:
    """One value per prompt: a list must match the prompts one to one, a scalar is shared."""
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise ProtocolError(f"'{name}' has {len(values)} items for {n} prompts", param=name)
    if not all(ok(v) for v in values):
        raise ProtocolError(f"'{name}' has the wrong type", param=name)
    return values


def parse_generate(body: Any, defaults: Mapping[str, Any] | None = None) -> GenerateRequest:
    body = require_object(body)
    for name in _UNSUPPORTED_INPUTS:
        if body.get(name) is not None:
            raise ProtocolError(f"'{name}' is not supported by this server", param=name)
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise ProtocolError("Exactly one of 'text' and 'input_ids' must be given", param="text")
    prompts: list[str | list[int]]
    if text is not None:
        batch = isinstance(text, list)
        prompts = text if batch else [text]
        if not all(isinstance(t, str) for t in prompts):
            raise ProtocolError("'text' must be a string or a list of strings", param="text")
    else:
        batch = isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
        prompts = input_ids if batch else [input_ids]
        if not all(_is_int_list(p) for p in prompts):
            raise ProtocolError(
                "'input_ids' must be a list of token ids or a list of such lists",
                param="input_ids",
            )
    param = "text" if text is not None else "input_ids"
    if batch and not prompts:
        raise ProtocolError("The prompt list is empty", param=param)
    if any(len(p) == 0 for p in prompts):
        raise ProtocolError("The prompt is empty", param=param)
    n = len(prompts)
    sp_list = _per_prompt(
        body.get("sampling_params"),
        n,
        "sampling_params",
        lambda v: v is None or isinstance(v, dict),
    )
    sampling = [validate_sampling(sp or {}, defaults=defaults) for sp in sp_list]
    logprob = _per_prompt(
        body.get("return_logprob") or False, n, "return_logprob", lambda v: isinstance(v, bool)
    )
    rid = body.get("rid")
    rids: list[str] | None = None
    if rid is not None:
        rids = rid if isinstance(rid, list) else [rid]
        if len(rids) != n or not all(isinstance(r, str) and r for r in rids):
            raise ProtocolError(
                "'rid' must be a string (or a list with one string per prompt)", param="rid"
            )
    known = {"text", "input_ids", "sampling_params", "return_logprob", "rid", "stream"}
    known |= {"bootstrap_host", "bootstrap_port", "bootstrap_room"}
    return GenerateRequest(
        prompts=prompts,
        batch=batch,
        sampling_params=sampling,
        return_logprob=logprob,
        rids=rids,
        stream=_opt(body, "stream", bool, False),
        bootstrap_host=body.get("bootstrap_host"),
        bootstrap_port=body.get("bootstrap_port"),
        bootstrap_room=body.get("bootstrap_room"),
        extra={k: v for k, v in body.items() if k not in known},
        limits_given=[
            isinstance(sp, dict) and sp.get("max_new_tokens") is not None for sp in sp_list
        ],
    )


# --- OpenAI /v1/completions and /v1/chat/completions --------------------------------------

# OpenAI (and SGLang extra) field -> SamplingParams field.
_OPENAI_SAMPLING = {
    "min_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
}


@dataclass
class OpenAIRequest:
    """A /v1/completions or /v1/chat/completions body, validated.

    For chat, `messages` is set and the prompt is rendered by the chat template later;
    `max_tokens_given` is False when the client left the limit to the server (chat: the
    rest of the context, as SGLang and vLLM do).
    """

    model: str | None
    sampling: dict[str, Any]
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; else how many top logprobs were asked for
    prompts: list[str | list[int]] = field(default_factory=list)
    messages: list[dict[str, Any]] | None = None
    echo: bool = False
    rid: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    # Added by SGLang's router in PD mode; kept for the prefill/decode pipelines.
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None


def _openai_common(
    body: dict[str, Any], default_max_tokens: int | None, defaults: Mapping[str, Any] | None
) -> OpenAIRequest:
    if body.get("best_of") not in (None, 1):
        raise ProtocolError("Only best_of=1 is supported", param="best_of")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else None
    max_key = max_key or ("max_tokens" if body.get("max_tokens") is not None else None)
    sampling: dict[str, Any] = {"n": body.get("n")}
    for key, target in _OPENAI_SAMPLING.items():
        if body.get(key) is not None:
            sampling[target] = body[key]
    if max_key is not None:
        sampling["max_new_tokens"] = body[max_key]
    elif default_max_tokens is not None:
        sampling["max_new_tokens"] = default_max_tokens
    renames = {"max_new_tokens": max_key or "max_tokens", "min_new_tokens": "min_tokens"}
    stream_options = _opt(body, "stream_options", dict, {})
    return OpenAIRequest(
        model=_opt(body, "model", str),
        sampling=validate_sampling(sampling, renames, defaults),
        max_tokens_given=max_key is not None or default_max_tokens is not None,
        stream=_opt(body, "stream", bool, False),
        include_usage=bool(stream_options.get("include_usage", False)),
        rid=_opt(body, "rid", str),
        bootstrap_host=body.get("bootstrap_host"),
        bootstrap_port=body.get("bootstrap_port"),
        bootstrap_room=body.get("bootstrap_room"),
    )


def parse_completion(body: Any, defaults: Mapping[str, Any] | None = None) -> OpenAIRequest:
    body = require_object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_int_list(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and all(
        isinstance(p, str) or (_is_int_list(p) and p) for p in prompt
    ):
        prompts = prompt
    else:
        raise ProtocolError(
            "'prompt' must be a string, a list of strings, or token ids", param="prompt"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ProtocolError("The prompt is empty", param="prompt")
    if body.get("suffix"):
        raise ProtocolError("'suffix' is not supported", param="suffix")
    req = _openai_common(body, default_max_tokens=16, defaults=defaults)
    req.prompts = prompts
    logprobs = _opt(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise ProtocolError("'logprobs' must be between 0 and 20", param="logprobs")
    req.logprobs = logprobs
    req.echo = _opt(body, "echo", bool, False)
    return req


def parse_chat(body: Any, defaults: Mapping[str, Any] | None = None) -> OpenAIRequest:
    body = require_object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty list", param="messages")
    req = _openai_common(body, default_max_tokens=None, defaults=defaults)
    req.messages = [_normalize_message(m) for m in messages]
    if _opt(body, "logprobs", bool, False):
        top = _opt(body, "top_logprobs", int, 0)
        if not 0 <= top <= 20:
            raise ProtocolError("'top_logprobs' must be between 0 and 20", param="top_logprobs")
        req.logprobs = top
    req.chat_template_kwargs = _opt(body, "chat_template_kwargs", dict)
    req.tools = _opt(body, "tools", list)
    return req


def _normalize_message(message: Any) -> dict[str, Any]:
    """Make `content` a string: a list of text parts is joined, other parts are refused."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ProtocolError("Each message must be an object with a 'role'", param="messages")
    content = message.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ProtocolError("Only text content parts are supported", param="messages")
            if not isinstance(part.get("text"), str):
                raise ProtocolError("A text part needs a string 'text'", param="messages")
            parts.append(part["text"])
        text = "\n".join(parts)
    else:
        raise ProtocolError("A message's 'content' must be a string or a list", param="messages")
    return {**message, "content": text}


def openai_finish_reason(reason: dict[str, Any] | None) -> str | None:
    """SGLang's {"type": "stop"|"length"|"abort", ...} as OpenAI's finish_reason string."""
    return None if reason is None else str(reason.get("type"))
