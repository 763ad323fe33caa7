"""The report: a fixed-width table for people, a JSON file for scripts.

Both read the dict `run_benchmark` returns, so what is printed is exactly what is saved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

WIDTH = 60
SERIES = (  # (section title, key in the report, label in the rows)
    ("Time to First Token", "ttft", "TTFT"),
    ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
    ("Inter-Token Latency", "itl", "ITL"),
    ("End-to-End Latency", "e2e_latency", "E2E Latency"),
)
STATS = ("mean", "median", "std", "p90", "p95", "p99")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.2f}"
    return str(value)


def _row(label: str, value: Any) -> str:
    text = _fmt(value)
    return f"{label:<{WIDTH - len(text) - 1}} {text}"


def _title(text: str, fill: str = "-") -> str:
    return f" {text} ".center(WIDTH, fill)


def format_report(report: dict[str, Any]) -> str:
    """The report as the table SGLang's bench_serving prints, plus goodput and failures."""
    rate = report.get("request_rate")
    lines = [
        _title("Serving Benchmark Result", "="),
        _row("Backend:", report.get("backend")),
        _row("Model:", report.get("model")),
        _row("Dataset:", report.get("dataset")),
        _row("Traffic request rate:", "inf" if rate is None else rate),
        _row("Max request concurrency:", report.get("max_concurrency") or "not set"),
        _row("Successful requests:", report["completed"]),
        _row("Failed requests:", report["failed"]),
        _row("Benchmark duration (s):", report["duration"]),
        _row("Total input tokens:", report["total_input_tokens"]),
        _row("Total generated tokens:", report["total_output_tokens"]),
        _row("Request throughput (req/s):", report["request_throughput"]),
        _row("Input token throughput (tok/s):", report["input_throughput"]),
        _row("Output token throughput (tok/s):", report["output_throughput"]),
        _row("Total token throughput (tok/s):", report["total_token_throughput"]),
        _row("Concurrency (mean):", report["concurrency"]),
        _row("Concurrency (peak):", report["peak_concurrency"]),
    ]
    for title, key, label in SERIES:
        lines.append(_title(title))
        for stat in STATS:
            lines.append(_row(f"{stat.capitalize()} {label} (ms):", report[f"{stat}_{key}_ms"]))
    if report.get("goodput") is not None:
        lines.append(_title("Goodput"))
        lines.append(_row("SLO TTFT (ms):", report.get("slo_ttft_ms")))
        lines.append(_row("SLO TPOT (ms):", report.get("slo_tpot_ms")))
        lines.append(_row("Requests meeting the SLOs:", report["good_requests"]))
        lines.append(_row("Goodput (req/s):", report["goodput"]))
        lines.append(_row("SLO attainment (%):", 100.0 * report["slo_attainment"]))
    if report["failure_reasons"]:
        lines.append(_title("Failures"))
        for reason, count in report["failure_reasons"].items():
            lines.append(f"{count:>5} x {reason}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    """Write the report as strict JSON (infinities become null, which every parser reads)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    Path(path).write_text(json.dumps(clean(report), indent=2, allow_nan=False) + "\n")
