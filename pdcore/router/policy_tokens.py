"""A prompt's token ids and page hashes, computed in the router the way a server does.

`kv_aware` compares a prompt with the pages each worker's prefix cache holds
(`GET /kv_cache_blocks`), which are named by chain hashes of token ids. So the router must
turn a request body into the token ids the server will see: `input_ids` as given, text
through the model's tokenizer (HF `tokenizers`, the Rust library -- no torch, no
transformers), chat messages through the model's chat template (jinja2, rendered as
transformers renders it) and then the tokenizer without special tokens, as the server does.
Anything else, or a template that fails, gives None and the policy falls back.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

# `page_allocator.page_hash`'s bytes: token ids as native int64, then the parent's hash as 8
# little-endian bytes. array("q") is numpy's int64 layout on every machine pdcore runs on.
_ITEM = array("q").itemsize


def block_hashes(ids: Sequence[int], page_size: int) -> list[int]:
    """The chain hash of each full page of `ids` (pdcore.engine.page_allocator.page_hash)."""
    data = array("q", ids).tobytes()
    step = page_size * _ITEM
    out: list[int] = []
    parent = 0
    for start in range(0, (len(ids) // page_size) * step, step):
        digest = hashlib.blake2b(data[start : start + step], digest_size=8)
        digest.update(parent.to_bytes(8, "little"))
        parent = int.from_bytes(digest.digest(), "little")
        out.append(parent)
    return out


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


class PromptTokenizer:
    """The model's tokenizer and chat template, light enough for the router process."""

    def __init__(self, tokenizer: Any, chat_template: str | None, special: dict[str, str]) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._template = None
        if chat_template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(chat_template)

    @classmethod
    def load(cls, path: str | Path) -> PromptTokenizer:
        """From a tokenizer.json, or a model folder holding one (and tokenizer_config.json,
        chat_template.jinja when there)."""
        from tokenizers import Tokenizer

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(config.get(name))
            if text is not None:
                special[name] = text
        return cls(Tokenizer.from_file(str(file)), template, special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def token_ids(self, body: dict[str, Any]) -> list[int] | None:
        """The ids the server would compute for this body's (first) prompt, or None."""
        if "messages" in body:
            return self._chat_ids(body)
        for key in ("input_ids", "text", "prompt"):
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, list) and value and not _is_ids(value):
                value = value[0]  # a batch routes on its first item
            if _is_ids(value):
                return list(value)
            if isinstance(value, str) and key != "input_ids":
                return self.encode(value)
            return None
        return None

    def _chat_ids(self, body: dict[str, Any]) -> list[int] | None:
        if self._template is None or not isinstance(body.get("messages"), list):
            return None
        kwargs = dict(body.get("chat_template_kwargs") or {})
        if body.get("tools"):
            kwargs["tools"] = body["tools"]
        try:
            text = self._template.render(
                messages=body["messages"], add_generation_prompt=True, **self._special, **kwargs
            )
        except Exception:  # a template's raise_exception, odd content: the policy falls back
            return None
        return self.encode(text, add_special_tokens=False)


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise ValueError(message)
