"""Benchmark metrics from per-request timings: pure functions, no I/O.

Definitions follow SGLang's bench_serving so numbers are comparable across tools:
TTFT = first chunk with text - send; ITL = gap between token-carrying chunks, split evenly
over the tokens a chunk carries; TPOT = (e2e - TTFT) / (output tokens - 1); concurrency =
sum of e2e latencies / duration. Percentiles are numpy's (linear interpolation), std is the
population std, and an empty series reports 0 -- all as SGLang does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; `start`/`end` are perf_counter values
    so overlaps (concurrency) can be computed; `output_tokens` is the server's count when it
    reported one (`output_tokens_reported`)."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start: float = 0.0
    end: float = 0.0
    generated_text: str = ""
    server_prompt_tokens: int | None = None
    output_tokens_reported: bool = True


def chunk_itls(gap: float, new_tokens: int) -> list[float]:
    """ITLs for a chunk that arrived `gap` s after the previous one carrying `new_tokens`
    tokens: the gap split evenly, so a chunk of k tokens counts k latencies, not one
    k-times-too-long one (servers batch tokens per chunk under load or speculation)."""
    if new_tokens <= 0:
        return []
    return [gap / new_tokens] * new_tokens


def request_tpot(result: RequestResult) -> float | None:
    """Time per output token after the first; None for a request with fewer than 2 tokens."""
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def summarize_ms(values_s: list[float]) -> dict[str, float]:
    """mean, median, std and p90/p95/p99 in milliseconds of values given in seconds."""
    arr = np.asarray(values_s, dtype=float) * 1000.0 if values_s else np.zeros(1)
    out = {
        "mean": float(np.mean(arr)),
        "median": float(np.median(arr)),
        "std": float(np.std(arr)),
    }
    for p in PERCENTILES[1:]:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def meets_slo(result: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """A successful request within every SLO given (a missing SLO always holds; a one-token
    request has no TPOT and so meets any TPOT SLO)."""
    if not result.success:
        return False
    if slo_ttft_ms is not None and result.ttft * 1000.0 > slo_ttft_ms:
        return False
    tpot = request_tpot(result)
    return not (slo_tpot_ms is not None and tpot is not None and tpot * 1000.0 > slo_tpot_ms)


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    """Most requests in flight at once, from (start, end) pairs; an end at the same instant
    as a start is counted first, so back-to-back requests do not overlap."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def failure_reasons(results: list[RequestResult]) -> dict[str, int]:
    """How many requests failed for each distinct error message (trimmed to 200 chars)."""
    return dict(Counter(r.error[:200] or "unknown error" for r in results if not r.success))


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    """The report's numbers, flat and named as in SGLang's bench_serving JSON
    (mean_ttft_ms, p99_itl_ms, ...) plus p90, goodput and failure reasons."""
    ok = [r for r in results if r.success]
    duration_s = max(duration_s, 1e-9)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    server_in = [r.server_prompt_tokens for r in ok]
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failure_reasons": failure_reasons(results),
        "duration": duration_s,
        "total_input_tokens": total_in,
        "total_input_tokens_server": (sum(server_in) if ok and None not in server_in else None),
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "input_throughput": total_in / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "concurrency": sum(r.latency for r in ok) / duration_s,
        "peak_concurrency": peak_concurrency([(r.start, r.end) for r in results]),
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "itl": [x for r in ok for x in r.itl],
        "tpot": [t for t in (request_tpot(r) for r in ok) if t is not None],
        "e2e_latency": [r.latency for r in ok],
    }
    for name, values in series.items():
        for stat, value in summarize_ms(values).items():
            metrics[f"{stat}_{name}_ms"] = value
    slo_given = slo_ttft_ms is not None or slo_tpot_ms is not None
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in results)
    metrics.update(
        {
            "slo_ttft_ms": slo_ttft_ms,
            "slo_tpot_ms": slo_tpot_ms,
            "good_requests": good if slo_given else None,
            "goodput": good / duration_s if slo_given else None,
            "slo_attainment": good / len(results) if slo_given and results else None,
        }
    )
    return metrics
