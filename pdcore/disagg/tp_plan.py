"""Which prefill TP rank sends which KV heads to which decode TP rank, and the byte runs.

With tensor parallelism each rank's KV pool holds only its KV heads: K and V shaped
[layers, pages, page_size, kv_heads_of_rank, head_dim]. When prefill and decode run
different tp sizes the head ranges differ, so a decode rank needs heads from one or several
prefill ranks, and a prefill rank's page holds heads for one or several decode ranks. Both
sides compute the same plan from the two topologies (`transfer_plan`), so decode knows which
notifications to wait for without being told per room. A head held by several prefill ranks
(replicated: tp > KV heads) is sent by one of them only; a head held by several decode ranks
is sent to each, since each has its own pool.

Slicing by head is the control plane's job, done once here; the data plane still sees only
(src, dst, length) runs. When both sides hold exactly the slice, whole pages move (one run
per page and layer, coalesced); otherwise one run per token, page and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pdcore.disagg.kv_runs import KVLayout, RunArray, coalesce_runs, kv_page_runs
from pdcore.engine.pipeline import PipelineHost


@dataclass(frozen=True)
class RankHeads:
    """The KV heads TP rank `rank` holds: global heads [start, start + count)."""

    rank: int
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> RankHeads:
        """From a `KVSpec.to_wire()` map (a peer's; its fields are checked by the caller)."""
        return cls(int(spec["tp_rank"]), int(spec["kv_head_start"]), int(spec["kv_heads"]))


@dataclass(frozen=True)
class HeadSlice:
    """Prefill rank `prefill_rank` sends global KV heads [head_start, head_start + num_heads)
    to decode rank `decode_rank`."""

    prefill_rank: int
    decode_rank: int
    head_start: int
    num_heads: int


def transfer_plan(prefill: Sequence[RankHeads], decode: Sequence[RankHeads]) -> list[HeadSlice]:
    """Every decode rank's heads, each taken from one prefill rank that holds it. Among
    several holders (replicated heads) decode rank r takes holder r mod n, so replicas
    share the sending. ValueError when a decode head is held by no prefill rank."""
    slices: list[HeadSlice] = []
    for d in sorted(decode, key=lambda x: x.rank):
        h = d.start
        while h < d.end:
            holders = [p for p in sorted(prefill, key=lambda x: x.rank) if p.start <= h < p.end]
            if not holders:
                raise ValueError(f"no prefill rank holds KV head {h} (decode rank {d.rank})")
            p = holders[d.rank % len(holders)]
            n = min(p.end, d.end) - h
            slices.append(HeadSlice(p.rank, d.rank, h, n))
            h += n
    return slices


def head_runs(
    src: KVLayout,
    dst: KVLayout,
    src_heads: RankHeads,
    dst_heads: RankHeads,
    part: HeadSlice,
    page_size: int,
    src_pages: Sequence[int] | npt.NDArray[Any],
    dst_pages: Sequence[int] | npt.NDArray[Any],
) -> RunArray:
    """Runs copying the heads of `part` of `src_pages[i]` (a prefill rank's pool) into
    `dst_pages[i]` (a decode rank's pool), every layer, K then V, coalesced."""
    if part.num_heads == src_heads.count == dst_heads.count:
        return kv_page_runs(src, dst, src_pages, dst_pages)
    if src.num_layers != dst.num_layers:
        raise ValueError(f"layers differ: {src.num_layers} vs {dst.num_layers}")
    head_bytes = src.page_bytes // (page_size * src_heads.count)
    if head_bytes * page_size * dst_heads.count != dst.page_bytes:
        raise ValueError(
            f"bytes per KV head differ: prefill {head_bytes}, "
            f"decode {dst.page_bytes // (page_size * dst_heads.count)}"
        )
    sp = np.asarray(src_pages, dtype=np.uint64)
    dp = np.asarray(dst_pages, dtype=np.uint64)
    if sp.shape != dp.shape or sp.ndim != 1:
        raise ValueError(f"page lists differ in length: {sp.shape} vs {dp.shape}")
    if sp.size and (sp.max() >= src.num_pages or dp.max() >= dst.num_pages):
        raise ValueError("page id out of range of the pool")
    layers = np.arange(src.num_layers, dtype=np.uint64)[:, None, None]
    tokens = np.arange(page_size, dtype=np.uint64)[None, None, :]
    hb = np.uint64(head_bytes)

    def addrs(
        base: int, layout: KVLayout, heads: RankHeads, pages: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.uint64]:
        page_start = (layers * np.uint64(layout.num_pages) + pages[None, :, None]) * np.uint64(
            layout.page_bytes
        )
        offset = np.uint64(part.head_start - heads.start) * hb
        token = tokens * np.uint64(heads.count) * hb
        return (np.uint64(base) + page_start + token + offset).ravel()

    n = src.num_layers * sp.size * page_size
    runs = np.empty((2 * n, 3), dtype=np.uint64)
    runs[:, 0] = np.concatenate(
        [addrs(src.k_addr, src, src_heads, sp), addrs(src.v_addr, src, src_heads, sp)]
    )
    runs[:, 1] = np.concatenate(
        [addrs(dst.k_addr, dst, dst_heads, dp), addrs(dst.v_addr, dst, dst_heads, dp)]
    )
    runs[:, 2] = np.uint64(part.num_heads) * hb
    return coalesce_runs(runs)


@dataclass(frozen=True)
class TPPlace:
    """Where one rank's KV pool sits in its instance: TP rank `rank` of `size`, holding the
    pool's KV heads from global head `kv_head_start` of the model's `total_kv_heads` (0: all
    of them, no TP). What a side's KVSpec carries so the peer can plan head slices."""

    rank: int = 0
    size: int = 1
    kv_head_start: int = 0
    total_kv_heads: int = 0


def tp_place(host: PipelineHost) -> tuple[TPPlace, Any]:
    """An engine's (rank 0's) place, and its TP group's rendezvous store (where the follower
    ranks' transfer agents find rank 0; None without TP): the manager's last arguments."""
    tp = host.tp_group
    start, total = host.kv_head_range
    return TPPlace(tp.rank, tp.size, start, total), tp.store if tp.enabled else None
