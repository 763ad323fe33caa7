"""Control messages between decode and prefill: msgpack maps over zmq, never pickle.

Each message is one frame: a map with a `type` key. Decode's DEALER talks to prefill's
ROUTER; the bootstrap server (HTTP, JSON) only tells decode where that ROUTER is.

decode -> prefill: `register` (its backend blob and KV layout, and `ranks`: every TP rank's),
`prealloc` (a room's pages), `done` (every decode rank has the room's KV: prefill may free
its pages), `abort` (a room), `ping`. prefill -> decode: `registered` (ok, or refused with the reason),
`abort` (a room), `pong`. The transfer's completion travels in the data plane's notification
(`pack_done`), so decode learns of it only after the bytes are in place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1


class MessageError(ValueError):
    """A frame that is not a pdcore control message."""


def pack(type_: str, **fields: Any) -> bytes:
    return msgpack.packb({"type": type_, **fields}, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise MessageError(f"malformed control message: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise MessageError("control message without a type")
    return msg


def pack_done(room: int, first_token: int, first_logprob: float | None) -> bytes:
    """The notification that rides with a room's KV write."""
    return msgpack.packb({"room": room, "token": first_token, "logprob": first_logprob})


def unpack_done(payload: bytes) -> tuple[int, int, float | None]:
    msg = msgpack.unpackb(payload, raw=False)
    return int(msg["room"]), int(msg["token"]), msg["logprob"]


@dataclass(frozen=True)
class KVSpec:
    """What both sides must agree on before a byte moves (checked at handshake), and where
    this rank's KV heads sit among the model's: with tensor parallelism a rank holds
    `kv_heads` heads from `kv_head_start` of `total_kv_heads`, so prefill and decode may
    run different tp sizes (pdcore.disagg.tp_plan slices the transfers by head)."""

    backend: str
    page_size: int
    dtype: str
    num_layers: int
    kv_heads: int
    head_dim: int
    page_bytes: int
    tp_rank: int = 0
    tp_size: int = 1
    kv_head_start: int = 0
    total_kv_heads: int = 0  # 0: the same as kv_heads (no TP)

    def __post_init__(self) -> None:
        if not self.total_kv_heads:
            object.__setattr__(self, "total_kv_heads", self.kv_heads)

    @classmethod
    def from_pool(
        cls,
        backend: str,
        pool: Any,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        kv_head_start: int = 0,
        total_kv_heads: int = 0,
    ) -> KVSpec:
        return cls(
            backend,
            int(pool.page_size),
            str(pool.dtype).removeprefix("torch."),
            int(pool.num_layers),
            int(pool.k.shape[-2]),
            int(pool.k.shape[-1]),
            int(pool.page_bytes_per_layer),
            tp_rank,
            tp_size,
            kv_head_start,
            total_kv_heads,
        )

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, decode: dict[str, Any]) -> str | None:
        """None when `decode` (a peer's `to_wire()`) can exchange KV with this prefill
        spec, else a message naming every differing field with both values. Heads per rank
        may differ (different tp sizes are bridged by head-sliced transfers); the model's
        KV heads, head dim, layers, dtype, page size and backend may not."""
        labels = {
            "backend": "transfer backend",
            "page_size": "page size",
            "dtype": "KV dtype",
            "num_layers": "layers",
            "total_kv_heads": "KV heads",
            "head_dim": "head dim",
        }
        mine = self.to_wire()
        theirs = {
            **decode,
            "total_kv_heads": decode.get("total_kv_heads") or decode.get("kv_heads"),
        }
        diffs = [
            f"{label}: prefill {mine[k]!r}, decode {theirs.get(k)!r}"
            for k, label in labels.items()
            if theirs.get(k) != mine[k]
        ]
        if not diffs:
            return None
        return "prefill and decode KV caches differ (" + "; ".join(diffs) + ")"
