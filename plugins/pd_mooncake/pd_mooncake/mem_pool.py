"""Mooncake custom memory pools (SGLANG_MOONCAKE_CUSTOM_MEM_POOL), as SGLang does them.

With NVLINK or BAREX, the KV cache must live in memory Mooncake's transport can export: SGLang
allocates its KV buffers inside `torch.cuda.MemPool(allocator.allocator())`, where the
allocator is `mooncake.allocator.NVLinkAllocator.get_allocator(device)` (fabric / VMM memory
from Mooncake's nvlink_allocator.so) or `BarexAllocator.get_allocator(device)` (libaccl_barex).
INTRA_NODE_NVLINK keeps ordinary CUDA memory (SGLang builds no pool for it: its transport
shares cudaMalloc memory through CUDA IPC) and only selects the nvlink transport.

The engine asks every plugin for a KV pool allocator (hook `pdcore_kv_pool_allocation`);
this plugin answers with `kv_pool_allocation` below when a pool is configured and the pool is
on a CUDA device. `unavailable_reason` is the cheap check MooncakeSettings runs at flag
parsing: the non-CUDA Mooncake build (mooncake-transfer-engine-non-cuda, what CPU machines
get) has neither `mooncake.allocator` nor the nvlink transport, so any pool is refused there
with a one-line reason before a model loads.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "SGLANG_MOONCAKE_CUSTOM_MEM_POOL"
ALLOCATORS = {"NVLINK": "NVLinkAllocator", "BAREX": "BarexAllocator"}
"""Pools allocated through Mooncake's allocator; INTRA_NODE_NVLINK is transport only."""
_NVLINK_SO = "nvlink_allocator.so"
_BAREX_PATHS = ("/usr/lib/libaccl_barex.so", "/usr/lib64/libaccl_barex.so")
_CUDA_DIST = "mooncake-transfer-engine"
_CPU_DIST = "mooncake-transfer-engine-non-cuda"

_live_pools: list[Any] = []
"""MemPools whose memory backs a live KV cache: kept for the life of the process."""


def _mooncake_dir() -> Path | None:
    spec = importlib.util.find_spec("mooncake")  # top level: finds without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def unavailable_reason(pool: str) -> str | None:
    """None when `pool` can be used here; otherwise one line naming the variable, what is
    missing and what to install. Reads files and package metadata; imports torch only when
    Mooncake's CUDA build is present (to ask for a CUDA device)."""
    if not pool:
        return None
    where = _mooncake_dir()
    if where is None:
        return f"{ENV}={pool}: mooncake is not installed (pip install pd-mooncake)"
    if not (where / "allocator.py").exists():  # the non-CUDA build ships no allocator
        build = next((d for d in (_CPU_DIST, _CUDA_DIST) if _installed(d)), "mooncake")
        return (
            f"{ENV}={pool}: the installed Mooncake build ({build}) has no CUDA support "
            f"(no mooncake.allocator); custom memory pools need {_CUDA_DIST} and a CUDA GPU. "
            f"Unset {ENV} to use TCP (or RDMA with --disaggregation-ib-device)"
        )
    if pool == "NVLINK" and not (where / _NVLINK_SO).exists():
        return f"{ENV}=NVLINK: {_NVLINK_SO} is missing from {where} (Mooncake too old?)"
    if pool == "BAREX" and not any(
        os.path.exists(p) for p in (*_BAREX_PATHS, str(where / "libaccl_barex.so"))
    ):
        return f"{ENV}=BAREX: libaccl_barex.so not found ({', '.join(_BAREX_PATHS)}, {where})"
    import torch

    if not torch.cuda.is_available():
        return f"{ENV}={pool}: no CUDA device is visible; the pool holds a CUDA KV cache"
    return None


@contextlib.contextmanager
def kv_pool_allocation(pool: str, device: Any) -> Iterator[None]:
    """Tensors created inside come from Mooncake's allocator for `pool` on `device` (a CUDA
    torch.device); the MemPool stays alive with the process, as the KV cache does."""
    import torch
    from mooncake import allocator as mc_allocator

    allocator = getattr(mc_allocator, ALLOCATORS[pool]).get_allocator(device)
    # A MemPool binds to the current device: create it on the KV cache's.
    with torch.cuda.device(device):
        mem_pool = torch.cuda.MemPool(allocator.allocator())
    _live_pools.append(mem_pool)
    with torch.cuda.use_mem_pool(mem_pool, device=device):
        yield
