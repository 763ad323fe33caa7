"""Which prefill rank sends which KV heads of which layers to which decode rank, and the
byte runs.

With tensor parallelism each rank's KV pool holds only its KV heads: K and V shaped
[layers, pages, page_size, kv_heads_of_rank, head_dim]; with pipeline parallelism only its
stage's layers (indexed from 0 in the pool). When prefill and decode run different tp or pp
sizes the ranges differ, so a decode rank needs KV from one or several prefill ranks, and a
prefill rank's pages hold KV for one or several decode ranks. Both sides compute the same
plan from the two topologies (`transfer_plan`), so decode knows which notifications to wait
for without being told per room. A head held by several prefill ranks (replicated: tp > KV
heads) is sent by one of them only; a head held by several decode ranks is sent to each,
since each has its own pool. A layer is held by exactly one stage on each side.

Slicing by head and layer is the control plane's job, done once here; the data plane still
sees only (src, dst, length) runs. When both sides hold exactly the slice, whole pages move
(one run per page and layer, coalesced); otherwise one run per token, page and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pdcore.disagg.kv_runs import (
    KVLayout,
    RunArray,
    check_same_buffers,
    coalesce_runs,
    kv_page_runs,
)
from pdcore.engine.pipeline import PipelineHost


@dataclass(frozen=True)
class RankHeads:
    """The KV one rank holds: global KV heads [start, start + count) of global layers
    [layer_start, layer_start + layers) (`layers` 0: every layer, as without PP). `rank`
    numbers the ranks of an instance: pp_rank * tp_size + tp_rank (the TP rank without PP)."""

    rank: int
    start: int
    count: int
    layer_start: int = 0
    layers: int = 0

    @property
    def end(self) -> int:
        return self.start + self.count

    @property
    def layer_span(self) -> tuple[int, int]:
        """[first, end) of its global layers; (0, LAYERS_ALL) for every layer."""
        if not self.layers:
            return 0, LAYERS_ALL
        return self.layer_start, self.layer_start + self.layers

    @classmethod
    def from_spec(cls, spec: dict[str, Any], rank: int | None = None) -> RankHeads:
        """From a `KVSpec.to_wire()` map (a peer's; its fields are checked by the caller).
        `rank` defaults to the spec's own place (a peer without PP fields: its TP rank)."""
        if rank is None:
            rank = int(spec.get("pp_rank") or 0) * int(spec.get("tp_size") or 1) + int(
                spec["tp_rank"]
            )
        return cls(
            rank,
            int(spec["kv_head_start"]),
            int(spec["kv_heads"]),
            int(spec.get("layer_start") or 0),
            int(spec["num_layers"]),
        )


LAYERS_ALL = 1 << 62
"""A layer bound past any model's: what "every layer" spans."""


@dataclass(frozen=True)
class HeadSlice:
    """Prefill rank `prefill_rank` sends global KV heads [head_start, head_start +
    num_heads) of global layers [layer_start, layer_start + num_layers) to decode rank
    `decode_rank` (`num_layers` 0: every layer, as without PP)."""

    prefill_rank: int
    decode_rank: int
    head_start: int
    num_heads: int
    layer_start: int = 0
    num_layers: int = 0


def _segments(prefill: Sequence[RankHeads], d: RankHeads) -> list[tuple[int, int]]:
    """`d`'s layers cut wherever a prefill stage's range starts or ends inside them."""
    lo, hi = d.layer_span
    cuts = {lo, hi}
    for p in prefill:
        cuts.update(b for b in p.layer_span if lo < b < hi)
    bounds = sorted(cuts)
    return list(zip(bounds, bounds[1:]))


def transfer_plan(prefill: Sequence[RankHeads], decode: Sequence[RankHeads]) -> list[HeadSlice]:
    """Every decode rank's heads of every layer it holds, each taken from one prefill rank
    that holds both. Among several holders (replicated heads) decode rank r takes holder r
    mod n, so replicas share the sending. ValueError when a decode head or layer is held by
    no prefill rank."""
    slices: list[HeadSlice] = []
    ordered = sorted(prefill, key=lambda x: x.rank)
    for d in sorted(decode, key=lambda x: x.rank):
        for lo, hi in _segments(ordered, d):
            stage = [p for p in ordered if p.layer_span[0] <= lo and hi <= p.layer_span[1]]
            if not stage:
                raise ValueError(f"no prefill rank holds layer {lo} (decode rank {d.rank})")
            layers = (lo, hi - lo) if hi < LAYERS_ALL else (0, 0)
            h = d.start
            while h < d.end:
                holders = [p for p in stage if p.start <= h < p.end]
                if not holders:
                    raise ValueError(f"no prefill rank holds KV head {h} (decode rank {d.rank})")
                p = holders[d.rank % len(holders)]
                n = min(p.end, d.end) - h
                slices.append(HeadSlice(p.rank, d.rank, h, n, *layers))
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
    """Runs copying the heads and layers of `part` of `src_pages[i]` (a prefill rank's
    pool) into `dst_pages[i]` (a decode rank's pool), K then V (or MLA's one latent
    buffer), coalesced."""
    check_same_buffers(src, dst)
    all_heads = part.num_heads == src_heads.count == dst_heads.count
    if part.num_layers:  # the part's global layers, local to each pool
        n_layers = part.num_layers
        src_first = part.layer_start - src_heads.layer_span[0]
        dst_first = part.layer_start - dst_heads.layer_span[0]
    else:
        n_layers, src_first, dst_first = src.num_layers, 0, 0
        if src.num_layers != dst.num_layers:
            raise ValueError(f"layers differ: {src.num_layers} vs {dst.num_layers}")
    whole = n_layers == src.num_layers == dst.num_layers and src_first == dst_first == 0
    if all_heads and whole:
        return kv_page_runs(src, dst, src_pages, dst_pages)
    for name, first, layout in (("prefill", src_first, src), ("decode", dst_first, dst)):
        if first < 0 or first + n_layers > layout.num_layers:
            raise ValueError(
                f"layers {part.layer_start}..{part.layer_start + n_layers - 1} are not all in "
                f"the {name} pool ({layout.num_layers} layers)"
            )
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
    hb = np.uint64(head_bytes)
    # Whole pages when every head moves (a page is one run per layer), else one run per
    # token slot: a page stores a token's heads contiguously.
    tokens = np.arange(1 if all_heads else page_size, dtype=np.uint64)[None, None, :]

    def addrs(
        base: int, layout: KVLayout, heads: RankHeads, first: int, pages: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.uint64]:
        layers = np.arange(first, first + n_layers, dtype=np.uint64)[:, None, None]
        page_start = (layers * np.uint64(layout.num_pages) + pages[None, :, None]) * np.uint64(
            layout.page_bytes
        )
        offset = np.uint64(part.head_start - heads.start) * hb
        token = tokens * np.uint64(heads.count) * hb
        return (np.uint64(base) + page_start + token + offset).ravel()

    n = n_layers * sp.size * tokens.size
    runs = np.empty((len(src.buffer_addrs) * n, 3), dtype=np.uint64)
    runs[:, 0] = np.concatenate([addrs(a, src, src_heads, src_first, sp) for a in src.buffer_addrs])
    runs[:, 1] = np.concatenate([addrs(a, dst, dst_heads, dst_first, dp) for a in dst.buffer_addrs])
    runs[:, 2] = np.uint64(src.page_bytes) if all_heads else np.uint64(part.num_heads) * hb
    return coalesce_runs(runs)


@dataclass(frozen=True)
class TPPlace:
    """Where one rank's KV pool sits in its instance: rank `rank` of `size` (pp_rank *
    tp_size + tp_rank; the TP rank without PP), holding the pool's KV heads from global head
    `kv_head_start` of the model's `total_kv_heads` (0: all of them, no TP) and its layers
    from global layer `layer_start` of the model's `total_layers` (0: all of them, no PP).
    What a side's KVSpec carries so the peer can plan head and layer slices."""

    rank: int = 0
    size: int = 1
    kv_head_start: int = 0
    total_kv_heads: int = 0
    pp_size: int = 1
    layer_start: int = 0
    total_layers: int = 0

    @property
    def tp_size(self) -> int:
        return self.size // self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size


def tp_place(host: PipelineHost) -> tuple[TPPlace, Any]:
    """An engine's (rank 0's) place, and the rendezvous store of its TP group -- or, with
    --pp-size, of its grid -- where the other ranks' transfer agents find rank 0 (None
    without either): the manager's last arguments."""
    start, total = host.kv_head_range
    layer_start, total_layers = host.layer_range
    grid = host.pipeline_grid
    if grid is not None:
        world = grid.world
        place = TPPlace(
            world.rank, world.size, start, total, grid.pp_size, layer_start, total_layers
        )
        return place, world.store
    tp = host.tp_group
    place = TPPlace(tp.rank, tp.size, start, total, 1, layer_start, total_layers)
    return place, tp.store if tp.enabled else None
