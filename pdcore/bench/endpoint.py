"""What a benchmark learns from the server before it starts: that it answers, the model's
name, and where its tokenizer lives.

Any OpenAI- or SGLang-compatible server will do, so every probe is optional except the
first connection: a server that cannot be reached is the one error worth stopping for.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx


class BenchmarkError(Exception):
    """A benchmark that cannot run (unreachable server, no model name, ...): shown to the
    user as one line, without a traceback."""


async def _get_json(client: httpx.AsyncClient, base_url: str, route: str) -> Any | None:
    """GET a route as JSON; None when the route is missing or answers an error. A connection
    failure raises BenchmarkError: nothing else would work either."""
    url = base_url + route
    try:
        response = await client.get(url, timeout=30.0)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        reason = str(exc) or type(exc).__name__
        raise BenchmarkError(f"cannot connect to {base_url}: {reason}") from exc
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code in (401, 403):
        raise BenchmarkError(
            f"GET {route} answered HTTP {response.status_code}: pass the server's --api-key"
        )
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return None


async def probe_server(client: httpx.AsyncClient, base_url: str) -> dict[str, Any]:
    """{"models": [ids from /v1/models], "model_info": /get_model_info or None}; raises
    BenchmarkError when the server does not answer at all."""
    listing = await _get_json(client, base_url, "/v1/models")
    models = []
    if isinstance(listing, dict):
        models = [m.get("id") for m in listing.get("data") or [] if isinstance(m, dict)]
    info = await _get_json(client, base_url, "/get_model_info")
    return {
        "models": [m for m in models if m],
        "model_info": info if isinstance(info, dict) else None,
    }


def pick_model(requested: str | None, probe: dict[str, Any], backend: str) -> str | None:
    """--model, else the first model the server lists, else (SGLang /generate, which needs
    no name) the served model name; the OpenAI routes need one, so say so."""
    if requested:
        return requested
    if probe["models"]:
        return str(probe["models"][0])
    info = probe["model_info"] or {}
    name = info.get("served_model_name") or info.get("model_path")
    if name or backend == "sglang":
        return name
    raise BenchmarkError("the server lists no model at /v1/models; pass --model")


def tokenizer_source(requested: str | None, probe: dict[str, Any], model: str | None) -> str | None:
    """Where to load the tokenizer from: --tokenizer, else the server's tokenizer or model
    path when it is a folder on this machine, else the model name (used only if cached)."""
    if requested:
        return requested
    info = probe["model_info"] or {}
    for key in ("tokenizer_path", "model_path"):
        path = info.get(key)
        if path and Path(path).is_dir():
            return str(path)
    return model


def load_tokenizer(source: str | None, explicit: bool) -> Any | None:
    """A Hugging Face tokenizer, or None (token counts then come from the server's usage
    fields). An automatic guess never downloads; an explicit --tokenizer may."""
    if not source or source.lower() == "none":
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=not explicit)
    except Exception as exc:
        if explicit:
            raise BenchmarkError(f"cannot load tokenizer {source!r}: {exc}") from exc
        print(
            f"note: no tokenizer ({source!r} is not available locally); lengths are estimated "
            "and output tokens come from the server's usage fields",
            file=sys.stderr,
        )
        return None
