"""Checks on the fields of control messages from a peer, before anything uses them.

A peer (authenticated or not: a buggy or mismatched decode is a peer too) may send any
msgpack value in any field. What prefill and decode act on is checked here first -- a room
is a 63-bit non-negative integer, a page list holds page ids inside the receiver's pool, a
KV layout is integers of the right ranges, a backend blob is bytes of bounded size -- so a
bad field is a refused message (`WireError`, a ValueError the I/O thread logs), never an
OverflowError or a gigabyte `bytes(n)` deep inside the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pdcore.disagg.transfer import KVLayout

MAX_ROOM = 2**63 - 1
MAX_BLOB_BYTES = 1 << 20
MAX_TEXT = 2000


class WireError(ValueError):
    """A field of a peer's message that this side refuses."""


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"{name} must be an integer in [{low}, {high}], got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def room(value: Any) -> int:
    """A bootstrap room: SGLang's random 63-bit non-negative integer."""
    return _int(value, "room", 0, MAX_ROOM)


def pages(value: Any, num_pages: int) -> list[int]:
    """A page list for a pool of `num_pages` pages (page 0 is the pool's padding page and is
    never handed out)."""
    if not isinstance(value, list) or len(value) >= num_pages:
        raise WireError(f"pages must be a list of fewer than {num_pages} page ids")
    return [_int(p, "page id", 1, num_pages - 1) for p in value]


def layout(value: Any) -> KVLayout:
    """A peer's KV layout: the addresses and sizes its memory regions are derived from."""
    names = [f.name for f in dataclasses.fields(KVLayout)]
    if not isinstance(value, dict) or set(value) - set(names):
        raise WireError(f"layout must be an object with the fields {names}")
    addr_max, size_max = 2**64 - 1, 2**48
    try:
        out = KVLayout(
            k_addr=_int(value.get("k_addr"), "layout.k_addr", 0, addr_max),
            v_addr=_int(value.get("v_addr"), "layout.v_addr", 0, addr_max),
            num_layers=_int(value.get("num_layers"), "layout.num_layers", 1, 1 << 16),
            num_pages=_int(value.get("num_pages"), "layout.num_pages", 2, 1 << 40),
            page_bytes=_int(value.get("page_bytes"), "layout.page_bytes", 1, size_max),
            device=str(value.get("device", "cpu"))[:64],
        )
    except TypeError as exc:
        raise WireError(f"bad layout: {exc}") from None
    if not isinstance(value.get("device", "cpu"), str):
        raise WireError("layout.device must be a string")
    return out


def blob(value: Any) -> bytes:
    """A transfer backend's describe() blob."""
    if not isinstance(value, bytes) or len(value) > MAX_BLOB_BYTES:
        raise WireError(f"blob must be at most {MAX_BLOB_BYTES} bytes")
    return value


def text(value: Any, name: str) -> str:
    """A short string (a peer id, a reason) for logs and errors."""
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise WireError(f"{name} must be a non-empty string of at most {MAX_TEXT} characters")
    return value


def reason(value: Any) -> str:
    """A failure reason from a peer: shown to users, so bounded, whatever it was."""
    return str(value)[:MAX_TEXT] if value is not None else "no reason given"
