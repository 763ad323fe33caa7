"""Start-up decisions of an engine: device, dtype and how many KV pages fit in memory."""

from __future__ import annotations

import logging
import os

import torch

from pdcore.engine.kv_pool import KVPool
from pdcore.model.config import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# On a CPU without mem_fraction_static the pool gets this share of available RAM, capped.
_CPU_POOL_SHARE = 0.2
_CPU_POOL_CAP_BYTES = 4 << 30


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware computes it natively, else fp32 on CPU, fp16 on GPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pool_pages(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    page_size: int,
    max_total_tokens: int | None,
    mem_fraction_static: float | None,
) -> int:
    """Number of pages (including the padding page) for the KV pool."""
    per_token = KVPool.bytes_per_token(
        config.num_layers, config.num_kv_heads, config.head_dim, dtype
    )
    if max_total_tokens is not None:
        tokens = max_total_tokens
    else:
        available = _available_bytes(device)
        if mem_fraction_static is not None:
            budget = int(available * mem_fraction_static)
        elif device.type == "cuda":
            budget = int(available * 0.85)
        else:
            budget = min(int(available * _CPU_POOL_SHARE), _CPU_POOL_CAP_BYTES)
        tokens = budget // per_token
    pages = max(tokens // page_size, 1) + 1
    logger.info(
        "KV pool: %d pages of %d tokens (%.1f MiB)",
        pages - 1,
        page_size,
        pages * page_size * per_token / 2**20,
    )
    return pages
