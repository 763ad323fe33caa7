"""`pdcore bench serving`: load an LLM server with many requests and measure it.

The orchestration: probe the server, sample the prompts, warm up, then send every prompt
on a Poisson schedule (or all at once) under an optional concurrency cap, and turn the
timings into a report. `run_benchmark(config)` returns the report as a dict, so scripts in
bench/ can call it without a subprocess; the CLI only parses flags into a `BenchConfig`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import httpx

from pdcore.bench import endpoint
from pdcore.bench.clients import ROUTES, RequestSpec, request_func
from pdcore.bench.config import BenchConfig, add_arguments, config_from_args
from pdcore.bench.datasets import BenchRequest, sample_random, sample_sharegpt
from pdcore.bench.endpoint import BenchmarkError
from pdcore.bench.metrics import RequestResult, compute_metrics
from pdcore.bench.report import format_report, write_json


def sample_requests(config: BenchConfig, tokenizer: Any | None) -> list[BenchRequest]:
    if config.dataset == "random":
        return sample_random(
            config.num_prompts,
            config.random_input_len,
            config.random_output_len,
            config.random_range_ratio,
            config.seed,
            tokenizer,
        )
    return sample_sharegpt(
        config.num_prompts, config.seed, tokenizer, config.dataset_path, config.sharegpt_output_len
    )


async def arrivals(
    requests: list[BenchRequest], rate: float, seed: int
) -> AsyncIterator[BenchRequest]:
    """Yield requests on a Poisson process of `rate` per second (exponential gaps; the
    first at once), or all at once when the rate is infinite."""
    rng = random.Random(seed)
    for i, req in enumerate(requests):
        yield req
        if math.isfinite(rate) and i + 1 < len(requests):
            await asyncio.sleep(rng.expovariate(rate))


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, desc="requests")


async def arun_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Run one benchmark and return its report (see docs/bench-serving.md for the keys)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        probe = await endpoint.probe_server(client, config.base_url)
        model = endpoint.pick_model(config.model, probe, config.backend)
        source = endpoint.tokenizer_source(config.tokenizer, probe, model)
        tokenizer = endpoint.load_tokenizer(source, explicit=config.tokenizer is not None)
        requests = sample_requests(config, tokenizer)
        send = request_func(config.backend)
        url = config.base_url + ROUTES[config.backend]

        def spec(req: BenchRequest, output_len: int | None = None) -> RequestSpec:
            return RequestSpec(
                url=url,
                prompt=req.prompt,
                prompt_len=req.prompt_len,
                output_len=output_len or req.output_len,
                model=model,
                stream=config.stream,
                ignore_eos=config.ignore_eos,
                extra_body=config.extra_request_body,
            )

        if config.warmup_requests > 0:
            warm = spec(requests[0], min(requests[0].output_len, 16))
            outs = await asyncio.gather(
                *[send(client, warm) for _ in range(config.warmup_requests)]
            )
            if not any(o.success for o in outs):
                raise BenchmarkError(f"the warm-up request failed: {outs[0].error}")

        gate = asyncio.Semaphore(config.max_concurrency or len(requests))
        bar = _progress(len(requests), config.progress)

        async def one(req: BenchRequest) -> RequestResult:
            async with gate:
                result = await send(client, spec(req))
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = [
            asyncio.create_task(one(req))
            async for req in arrivals(requests, config.request_rate, config.seed)
        ]
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        bar.close()
    _recount(results, tokenizer)
    metrics = compute_metrics(results, duration, config.slo_ttft_ms, config.slo_tpot_ms)
    report = _settings(config, model, source if tokenizer is not None else None) | metrics
    if config.output_details:
        report["details"] = _details(results, requests)
    return report


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Synchronous `arun_benchmark`, for scripts; raises BenchmarkError on a setup failure."""
    return asyncio.run(arun_benchmark(config))


def _recount(results: list[RequestResult], tokenizer: Any | None) -> None:
    """Output tokens for servers that reported none: the tokenizer's count of the text
    (else the number of text chunks, which the request function already put there)."""
    if tokenizer is None:
        return
    for r in results:
        if r.success and not r.output_tokens_reported:
            r.output_tokens = len(tokenizer.encode(r.generated_text, add_special_tokens=False))


def _settings(config: BenchConfig, model: str | None, tokenizer: str | None) -> dict[str, Any]:
    out = asdict(config)
    out.pop("api_key")
    out.pop("progress")
    rate = config.request_rate
    out.update(
        {
            "model": model,
            "tokenizer": tokenizer,
            "request_rate": rate if math.isfinite(rate) else None,
        }
    )
    return out


def _details(results: list[RequestResult], requests: list[BenchRequest]) -> dict[str, Any]:
    return {
        "input_lens": [r.prompt_len for r in results],
        "requested_output_lens": [q.output_len for q in requests],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "errors": [r.error for r in results],
        "generated_texts": [r.generated_text for r in results],
    }


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run from parsed flags: the table on stdout, JSON to --output-file; exit status 1 with
    one line on stderr when the benchmark cannot run, 2 when no request succeeded."""
    config = config_from_args(args, parser)
    try:
        report = run_benchmark(config)
    except BenchmarkError as exc:
        print(f"pdcore bench serving: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdcore bench serving: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.output_file:
        write_json(args.output_file, report)
    return 0 if report["completed"] else 2


__all__ = ["BenchConfig", "add_arguments", "arun_benchmark", "main", "run_benchmark"]
