"""Where KV bytes are: memory regions, runs of (local, remote, length), and the pool layout.

Kept apart from the contract (`transfer.py`) because both the control plane, which builds
a request's runs from page ids, and every backend, which checks runs against registered
memory, use these helpers; none of them touch a transport.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from pdcore.model.kv_pool import KVPool

RunArray = npt.NDArray[np.uint64]
"""Runs to write, shape (N, 3): local address, remote address, length in bytes."""
RunsLike = RunArray | Sequence[tuple[int, int, int]]


class TransferError(Exception):
    """A transfer-level failure whose message says what to fix or which peer is at fault."""


def parse_device(device: str) -> tuple[str, int]:
    """Map "cpu" to ("cpu", 0), "cuda:N" to ("cuda", N) and "npu:N" (Ascend) to ("npu", N);
    anything else is refused, so a backend never guesses what memory it was handed."""
    if device == "cpu":
        return "cpu", 0
    kind, _, index = device.partition(":")
    if kind in ("cuda", "npu") and index.isdigit():
        return kind, int(index)
    raise ValueError(f"device must be 'cpu', 'cuda:N' or 'npu:N', not {device!r}")


@dataclass(frozen=True)
class MemoryRegion:
    """A byte range a backend may read from (sender) or be written into (receiver)."""

    addr: int
    length: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.addr <= 0 or self.length <= 0:
            raise ValueError(f"memory region needs addr > 0 and length > 0, got {self}")
        parse_device(self.device)


def as_runs(runs: RunsLike) -> RunArray:
    """Normalise runs to a contiguous (N, 3) uint64 array; zero-length runs are refused."""
    arr = np.asarray(runs, dtype=np.uint64)
    if arr.size == 0:
        return np.empty((0, 3), dtype=np.uint64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"runs must be (local, remote, length) triples, got shape {arr.shape}")
    if not arr[:, 2].all():
        raise ValueError("runs must not have length 0")
    return np.ascontiguousarray(arr)


def coalesce_runs(runs: RunsLike) -> RunArray:
    """Merge each run into the previous one when both its local and its remote address
    continue it. Every descriptor costs a transport a fixed overhead (tens of µs on some),
    so adjacent pages must travel as one run. Order is kept; nothing is sorted."""
    arr = as_runs(runs)
    if len(arr) < 2:
        return arr
    loc, rem, length = arr[:, 0], arr[:, 1], arr[:, 2]
    follows = (loc[1:] == loc[:-1] + length[:-1]) & (rem[1:] == rem[:-1] + length[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~follows)))
    out = np.empty((len(starts), 3), dtype=np.uint64)
    out[:, 0] = loc[starts]
    out[:, 1] = rem[starts]
    out[:, 2] = np.add.reduceat(length, starts)
    return out


@dataclass(frozen=True)
class KVLayout:
    """Where one side's KV pool lives: each of its buffers one tensor shaped
    [num_layers, num_pages, page_size, kv_heads, head_dim] (DESIGN.md §4), so page p of
    layer l starts at base + (l * num_pages + p) * page_bytes. An "mha" pool has two, K
    and V; an "mla" pool one (the latent + rope key "head"), so `v_addr` is 0 there."""

    k_addr: int
    v_addr: int
    num_layers: int
    num_pages: int
    page_bytes: int
    device: str = "cpu"

    @classmethod
    def from_pool(cls, pool: KVPool) -> KVLayout:
        buffers = pool.buffers()  # [K, V] ("mha") or [latent] ("mla")
        if not 1 <= len(buffers) <= 2:
            raise ValueError(f"a KV pool has one or two buffers, not {len(buffers)}")
        t = buffers[0]
        device = "cpu" if t.device.type == "cpu" else f"{t.device.type}:{t.device.index or 0}"
        return cls(
            buffers[0].data_ptr(),
            buffers[1].data_ptr() if len(buffers) == 2 else 0,
            pool.num_layers,
            pool.num_pages,
            pool.page_bytes_per_layer,
            device,
        )

    @property
    def buffer_addrs(self) -> tuple[int, ...]:
        """The base of every buffer, in transfer order: (K, V), or (latent,) for MLA."""
        return (self.k_addr, self.v_addr) if self.v_addr else (self.k_addr,)

    def regions(self) -> list[MemoryRegion]:
        """The regions to register: all of each buffer."""
        size = self.num_layers * self.num_pages * self.page_bytes
        return [MemoryRegion(a, size, self.device) for a in self.buffer_addrs]


def kv_page_runs(
    local: KVLayout,
    remote: KVLayout,
    local_pages: Sequence[int] | npt.NDArray[Any],
    remote_pages: Sequence[int] | npt.NDArray[Any],
) -> RunArray:
    """Runs that copy `local_pages[i]` to `remote_pages[i]` in every layer of every buffer
    (K then V, or MLA's one), coalesced. Whole pages move: a request's last page is its own
    on both sides."""
    check_same_buffers(local, remote)
    if (local.num_layers, local.page_bytes) != (remote.num_layers, remote.page_bytes):
        raise TransferError(
            f"KV layouts differ: local {local.num_layers} layers x {local.page_bytes} B/page, "
            f"remote {remote.num_layers} layers x {remote.page_bytes} B/page"
        )
    lp = np.asarray(local_pages, dtype=np.uint64)
    rp = np.asarray(remote_pages, dtype=np.uint64)
    if lp.shape != rp.shape or lp.ndim != 1:
        raise ValueError(f"page lists differ in length: {lp.shape} vs {rp.shape}")
    if lp.size and (lp.max() >= local.num_pages or rp.max() >= remote.num_pages):
        raise ValueError("page id out of range of the pool")
    layers = np.arange(local.num_layers, dtype=np.uint64)[:, None]
    pb = np.uint64(local.page_bytes)

    def addrs(base: int, num_pages: int, pages: npt.NDArray[np.uint64]) -> RunArray:
        return (np.uint64(base) + (layers * np.uint64(num_pages) + pages[None, :]) * pb).ravel()

    n_buf = len(local.buffer_addrs)
    runs = np.empty((n_buf * local.num_layers * lp.size, 3), dtype=np.uint64)
    runs[:, 0] = np.concatenate([addrs(a, local.num_pages, lp) for a in local.buffer_addrs])
    runs[:, 1] = np.concatenate([addrs(a, remote.num_pages, rp) for a in remote.buffer_addrs])
    runs[:, 2] = pb
    return coalesce_runs(runs)


def check_same_buffers(local: KVLayout, remote: KVLayout) -> None:
    """TransferError when one side keeps K and V and the other MLA's single latent buffer
    (the handshake's spec check says so first; this guards every run builder)."""
    if len(local.buffer_addrs) != len(remote.buffer_addrs):

        def kind(layout: KVLayout) -> str:
            return "K and V (mha)" if layout.v_addr else "one latent buffer (mla)"

        raise TransferError(f"KV layouts differ: local {kind(local)}, remote {kind(remote)}")


class RegionTable:
    """Registered regions of one side, to check runs before a transport sees them (a bad
    address must be a clear error, not a segfault or garbage in someone else's pages) and to
    tell which device a batch is on. Backends ship `to_wire()` inside their blob."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts = np.empty(0, dtype=np.uint64)
        self._ends = np.empty(0, dtype=np.uint64)
        self.add(regions)

    def add(self, regions: Iterable[MemoryRegion]) -> None:
        merged = sorted([*self._regions, *regions], key=lambda r: r.addr)
        for a, b in zip(merged, merged[1:]):
            if a.addr + a.length > b.addr:
                raise ValueError(f"memory regions overlap: {a} and {b}")
        self._regions = merged
        self._starts = np.array([r.addr for r in merged], dtype=np.uint64)
        self._ends = np.array([r.addr + r.length for r in merged], dtype=np.uint64)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def device_of(self, addrs: RunArray, lengths: RunArray, side: str) -> str:
        """The one device all these ranges lie on; raises TransferError when a range falls
        outside every region or the ranges span devices (a transport moves one memory type
        per side per batch)."""
        if not self._regions:
            raise TransferError(f"{side} side has no registered memory")
        idx = np.searchsorted(self._starts, addrs, side="right").astype(np.int64) - 1
        inside = idx >= 0
        # lengths <= end - addr, not addr + length <= end: the sum can wrap around in uint64
        a, ends = addrs[inside], self._ends[idx[inside]]
        inside[inside] = (a < ends) & (lengths[inside] <= ends - np.minimum(a, ends))
        if not inside.all():
            i = int(np.flatnonzero(~inside)[0])
            raise TransferError(
                f"{side} range {int(addrs[i]):#x}+{int(lengths[i])} is outside the "
                f"{len(self._regions)} registered region(s)"
            )
        devices = {self._regions[i].device for i in np.unique(idx)}
        if len(devices) != 1:
            raise TransferError(f"a batch must stay on one {side} device, got {sorted(devices)}")
        return devices.pop()

    def to_wire(self) -> list[list[Any]]:
        return [[r.addr, r.length, r.device] for r in self._regions]

    @classmethod
    def from_wire(cls, data: Any) -> RegionTable:
        try:
            return cls(MemoryRegion(int(a), int(n), str(d)) for a, n, d in data)
        except (TypeError, ValueError) as exc:
            raise TransferError(f"peer blob has malformed memory regions: {exc}") from exc


def checked_runs(runs: RunsLike, local: RegionTable, remote: RegionTable) -> RunArray:
    """What every backend's `submit` needs first: the runs coalesced, each inside
    registered memory on both sides. A caller's mistake (bad shape, zero length, a range
    outside every region) is a TransferError, as the contract says, never a ValueError."""
    try:
        arr = coalesce_runs(runs)
    except ValueError as exc:
        raise TransferError(str(exc)) from exc
    if len(arr):
        local.device_of(arr[:, 0], arr[:, 2], "local")
        remote.device_of(arr[:, 1], arr[:, 2], "remote")
    return arr
