"""The CPU's feature flags and the kernel overrides, read without torch: `pdcore serve`
checks flags that depend on them (e.g. --quantized-prefill-dtype bfloat16) in its HTTP
frontend, before any weights load; the kernels (pdcore.model.native_cpu) pick their variant
and the engine its dtype from the same answers."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path


@cache
def cpu_features() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo spells them (empty where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bf16 itself (AVX512-BF16/AMX); elsewhere torch emulates
    bf16 GEMMs in fp32, ~3x slower than fp32 itself."""
    feats = cpu_features()
    return "avx512_bf16" in feats or "amx_bf16" in feats


def kernels_disabled() -> bool:
    """PDCORE_DISABLE_NATIVE_KERNELS: pdcore's CPU kernels off (the torch paths run)."""
    return os.environ.get("PDCORE_DISABLE_NATIVE_KERNELS", "") not in ("", "0")


def forced_variant() -> str:
    """PDCORE_CPU_ISA: the kernel variant forced, lower-case, or "" (auto: the best one)."""
    forced = os.environ.get("PDCORE_CPU_ISA", "").strip().lower()
    return "" if forced == "auto" else forced
