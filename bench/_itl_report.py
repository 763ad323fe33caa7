"""Numbers and the plot for bench/pd_vs_unified.py, from the client-side token traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pdcore.bench.metrics import RequestResult, meets_slo


def _pct(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    a = np.asarray(values) * 1000.0
    return {
        "count": len(values),
        "mean": round(float(a.mean()), 2),
        "p50": round(float(np.percentile(a, 50)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
    }


def burst_windows(traces: list[Any]) -> list[tuple[float, float]]:
    """(arrival, last first token) of each burst: while its prefill work is in the system."""
    by_burst: dict[int, list[Any]] = {}
    for t in traces:
        if t.kind == "burst":
            by_burst.setdefault(t.burst, []).append(t)
    windows = []
    for group in by_burst.values():
        starts = [t.sent for t in group]
        firsts = [t.token_times[0] for t in group if t.token_times]
        if firsts:
            windows.append((min(starts), max(firsts)))
    return sorted(windows)


def itl_samples(traces: list[Any], windows: list[tuple[float, float]]):
    """Yield (token time, gap, during_burst) for every gap between two streamed tokens."""
    for t in traces:
        if t.kind != "stream":
            continue
        for a, b in zip(t.token_times, t.token_times[1:]):
            during = any(a < we and b > ws for ws, we in windows)
            yield b, b - a, during


def summarize(t0: float, traces: list[Any], slo: tuple[float, float]) -> dict[str, Any]:
    windows = burst_windows(traces)
    quiet, burst = [], []
    for _, gap, during in itl_samples(traces, windows):
        (burst if during else quiet).append(gap)
    itl = {"quiet": _pct(quiet), "burst": _pct(burst)}
    if quiet and burst:
        itl["p99_burst_over_quiet"] = round(itl["burst"]["p99"] / itl["quiet"]["p99"], 2)
    done = [t for t in traces if not t.error and t.token_times]
    end = max(t.token_times[-1] for t in done) if done else t0
    slo_ttft, slo_tpot = slo
    good = 0
    ttft: dict[str, list[float]] = {"stream": [], "burst": []}
    for t in done:
        first = t.token_times[0] - t.sent
        ttft[t.kind].append(first)
        result = RequestResult(  # pdcore bench serving's definitions of TPOT and the SLOs
            success=True,
            ttft=first,
            latency=t.token_times[-1] - t.sent,
            output_tokens=len(t.token_times),
        )
        good += meets_slo(result, slo_ttft * 1000, slo_tpot * 1000)
    elapsed = max(end - t0, 1e-9)
    return {
        "requests": len(traces),
        "errors": sorted({t.error for t in traces if t.error}),
        "failed": sum(1 for t in traces if t.error),
        "bursts": len(windows),
        "burst_window_s": [round(we - ws, 2) for ws, we in windows],
        "itl_ms": itl,
        "ttft_ms": {k: _pct(v) for k, v in ttft.items()},
        "output_tokens_per_s": round(sum(len(t.token_times) for t in done) / elapsed, 1),
        "goodput": {
            "slo_ttft_ms": slo_ttft * 1000,
            "slo_tpot_ms": slo_tpot * 1000,
            "good_requests": good,
            "completed_requests": len(done),
            "fraction": round(good / len(done), 3) if done else 0.0,
            "requests_per_s": round(good / elapsed, 3),
        },
    }


def plot_timelines(raw: dict[str, dict[str, Any]], path: Path, workload: Any) -> None:
    """ITL over time, one panel per deployment, bursts shaded: the picture of the claim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(raw)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), sharex=True)
    axes = np.atleast_1d(axes)
    titles = {
        "unified": "unified: one instance, 2 cores",
        "pd": "PD: prefill on core 0, decode on core 1, router in front",
        "unified_chunked": "unified with a smaller --chunked-prefill-size, 2 cores",
    }
    for ax, name in zip(axes, names):
        t0, traces = raw[name]["t0"], raw[name]["traces"]
        windows = burst_windows(traces)
        for ws, we in windows:
            ax.axvspan(ws - t0, we - t0, color="tab:orange", alpha=0.2, lw=0)
        pts = list(itl_samples(traces, windows))
        for during, color, label in ((False, "tab:blue", "quiet"), (True, "tab:red", "burst")):
            xs = [b - t0 for b, _, d in pts if d is during]
            ys = [g * 1000 for _, g, d in pts if d is during]
            ax.scatter(xs, ys, s=4, color=color, label=f"ITL ({label})")
        ax.set_yscale("log")
        ax.set_ylabel("inter-token latency (ms)")
        ax.set_title(titles.get(name, name))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel(
        f"seconds since start — {workload.streams} decode streams; every "
        f"{workload.burst_every:.0f} s {workload.burst_size} prompts of "
        f"{workload.burst_input_len} tokens arrive (shaded until their prefill is done)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
