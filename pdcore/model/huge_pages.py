"""Tensors the CPU kernels stream every decode step, copied into transparent huge pages.

Why: a batch-1 decode step reads every weight once -- ~100 MB for SmolLM2-135M in Q4_1,
some 25,000 pages of 4 KiB. Each page is a TLB miss (a Zen 4 core's L2 TLB holds 3,072
entries) and a page walk whose loads evict the cache lines the rest of the step runs on.
In 2 MiB pages the same bytes are ~50 TLB entries. Measured on an AMD EPYC Zen 4 KVM guest
(2 cores), the 120 layer matrices streamed back to back at batch 1: 22.4 -> 25.1 GB/s
median; the whole engine's batch-1 step 4.9 -> 4.4 ms (docs/benchmarks.md).

How: one private anonymous mapping, 2 MiB aligned, advised MADV_HUGEPAGE before its first
touch, the tensors copied in at 64-byte aligned offsets and handed back as views of it (the
views keep the mapping alive). Linux only; where transparent huge pages are "never" or the
kernel has no free 2 MiB pages the mapping stays in 4 KiB pages -- the same bytes, still
correct, just without the gain. `huge_page_bytes` says which it got.
"""

from __future__ import annotations

import dataclasses
import mmap
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_unavailable() -> str | None:
    """Why huge pages cannot be asked for here, or None when they can."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return f"transparent huge pages are Linux-only (this is {sys.platform})"
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return f"{_THP_SETTING} is unreadable (no transparent huge page support)"
    if "[never]" in setting:
        return f"transparent huge pages are off ({_THP_SETTING}: never)"
    return None


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def huge_page_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of contiguous CPU `tensors` (same dtypes, shapes and values) side by side in
    one mapping advised for huge pages; `tensors` unchanged where `thp_unavailable()`."""
    if not tensors or thp_unavailable() is not None:
        return list(tensors)
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("huge_page_copies takes contiguous CPU tensors")
    total = sum(_aligned(t.numel() * t.element_size()) for t in tensors)
    mapping = mmap.mmap(
        -1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )  # the spare 2 MiB lets the start move up to a 2 MiB boundary
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: faults then take 2 MiB
    arena = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive
    offset = -arena.data_ptr() % HUGE_PAGE
    copies = []
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        view = arena[offset : offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        copies.append(view)
        offset += _aligned(nbytes)
    return copies


def huge_page_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
    """A zero-filled CPU tensor in a fresh mapping advised for huge pages, or None where
    `thp_unavailable()`. Untouched, it costs no RAM (like torch.empty); each 2 MiB region
    commits on its first touch."""
    if thp_unavailable() is not None:
        return None
    nbytes = _aligned(int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size())
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive
    offset = -arena.data_ptr() % HUGE_PAGE
    return arena[offset : offset + nbytes].view(dtype)[: torch.Size(shape).numel()].view(shape)


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of the mapping holding `t` that sit in transparent huge pages (the kernel's
    AnonHugePages for it in /proc/self/smaps); 0 where unknown."""
    addr = t.data_ptr()
    inside = False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            start, _, end = head.partition("-")
            try:
                inside = int(start, 16) <= addr < int(end, 16)
            except ValueError:
                inside = False
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def linears_to_huge_pages(linears: Iterable[object]) -> int:
    """Move what decode streams of each linear -- a QuantLinear's packed blocks, a Linear's
    packed panels for our skinny GEMM -- into one huge-page mapping; other kinds stay.
    Returns the bytes moved (0 where `thp_unavailable()`). Call it before anything holds
    raw pointers to those tensors (decode_layers.DecodeLayers builds from them later)."""
    from pdcore.model.linear import Linear
    from pdcore.model.quantized import QuantLinear

    quant = [lin for lin in linears if isinstance(lin, QuantLinear)]
    dense = [lin for lin in linears if isinstance(lin, Linear) and lin.is_native_packed()]
    moving = [q.weight.packed for q in quant] + [d.packed_weights() for d in dense]
    if thp_unavailable() is not None or not moving:
        return 0
    copies = iter(huge_page_copies(moving))
    for q in quant:
        q.weight = dataclasses.replace(q.weight, packed=next(copies))
    for d in dense:
        d.replace_packed_weights(next(copies))
    return sum(t.numel() * t.element_size() for t in moving)
