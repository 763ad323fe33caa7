"""What a benchmark run is asked to do: `BenchConfig`, and the flags that fill it.

Kept apart from the orchestration, and free of heavy imports (httpx, numpy), so that
building the `pdcore` command line stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("sglang", "openai", "openai-chat")


def normalize_base_url(base_url: str | None, host: str, port: int) -> str:
    """The server's root URL: --base-url if given (a trailing /v1 or / is dropped, since
    routes are appended), else http://host:port."""
    url = base_url or f"http://{host}:{port}"
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


DATASETS = ("random", "sharegpt")


@dataclass
class BenchConfig:
    """Everything a run needs; the defaults are SGLang bench_serving's."""

    base_url: str = "http://127.0.0.1:30000"
    backend: str = "sglang"
    model: str | None = None
    tokenizer: str | None = None
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 1
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    stream: bool = True
    ignore_eos: bool = True
    warmup_requests: int = 1
    extra_request_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    timeout_s: float = 6 * 3600.0
    progress: bool = True
    output_details: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `pdcore bench serving` (named as in SGLang's bench_serving)."""
    d = BenchConfig()
    a = parser.add_argument
    a("--base-url", help="server root URL, e.g. http://10.0.0.5:30000 (overrides --host/--port)")
    a("--host", default="127.0.0.1", help="server host (default: %(default)s)")
    a("--port", type=int, default=30000, help="server port (default: %(default)s)")
    a("--backend", choices=BACKENDS, default=d.backend, help="API to call (default: %(default)s)")
    a("--model", help="model name sent to OpenAI routes (default: the first in /v1/models)")
    a(
        "--tokenizer",
        help="tokenizer name or path ('none': use server counts; default: the server's)",
    )
    a("--dataset", "--dataset-name", choices=DATASETS, default=d.dataset, dest="dataset")
    a("--dataset-path", help="a ShareGPT JSON/JSONL file (default: the small one pdcore ships)")
    a(
        "--num-prompts",
        type=int,
        default=d.num_prompts,
        help="requests to send (default: %(default)s)",
    )
    a("--random-input-len", type=int, default=d.random_input_len, help="max prompt tokens")
    a("--random-output-len", type=int, default=d.random_output_len, help="max output tokens")
    a(
        "--random-range-ratio",
        type=float,
        default=d.random_range_ratio,
        help="lengths drawn from [len*ratio, len]; 1.0 = fixed (default: %(default)s)",
    )
    a("--sharegpt-output-len", type=int, help="output tokens for every ShareGPT request")
    a(
        "--request-rate",
        type=float,
        default=d.request_rate,
        help="requests per second, Poisson arrivals; inf = all at once (default: inf)",
    )
    a("--max-concurrency", type=int, help="most requests in flight at once (default: no cap)")
    a(
        "--seed",
        type=int,
        default=d.seed,
        help="seed for prompts and arrivals (default: %(default)s)",
    )
    a(
        "--slo-ttft",
        type=float,
        dest="slo_ttft_ms",
        metavar="MS",
        help="TTFT SLO in ms, for goodput",
    )
    a(
        "--slo-tpot",
        type=float,
        dest="slo_tpot_ms",
        metavar="MS",
        help="TPOT SLO in ms, for goodput",
    )
    a("--disable-stream", action="store_true", help="non-streaming requests (TTFT = latency)")
    a("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    a("--warmup-requests", type=int, default=d.warmup_requests, help="untimed requests first")
    a("--extra-request-body", help="JSON object merged into every request, e.g. '{\"top_k\": 1}'")
    a("--api-key", help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    a(
        "--timeout",
        type=float,
        default=d.timeout_s,
        dest="timeout_s",
        metavar="S",
        help="seconds a request may wait for the server between bytes (default: 6 h)",
    )
    a("--output-file", help="write the report as JSON to this file")
    a("--output-details", action="store_true", help="add per-request timings to the JSON")
    a("--disable-tqdm", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    """Check the flags (parser.error names the bad one) and build the config."""
    positive = {
        "--num-prompts": args.num_prompts,
        "--random-input-len": args.random_input_len,
        "--random-output-len": args.random_output_len,
        "--request-rate": args.request_rate,
        "--max-concurrency": args.max_concurrency,
        "--sharegpt-output-len": args.sharegpt_output_len,
        "--timeout": args.timeout_s,
        "--port": args.port,
    }
    for flag, value in positive.items():
        if value is not None and not value > 0:
            parser.error(f"argument {flag}: must be > 0, got {value}")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        parser.error(
            f"argument --random-range-ratio: must be in [0, 1], got {args.random_range_ratio}"
        )
    if args.warmup_requests < 0:
        parser.error("argument --warmup-requests: must be >= 0")
    extra: dict[str, Any] = {}
    if args.extra_request_body:
        try:
            extra = json.loads(args.extra_request_body)
        except ValueError as exc:
            parser.error(f"argument --extra-request-body: not valid JSON: {exc}")
        if not isinstance(extra, dict):
            parser.error("argument --extra-request-body: must be a JSON object")
    if args.dataset_path and not os.path.isfile(args.dataset_path):
        parser.error(f"argument --dataset-path: no such file: {args.dataset_path}")
    base = normalize_base_url(args.base_url, args.host, args.port)
    return BenchConfig(
        base_url=base,
        backend=args.backend,
        model=args.model,
        tokenizer=args.tokenizer,
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        num_prompts=args.num_prompts,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        sharegpt_output_len=args.sharegpt_output_len,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        stream=not args.disable_stream,
        ignore_eos=not args.disable_ignore_eos,
        warmup_requests=args.warmup_requests,
        extra_request_body=extra,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        timeout_s=args.timeout_s,
        progress=not args.disable_tqdm,
        output_details=args.output_details,
    )
