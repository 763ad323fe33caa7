"""Scattered runs for the conformance kit, and what the receiver's bytes must be after them.

Runs are offsets (source offset, destination offset, length); the kit adds the real base
addresses. They mimic KV pages after churn: many small runs at random places, some that
continue the previous run on both sides (coalescable) and some that do not, in random order.
"""

from __future__ import annotations

import numpy as np

from pdcore.disagg.transfer import RunArray

SLOT = 4096


def scattered_runs(rng: np.random.Generator, src_bytes: int, dst_off: int, size: int) -> RunArray:
    """About `size / SLOT / 2 * 1.35` runs inside [dst_off, dst_off + size), never overlapping
    on the destination; lengths from 1 byte to 1.5 KiB."""
    slots = rng.permutation(size // SLOT)[: max(1, size // SLOT // 2)]
    out: list[tuple[int, int, int]] = []
    for s in slots:
        start = dst_off + int(s) * SLOT + int(rng.integers(0, 1024))
        length = int(rng.integers(1, 1536))
        src = int(rng.integers(0, src_bytes - 2 * SLOT))
        out.append((src, start, length))
        room = dst_off + (int(s) + 1) * SLOT - (start + length)
        if room > 1 and rng.random() < 0.35:  # continues the run on both sides: coalescable
            out.append((src + length, start + length, int(rng.integers(1, min(room, 1024)))))
    return np.array(out, dtype=np.uint64)


def expected_chunk(src: np.ndarray, runs: RunArray, dst_off: int, size: int) -> np.ndarray:
    """The destination chunk (zeros to start) after `runs` were applied exactly."""
    out = np.zeros(size, dtype=np.uint8)
    for s, d, n in runs.tolist():
        out[d - dst_off : d - dst_off + n] = src[s : s + n]
    return out


def first_bad_run(got: np.ndarray, want: np.ndarray, runs: RunArray, dst_off: int) -> str:
    """Say how `got` differs from `want`: how many runs are wrong, the first one, and
    whether bytes outside every run were touched."""
    bad = [
        i
        for i, (_, d, n) in enumerate(runs.tolist())
        if not np.array_equal(
            got[d - dst_off : d - dst_off + n], want[d - dst_off : d - dst_off + n]
        )
    ]
    outside = np.ones(len(want), dtype=bool)
    for _, d, n in runs.tolist():
        outside[d - dst_off : d - dst_off + n] = False
    stray = int(np.count_nonzero(got[outside] != want[outside]))
    parts = []
    if bad:
        _, d, n = runs[bad[0]].tolist()
        parts.append(
            f"{len(bad)} of {len(runs)} runs have wrong bytes (first: run {bad[0]}, "
            f"destination offset {d - dst_off} in the chunk, {n} B)"
        )
    if stray:
        parts.append(f"{stray} byte(s) outside every run were overwritten")
    return "; ".join(parts) or "bytes match"
