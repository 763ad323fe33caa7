"""`pdcore bench serving`: metrics by hand, dataset sampling, payloads, flags, and real runs
against `pdcore serve` on the tiny model for each backend."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdcore.bench.clients import (
    RequestSpec,
    _Timing,
    chat_payload,
    openai_payload,
    request_func,
    sglang_payload,
)
from pdcore.bench.config import normalize_base_url
from pdcore.bench.datasets import (
    MAX_PROMPT_LEN,
    load_conversations,
    sample_lengths,
    sample_random,
    sample_sharegpt,
)
from pdcore.bench.endpoint import BenchmarkError, probe_server
from pdcore.bench.metrics import (
    RequestResult,
    chunk_itls,
    compute_metrics,
    meets_slo,
    peak_concurrency,
    request_tpot,
    summarize_ms,
)
from pdcore.bench.report import format_report
from pdcore.bench.serving import BenchConfig, run_benchmark
from tests.conftest import ROOT, free_port
from tests.server_helpers import ServerProcess

# --- metrics ------------------------------------------------------------------------------


def test_chunk_itls_split_the_gap_over_the_chunk_tokens():
    assert chunk_itls(0.3, 3) == pytest.approx([0.1, 0.1, 0.1])
    assert chunk_itls(0.25, 1) == [0.25]
    assert chunk_itls(0.5, 0) == []


def test_timing_counts_itls_per_token_as_sglang_does():
    r = RequestResult(start=10.0)
    t = _Timing(r)
    t.chunk(11.0, 2)  # first chunk with 2 tokens: TTFT only, no ITL
    t.chunk(11.5, 3)  # 1 new token 0.5 s later
    t.chunk(11.7, 3)  # no new token (e.g. a usage-only chunk): ignored
    t.chunk(12.1, 6)  # 3 tokens in one chunk, 0.6 s after the last token-carrying one
    t.chunk(12.2, None)  # no count: the chunk is one token
    assert r.ttft == pytest.approx(1.0)
    assert r.itl == pytest.approx([0.5, 0.2, 0.2, 0.2, 0.1])
    assert t.tokens == 7


def test_tpot_excludes_the_first_token():
    assert request_tpot(RequestResult(latency=2.0, ttft=0.5, output_tokens=4)) == 0.5
    assert request_tpot(RequestResult(latency=2.0, ttft=0.5, output_tokens=1)) is None


def test_summary_matches_numpy_linear_percentiles():
    s = summarize_ms([0.001, 0.002, 0.003, 0.004])
    assert s["mean"] == pytest.approx(2.5)
    assert s["median"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(math.sqrt(1.25))  # population std
    assert s["p90"] == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert s["p99"] == pytest.approx(3.97)
    assert summarize_ms([]) == {k: 0.0 for k in s}  # SGLang reports 0 for an empty series


def test_peak_concurrency_does_not_overlap_back_to_back_requests():
    assert peak_concurrency([(0.0, 1.0), (1.0, 2.0)]) == 1
    assert peak_concurrency([(0.0, 1.0), (0.5, 2.0), (0.6, 0.7)]) == 3
    assert peak_concurrency([]) == 0


def _results() -> list[RequestResult]:
    good = RequestResult(True, "", 10, 5, 0.1, [0.1] * 4, 0.5, 0.0, 0.5)  # TPOT 0.4/4 = 100 ms
    slow = RequestResult(True, "", 20, 3, 0.3, [0.5, 0.5], 1.3, 0.2, 1.5)  # TPOT 1.0/2 = 500 ms
    failed = RequestResult(False, "HTTP 500: boom", 7, start=0.1, end=0.2)
    return [good, slow, failed]


def test_compute_metrics_by_hand():
    m = compute_metrics(_results(), duration_s=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["failure_reasons"] == {"HTTP 500: boom": 1}
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 8)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["input_throughput"] == pytest.approx(15.0)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(19.0)
    assert m["concurrency"] == pytest.approx((0.5 + 1.3) / 2.0)
    assert m["peak_concurrency"] == 2
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(300.0)
    assert m["mean_itl_ms"] == pytest.approx(1400.0 / 6)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["mean_e2e_latency_ms"] == pytest.approx(900.0)
    assert m["p99_e2e_latency_ms"] == pytest.approx(500.0 + 0.99 * 800.0)
    assert m["goodput"] is None and m["slo_attainment"] is None  # no SLO given


def test_goodput_needs_every_slo_and_counts_failures_as_misses():
    m = compute_metrics(_results(), 2.0, slo_ttft_ms=200.0, slo_tpot_ms=200.0)
    assert m["good_requests"] == 1  # the slow one misses both
    assert m["goodput"] == pytest.approx(0.5)
    assert m["slo_attainment"] == pytest.approx(1 / 3)
    m = compute_metrics(_results(), 2.0, slo_ttft_ms=400.0)
    assert (m["good_requests"], m["goodput"]) == (2, pytest.approx(1.0))
    one_token = RequestResult(True, ttft=0.01, latency=0.01, output_tokens=1)
    assert meets_slo(one_token, None, 0.001)  # no TPOT: any TPOT SLO holds


def test_report_table_has_every_section():
    m = compute_metrics(_results(), 2.0, slo_ttft_ms=200.0, slo_tpot_ms=200.0)
    text = format_report({"backend": "sglang", "request_rate": None, **m})
    for needle in ("Mean TTFT (ms):", "P99 ITL (ms):", "Median TPOT", "Goodput (req/s):", "boom"):
        assert needle in text


# --- datasets -----------------------------------------------------------------------------


def test_lengths_in_range_and_deterministic():
    import random

    lens = sample_lengths(random.Random(0), 100, 0.5, 500)
    assert min(lens) >= 50 and max(lens) <= 100 and len(set(lens)) > 20
    assert lens == sample_lengths(random.Random(0), 100, 0.5, 500)
    assert set(sample_lengths(random.Random(0), 8, 1.0, 50)) == {8}
    with pytest.raises(ValueError):
        sample_lengths(random.Random(0), 8, 1.5, 1)


def test_random_dataset_without_tokenizer():
    a = sample_random(50, 40, 10, 0.25, seed=7)
    assert a == sample_random(50, 40, 10, 0.25, seed=7)
    assert a != sample_random(50, 40, 10, 0.25, seed=8)
    assert all(10 <= r.prompt_len <= 40 and 2 <= r.output_len <= 10 for r in a)
    assert all(len(r.prompt.split()) == r.prompt_len for r in a)
    assert len({r.prompt for r in a}) == 50  # no shared prompts: the prefix cache cannot help


def test_random_dataset_lengths_are_exact_tokens(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    reqs = sample_random(40, 64, 16, 1.0, seed=3, tokenizer=tok)
    assert {r.prompt_len for r in reqs} == {64} and {r.output_len for r in reqs} == {16}
    assert all(len(tok.encode(r.prompt, add_special_tokens=False)) == 64 for r in reqs)
    spread = sample_random(40, 64, 16, 0.0, seed=3, tokenizer=tok)
    assert all(1 <= r.prompt_len <= 64 for r in spread)


def test_sharegpt_mini_ships_and_samples_deterministically():
    data = ROOT / "pdcore" / "bench" / "data" / "sharegpt_mini.jsonl"
    assert data.stat().st_size < 200_000
    assert len(load_conversations()) >= 200
    a = sample_sharegpt(300, seed=1)  # more than the file holds: cycles
    assert len(a) == 300 and a == sample_sharegpt(300, seed=1)
    assert a[:10] != sample_sharegpt(10, seed=2)
    assert all(2 <= r.prompt_len <= MAX_PROMPT_LEN and r.output_len >= 2 for r in a)
    assert len({r.output_len for r in a}) > 20  # varied lengths
    assert {r.output_len for r in sample_sharegpt(20, seed=1, fixed_output_len=5)} == {5}


# --- payloads and flags -------------------------------------------------------------------


def test_payloads_ask_for_fixed_lengths():
    spec = RequestSpec("u", "hi", 1, 12, model="m", extra_body={"sampling_params": {"top_k": 2}})
    p = sglang_payload(spec)
    assert p["sampling_params"] == {
        "temperature": 0.0,
        "max_new_tokens": 12,
        "ignore_eos": True,
        "top_k": 2,
    }
    assert p["stream"] is True and p["text"] == "hi"
    spec = RequestSpec("u", "hi", 1, 12, model="m", ignore_eos=False, extra_body={"top_p": 0.5})
    o = openai_payload(spec)
    assert o["max_tokens"] == 12 and o["prompt"] == "hi" and "ignore_eos" not in o
    assert o["stream_options"] == {"include_usage": True} and o["top_p"] == 0.5
    assert chat_payload(spec)["messages"] == [{"role": "user", "content": "hi"}]


def test_base_url_forms():
    assert normalize_base_url(None, "h", 5) == "http://h:5"
    assert normalize_base_url("http://x:1/v1/", "h", 5) == "http://x:1"
    assert normalize_base_url("x:1", "h", 5) == "http://x:1"


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pdcore.cli", "bench", "serving", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--num-prompts", "0"], "--num-prompts"),
        (["--request-rate", "-1"], "--request-rate"),
        (["--random-range-ratio", "2"], "--random-range-ratio"),
        (["--extra-request-body", "{nope"], "--extra-request-body"),
        (["--extra-request-body", "[1]"], "--extra-request-body"),
        (["--backend", "vllm"], "--backend"),
        (["--max-concurrency", "x"], "--max-concurrency"),
    ],
)
def test_bad_flags_name_the_flag(flags, named, capsys):
    from pdcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "serving", *flags])
    assert exc.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err


def test_unreachable_server_is_one_clear_line():
    out = _bench("--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2")
    assert out.returncode == 1
    assert "pdcore bench serving: error: cannot connect to http://127.0.0.1:" in out.stderr
    assert "Traceback" not in out.stderr


# --- against a real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    proc = ServerProcess(tiny_llama_dir, log)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def _check(report: dict, num_prompts: int, backend: str, tokenizer: bool = True) -> None:
    assert report["completed"] == num_prompts, report["failure_reasons"]
    assert report["failed"] == 0 and report["backend"] == backend
    details = report["details"]
    assert details["output_lens"] == details["requested_output_lens"]  # ignore_eos honoured
    assert report["total_output_tokens"] == sum(details["requested_output_lens"])
    assert report["mean_ttft_ms"] > 0 and report["mean_itl_ms"] > 0
    assert report["mean_tpot_ms"] > 0 and report["mean_e2e_latency_ms"] > 0
    # found through /get_model_info; without one, token counts come from usage fields
    assert (report["tokenizer"] is not None) == tokenizer
    for key in ("goodput", "slo_attainment", "good_requests", "slo_ttft_ms", "slo_tpot_ms"):
        assert key in report


# The tokenizer costs each process ~5 s of CPU (transformers), so only one run loads it.
@pytest.mark.parametrize(
    ("backend", "tokenizer"), [("sglang", True), ("openai", False), ("openai-chat", False)]
)
def test_cli_against_pdcore_serve(server, backend, tokenizer, tmp_path):
    out_file = tmp_path / "report.json"
    flags = ["--base-url", server.url, "--backend", backend, "--num-prompts", "6"]
    flags += [] if tokenizer else ["--tokenizer", "none"]
    flags += ["--random-input-len", "24", "--random-output-len", "8", "--random-range-ratio", "0.5"]
    flags += ["--max-concurrency", "2", "--request-rate", "200", "--slo-ttft", "60000"]
    flags += ["--slo-tpot", "60000", "--output-file", str(out_file), "--output-details"]
    out = _bench(*flags)
    assert out.returncode == 0, out.stderr
    assert "Serving Benchmark Result" in out.stdout and "Goodput (req/s):" in out.stdout
    report = json.loads(out_file.read_text())
    _check(report, 6, backend, tokenizer)
    assert report["max_concurrency"] == 2 and report["peak_concurrency"] <= 2
    assert report["request_rate"] == 200.0
    assert report["good_requests"] == 6 and report["slo_attainment"] == 1.0


@pytest.mark.parametrize("backend", ["sglang", "openai", "openai-chat"])
def test_run_benchmark_all_at_once(server, backend):
    config = BenchConfig(
        base_url=server.url,
        backend=backend,
        num_prompts=6,
        random_input_len=16,
        random_output_len=6,
        random_range_ratio=1.0,
        progress=False,
        output_details=True,
    )
    report = run_benchmark(config)
    _check(report, 6, backend)
    assert report["request_rate"] is None and report["goodput"] is None
    assert report["total_input_tokens"] == 6 * 16
    if backend != "openai-chat":  # chat adds the template's tokens
        assert report["total_input_tokens_server"] in (6 * 16, 6 * 17)  # BOS or not


# --- the request functions against a scripted server --------------------------------------


def _mock_client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def test_sglang_stream_parsing_counts_multi_token_chunks():
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["sampling_params"]["max_new_tokens"] == 4
        body = _sse(
            {"text": "a", "meta_info": {"completion_tokens": 1, "prompt_tokens": 3}},
            {"text": "abc", "meta_info": {"completion_tokens": 3, "prompt_tokens": 3}},
            {"text": "abcd", "meta_info": {"completion_tokens": 4, "prompt_tokens": 3}},
        )
        return httpx.Response(200, content=body)

    async def go():
        async with _mock_client(handler) as client:
            spec = RequestSpec("http://x/generate", "p", 3, 4)
            return await request_func("sglang")(client, spec)

    r = asyncio.run(go())
    assert r.success and r.output_tokens == 4 and r.server_prompt_tokens == 3
    assert len(r.itl) == 3 and r.itl[0] == r.itl[1]  # the 2-token chunk split in two
    assert r.generated_text == "abcd" and r.ttft > 0 and r.latency >= r.ttft


def test_openai_stream_without_usage_counts_chunks_and_errors_are_reasons(server) -> None:
    """Against the real server: with usage switched off, tokens are counted per chunk; an
    HTTP error becomes the request's failure reason."""

    async def go(spec: RequestSpec):
        async with httpx.AsyncClient(timeout=60) as client:
            return await request_func("openai")(client, spec)

    url = server.url + "/v1/completions"
    no_usage = {"stream_options": {"include_usage": False}}
    r = asyncio.run(go(RequestSpec(url, "hello there", 2, 3, extra_body=no_usage)))
    assert r.success and r.output_tokens == 3 and not r.output_tokens_reported
    assert len(r.itl) == 2 and r.ttft > 0
    bad = asyncio.run(go(RequestSpec(url, "hello", 1, 3, extra_body={"max_tokens": -1})))
    assert not bad.success and bad.error.startswith("HTTP 400: ") and "max_tokens" in bad.error


def test_probe_reports_a_refused_api_key():
    """The server's real auth middleware (in-process ASGI) refuses the probe."""
    from tests.test_server_app import offline_app

    async def go():
        transport = httpx.ASGITransport(app=offline_app(api_key="secret"))
        async with httpx.AsyncClient(transport=transport) as client:
            return await probe_server(client, "http://server")

    with pytest.raises(BenchmarkError, match="--api-key"):
        asyncio.run(go())
