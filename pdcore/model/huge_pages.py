"""The weights CPU decode streams every step, moved into transparent huge pages at load.

Why: a batch-1 decode step reads every weight once -- ~92 MiB for SmolLM2-135M in Q4_1,
some 24,000 pages of 4 KiB. Each page is a TLB miss (a Zen 4 core's L2 TLB holds 3,072
entries) and a page walk whose loads evict the cache lines the rest of the step runs on.
In 2 MiB pages the same bytes are ~50 TLB entries. Measured on an AMD EPYC Zen 4 KVM guest
(2 cores): the 120 layer matrices streamed back to back at batch 1, 22.4 -> 25.1 GB/s
median; two engines in one process alternating batch-1 runs, 5.34 -> 4.86 ms a step median
(docs/benchmarks.md).

How: one private anonymous mapping, aligned to the kernel's huge page size and advised
MADV_HUGEPAGE before its first touch; each tensor is copied in (64-byte aligned offsets)
and its owner switched to the copy before the next one is copied, so load needs the
mapping plus one tensor more, not twice the weights. The copies are views of the mapping
and keep it alive. Linux only; where transparent huge pages are "never", or the advice is
refused, nothing moves (the log says why); where the kernel has no free huge pages the
mapping stays in 4 KiB pages -- the same bytes, without the gain.

The KV pool is not moved: its pages are first touched during decode, where a huge page
fault may compact memory synchronously (a latency spike) and commits 2 MiB at a time.
"""

from __future__ import annotations

import dataclasses
import mmap
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_ALIGN = 64
_THP = Path("/sys/kernel/mm/transparent_hugepage")


def thp_unavailable() -> str | None:
    """Why huge pages cannot be asked for here, or None when they can."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return f"transparent huge pages are Linux-only (this is {sys.platform})"
    try:
        setting = (_THP / "enabled").read_text()
    except OSError:
        return f"{_THP / 'enabled'} is unreadable (no transparent huge page support)"
    if "[never]" in setting:
        return f"transparent huge pages are off ({_THP / 'enabled'}: never)"
    return None


def huge_page_size() -> int:
    """The kernel's transparent huge page size (2 MiB on x86-64; 512 MiB on arm64 kernels
    with 64 KiB base pages)."""
    try:
        return int((_THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _checked_nbytes(t: torch.Tensor) -> int:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("move_to_huge_pages takes contiguous CPU tensors")
    return t.nbytes


def _advised_arena(nbytes: int) -> torch.Tensor | None:
    """`nbytes` of a fresh mapping advised for huge pages, starting on a huge page
    boundary, as uint8; None where the advice is refused."""
    page = huge_page_size()
    whole = (nbytes + page - 1) // page * page  # whole huge pages past the aligned start
    mapping = mmap.mmap(-1, whole + page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: faults then take 2 MiB
    except OSError:
        mapping.close()
        return None
    arena = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive
    start = -arena.data_ptr() % page
    return arena[start : start + nbytes]


def move_to_huge_pages(
    count: int,
    get: Callable[[int], torch.Tensor],
    replace: Callable[[int, torch.Tensor], None],
) -> int:
    """Copy tensors get(0) .. get(count - 1) (contiguous, CPU) into one mapping advised for
    huge pages, handing each copy (same dtype, shape and values) to `replace(i, copy)`
    before the next is copied -- `replace` drops the owner's reference to the original, and
    nothing here keeps one, so the originals go one by one. Returns the bytes moved: 0
    where `thp_unavailable()` or the advice is refused (nothing is replaced then)."""
    sizes = [_checked_nbytes(get(i)) for i in range(count)]
    if not count or thp_unavailable() is not None:
        return 0
    arena = _advised_arena(sum(_aligned(n) for n in sizes))
    if arena is None:
        return 0
    offset = 0
    for i, n in enumerate(sizes):
        src = get(i)
        copy = arena[offset : offset + n].view(src.dtype).view(src.shape)
        copy.copy_(src)
        del src
        replace(i, copy)
        offset += _aligned(n)
    return sum(sizes)


def linears_to_huge_pages(linears: Sequence[object]) -> int:
    """Move what decode streams of each linear -- a QuantLinear's packed blocks, a Linear's
    packed panels for our skinny GEMM -- into huge pages (move_to_huge_pages); other kinds
    stay. Returns the bytes moved. Call it before anything holds raw pointers to those
    tensors (decode_layers.DecodeLayers builds from them later)."""
    from pdcore.model.linear import Linear
    from pdcore.model.quantized import QuantLinear

    quant = [lin for lin in linears if isinstance(lin, QuantLinear)]
    dense = [lin for lin in linears if isinstance(lin, Linear) and lin.is_native_packed()]

    def get(i: int) -> torch.Tensor:
        if i < len(quant):
            return quant[i].weight.packed
        return dense[i - len(quant)].packed_weights()

    def replace(i: int, copy: torch.Tensor) -> None:
        if i < len(quant):
            quant[i].weight = dataclasses.replace(quant[i].weight, packed=copy)
        else:
            dense[i - len(quant)].replace_packed_weights(copy)

    return move_to_huge_pages(len(quant) + len(dense), get, replace)
