"""The CPU's feature flags, read without torch: `pdcore serve` checks flags that depend on
them (e.g. --quantized-prefill-dtype bfloat16) in its HTTP frontend, before any weights load,
and the kernels (pdcore.model.native_cpu) pick their variant from the same set."""

from __future__ import annotations

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
