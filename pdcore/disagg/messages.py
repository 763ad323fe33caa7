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
    run different tp sizes (pdcore.disagg.tp_plan slices the transfers by head); with
    pipeline parallelism a rank (stage `pp_rank` of `pp_size`) holds `num_layers` layers
    from `layer_start` of the model's `total_layers`, so the pp sizes may differ too."""

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
    pp_rank: int = 0
    pp_size: int = 1
    layer_start: int = 0
    total_layers: int = 0  # 0: the same as num_layers (no PP)
    # "mha": per-head K and V buffers; "mla": one latent buffer, kv_heads 1 and head_dim
    # kv_lora_rank + rope_dim (both 0 for "mha"). Peers that omit them are "mha".
    kv_layout: str = "mha"
    kv_lora_rank: int = 0
    rope_dim: int = 0

    def __post_init__(self) -> None:
        if not self.total_kv_heads:
            object.__setattr__(self, "total_kv_heads", self.kv_heads)
        if not self.total_layers:
            object.__setattr__(self, "total_layers", self.num_layers)

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
        pp_rank: int = 0,
        pp_size: int = 1,
        layer_start: int = 0,
        total_layers: int = 0,
    ) -> KVSpec:
        layout = str(getattr(pool, "layout", "mha"))
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
            pp_rank,
            pp_size,
            layer_start,
            total_layers,
            layout,
            int(getattr(pool, "kv_lora_rank", 0)) if layout == "mla" else 0,
            int(getattr(pool, "rope_dim", 0)) if layout == "mla" else 0,
        )

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, decode: dict[str, Any]) -> str | None:
        """None when `decode` (a peer's `to_wire()`) can exchange KV with this prefill
        spec, else a message naming every differing field with both values. Heads and
        layers per rank may differ (different tp and pp sizes are bridged by sliced
        transfers); the KV layout ("mha" K/V or "mla" latent, and MLA's dims), the
        model's KV heads, head dim, layers, dtype, page size and backend may not."""
        labels = {
            "kv_layout": "KV layout",
            "kv_lora_rank": "MLA kv_lora_rank",
            "rope_dim": "MLA rope dim",
            "backend": "transfer backend",
            "page_size": "page size",
            "dtype": "KV dtype",
            "total_layers": "layers",
            "total_kv_heads": "KV heads",
            "head_dim": "head dim",
        }
        mine = self.to_wire()
        theirs = {
            **decode,
            "total_kv_heads": decode.get("total_kv_heads") or decode.get("kv_heads"),
            "total_layers": decode.get("total_layers") or decode.get("num_layers"),
            "kv_layout": decode.get("kv_layout") or "mha",
            "kv_lora_rank": decode.get("kv_lora_rank") or 0,
            "rope_dim": decode.get("rope_dim") or 0,
        }
        diffs = [
            f"{label}: prefill {mine[k]!r}, decode {theirs.get(k)!r}"
            for k, label in labels.items()
            if theirs.get(k) != mine[k]
        ]
        if not diffs:
            return None
        return "prefill and decode KV caches differ (" + "; ".join(diffs) + ")"
