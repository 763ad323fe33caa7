"""16 concurrent streams: `pdcore serve` (default flags) vs llama.cpp's `llama-server`.

Why: llama.cpp's own server, with 16 parallel slots and continuous batching, is the
strongest CPU server for a GGUF; the bar is that `pdcore serve` with its default flags
reaches at least its aggregate output tok/s on the same file (the default model,
SmolLM2-135M-Instruct Q4_1) and the same cores.

How: `llama-server` is not on PyPI as a binary, so unless `--llama-server PATH` names one,
it is built once from the source the `llama-cpp-python` sdist vendors (pinned below) into
`<pdcore cache>/llama.cpp/<version>/` (`~/.cache/pdcore/...`, or `$PDCORE_CACHE_DIR`):
`pip download` the sdist, untar, cmake + ninja the `llama-server` target (Release,
`GGML_NATIVE=ON`; ~10-20 minutes on 2 cores), and reuse the binary afterwards. Then, one
after the other (never both at once):

- `llama-server -m GGUF -np 16 -t 2 -c 16*1024 --host 127.0.0.1` (continuous batching is
  its default), and
- `pdcore serve --port P` -- default flags, the default model

(PDCORE_*/SGLANG_*/LLAMA_ARG_* settings are removed from both servers' environment). Each
gets a lone sample request (greedy, 64 tokens, stops at EOS: are the tokens sensible?),
then the same closed loop: `--streams` (16) streams each sending its next streaming
`/v1/completions` request when the previous one ends, distinct deterministic prompts of
~100-200 tokens (none repeats within a run, so no prefix-cache hits), `max_tokens` 128,
temperature 0, `ignore_eos` (both servers accept it), so every request generates exactly
128 tokens (counted from `usage.completion_tokens`). Stream j's first request asks for
j/16 of that, so the streams run out of phase as in steady serving, not in lock-step waves
of 16 prefills. The first `--warmup` seconds are not measured; tokens are counted when
they arrive inside the `--seconds` window (per streamed chunk when each chunk carries one
token, else spread evenly between a request's first and last token). Reported per server: aggregate output tok/s, requests completed, TTFT p50/p99,
ITL (gaps between streamed chunks) p50/p99 and TPOT p50; the ratio pdcore / llama-server;
the CPU (model name, ISA flags), the load average around each run, and the versions.

    .venv/bin/python bench/llama_server_vs_pdcore.py --output-file docs/llama_server_vs_pdcore.json
    .venv/bin/python bench/llama_server_vs_pdcore.py --llama-server /path/to/llama-server --seconds 20
    .venv/bin/python bench/llama_server_vs_pdcore.py --build-only     # just build / find the binary

Run it on a quiet machine: on 2 cores, anything else running skews both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import itertools
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deploy import Proc, free_port, serve, tree_cpu_seconds  # noqa: E402

from pdcore.model.loader import cache_root, default_model_path  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
]
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
SAMPLE_PROMPT = "The three most important inventions of the twentieth century are"
REPO = Path(__file__).resolve().parent.parent


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- building llama-server ----------------------------------------------------------------


def _run_logged(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    print(f"+ {shlex.join(cmd)}   (log: {log})", file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        out.write(f"\n+ {shlex.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}); end of {log}:\n{tail}")


def fetch_llama_cpp_source(root: Path, version: str) -> Path:
    """The llama.cpp tree vendored by the llama-cpp-python `version` sdist, under `root`."""
    src = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist_dir = root / "sdist"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    _run_logged([*pip, "-d", str(sdist_dir), f"llama-cpp-python=={version}"], root / "build.log")
    tarball = next(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")
    if not (src / "CMakeLists.txt").exists():
        raise RuntimeError(f"{tarball} has no vendor/llama.cpp")
    return src


def configure_llama_cpp(src: Path, log: Path) -> Path:
    build = src / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run_logged(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], log)
    return build


def build_llama_server(
    version: str = LLAMA_CPP_PYTHON_VERSION, root: Path | None = None, jobs: int | None = None
) -> Path:
    """Path of a `llama-server` built from the pinned sdist; built on first use only."""
    root = root or cache_root() / "llama.cpp" / version
    binary = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "build" / "bin"
    binary = binary / "llama-server"
    if binary.exists():
        return binary
    if not shutil.which("cmake"):
        raise RuntimeError("building llama-server needs cmake (apt-get install cmake ninja-build)")
    log = root / "build.log"
    src = fetch_llama_cpp_source(root, version)
    build = configure_llama_cpp(src, log)
    jobs = jobs or cpu_count()
    print(f"building llama-server with {jobs} jobs (~10-20 minutes)", file=sys.stderr, flush=True)
    _run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], log)
    if not binary.exists():
        raise RuntimeError(f"the build finished but {binary} is missing; see {log}")
    return binary


def llama_server_version(binary: Path) -> str:
    done = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    return (done.stdout + done.stderr).strip()


# --- the machine --------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    model, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "model_name": model,
        "cpus_usable": cpu_count(),
        "isa_flags": {f: f in flags for f in ISA_FLAGS},
        "amx": any(f.startswith("amx") for f in flags),
    }


def git_rev() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=12"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


class CpuMeter:
    """Who used the CPUs while a server was measured: the server's process tree, this
    client, and everything else (other work on the machine: the run is not quiet when
    that is more than a few percent of the CPUs), plus hypervisor steal."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.t = time.perf_counter()
        self.machine, self.steal = _machine_cpu()
        self.server = tree_cpu_seconds(server_pid)
        self.client = sum(os.times()[:2])

    def result(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t
        machine, steal = _machine_cpu()
        server = tree_cpu_seconds(self.pid) - self.server
        client = sum(os.times()[:2]) - self.client
        others = max(0.0, machine - self.machine - server - client)
        cpus = cpu_count()
        return {
            "wall_s": round(wall, 1),
            "server_cpu_s": round(server, 1),
            "client_cpu_s": round(client, 1),
            "others_cpu_s": round(others, 1),
            "steal_cpu_s": round(steal - self.steal, 1),
            "others_share_of_cpus": round(others / (wall * cpus), 3),
        }


# --- the workload -------------------------------------------------------------------------

_SUBJECTS = [
    "The old lighthouse keeper",
    "A young engineer from the coast",
    "The village baker",
    "A retired astronomer",
    "The new librarian",
    "A tired delivery driver",
    "The mayor of a small mountain town",
    "A curious student of chemistry",
    "The captain of a fishing boat",
    "A painter who had lost her sight",
    "The night nurse at the hospital",
    "A farmer who grew only apples",
]
_EVENTS = [
    "found a sealed letter hidden behind a loose brick in the wall",
    "noticed that every clock in the house had stopped at the same minute",
    "heard a strange melody drifting up from the harbour at midnight",
    "received a package with no name and a key made of brass",
    "discovered that the river had changed its course overnight",
    "met a traveller who claimed to know the way to a forgotten city",
    "watched a storm roll in that seemed to speak in low voices",
    "read an old map that showed a road nobody remembered building",
    "saw lights moving in the forest where no one was supposed to live",
    "learned that the bridge would be closed for the whole winter",
]
_DETAILS = [
    "The weather had been cold and grey for most of the week.",
    "Neighbours gathered in the square to talk about what it could mean.",
    "Nobody in the town could remember anything like it happening before.",
    "The shops closed early and the streets became strangely quiet.",
    "A dog barked somewhere in the distance and then fell silent.",
    "The smell of fresh bread and wood smoke hung in the narrow lanes.",
    "Children pressed their faces to the windows to see what was going on.",
    "An old radio in the corner crackled with news from far away.",
    "The church bell rang twice, although it was not yet noon.",
    "Someone had left a lantern burning on the steps of the town hall.",
    "Rain began to fall softly on the slate roofs and the empty market.",
    "The train from the city arrived late, carrying only three passengers.",
    "A notice pinned to the door asked everyone to stay calm and wait.",
    "The teacher cancelled the afternoon lessons without giving a reason.",
    "Fishermen pulled their boats high onto the shingle beach.",
    "The baker gave away the last loaves of the day to anyone who asked.",
]
_TASKS = [
    "Continue the story in the same style, describing what happened next:",
    "Write the next part of the story, focusing on how the town reacted:",
    "Continue the story and explain what the main character decided to do:",
    "Carry on with the story, adding a conversation between two neighbours:",
]


def make_prompts(n: int, seed: int = 0, short: bool = False) -> list[str]:
    """`n` distinct deterministic prompts of ~100-200 tokens (a short story to continue),
    or with `short` of ~20-30 tokens (the same without the story's details: a workload that
    is nearly all decode)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    for i in range(n):
        details = [] if short else rng.sample(_DETAILS, rng.randint(6, 9))
        text = (
            f"Story {i + 1}. {rng.choice(_SUBJECTS)} {rng.choice(_EVENTS)}. "
            + " ".join(details)
            + f" {rng.choice(_SUBJECTS)} {rng.choice(_EVENTS)}.\n\n{rng.choice(_TASKS)}\n"
        )
        prompts.append(text)
    return prompts


@dataclass
class Sample:
    """One streamed request as the client saw it (times from time.perf_counter)."""

    prompt_index: int
    start: float
    max_tokens: int
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried text
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    def token_times(self) -> list[float]:
        """Arrival time of each generated token: the chunk times when each chunk carried
        one token, else spread evenly between the first and the last chunk."""
        n, times = self.completion_tokens, self.chunk_times
        if not times or n <= 0:
            return []
        if len(times) == n:
            return times
        if n == 1 or len(times) == 1:
            return [times[-1]] * n
        step = (times[-1] - times[0]) / (n - 1)
        return [times[0] + k * step for k in range(n)]


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    prompt_index: int,
    max_tokens: int,
) -> Sample:
    sample = Sample(prompt_index, time.perf_counter(), max_tokens)
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return sample
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    sample.error = json.dumps(chunk["error"])[:300]
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") or ""
                    if text:
                        sample.text += text
                        sample.chunk_times.append(now)
                    if choice.get("finish_reason"):
                        sample.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    sample.completion_tokens = int(usage.get("completion_tokens") or 0)
                    sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    sample.cached_tokens = int(details.get("cached_tokens") or 0)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        sample.end = time.perf_counter()
    if sample.error is None and sample.completion_tokens == 0:
        sample.error = "no usage.completion_tokens in the stream"
    return sample


def request_body(model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _pct(values: Sequence[float], q: int) -> float | None:
    """q-th percentile in ms (None without data)."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 2)


async def closed_loop(
    url: str,
    model: str,
    prompts: list[str],
    streams: int,
    warmup: float,
    seconds: float,
    max_tokens: int,
) -> dict[str, Any]:
    """`streams` streams, each sending its next request when the previous one ends, until
    the window closes; requests in flight then finish (their tokens inside the window
    count). Stream j's first request asks for j/streams of `max_tokens` (stream 0's for
    all of it), so the streams' phases spread evenly over a request's life instead of all
    prefilling and finishing in lock-step waves."""
    counter = itertools.count()
    samples: list[Sample] = []
    t0 = time.perf_counter()
    w0, w1 = t0 + warmup, t0 + warmup + seconds
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    # A new connection per request, for both servers: llama-server closes some kept-alive
    # connections between streamed responses, and a reused dead one fails the next request.
    connector = aiohttp.TCPConnector(limit=streams, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def stream(j: int) -> None:
            limit = max(1, max_tokens * j // streams) if j else max_tokens
            while time.perf_counter() < w1:
                i = next(counter)
                body = request_body(model, prompts[i % len(prompts)], limit, True)
                samples.append(await stream_completion(session, url, body, i, limit))
                limit = max_tokens

        await asyncio.gather(*(stream(j) for j in range(streams)))
    drained = time.perf_counter()
    ok = [s for s in samples if s.error is None]
    tokens = sum(1 for s in ok for t in s.token_times() if w0 <= t < w1)
    gaps = [
        b - a
        for s in ok
        for a, b in itertools.pairwise(s.chunk_times)
        if w0 <= b < w1  # gaps ending in the window
    ]
    full = [s for s in ok if s.max_tokens == max_tokens]  # not the staggering firsts
    started = [s for s in full if w0 <= s.start < w1]
    ttft = [s.chunk_times[0] - s.start for s in started if s.chunk_times]
    tpot = [
        (s.chunk_times[-1] - s.chunk_times[0]) / (s.completion_tokens - 1)
        for s in started
        if s.completion_tokens > 1 and len(s.chunk_times) > 1
    ]
    finished = [s for s in ok if w0 <= s.end < w1]
    chunked_per_token = all(len(s.chunk_times) == s.completion_tokens for s in ok)
    errors = [s.error for s in samples if s.error is not None]
    return {
        "output_tok_per_s": round(tokens / seconds, 2),
        "output_tokens_in_window": tokens,
        "requests_completed_in_window": len(finished),
        "requests_sent": len(samples),
        "errors": len(errors),
        "first_errors": errors[:3],
        "completion_tokens_per_full_request": sorted({s.completion_tokens for s in full}),
        "finish_reasons": sorted({str(s.finish_reason) for s in full}),
        "prompt_tokens_mean": round(statistics.mean(s.prompt_tokens for s in ok), 1)
        if ok
        else None,
        "prompt_tokens_min_max": [
            min(s.prompt_tokens for s in ok),
            max(s.prompt_tokens for s in ok),
        ]
        if ok
        else None,
        "cached_prompt_tokens_total": sum(s.cached_tokens for s in ok),
        "prompts_reused": len(samples) > len(prompts),
        "ttft_ms_p50": _pct(ttft, 50),
        "ttft_ms_p99": _pct(ttft, 99),
        "itl_ms_p50": _pct(gaps, 50),
        "itl_ms_p99": _pct(gaps, 99),
        "tpot_ms_p50": _pct(tpot, 50),
        "one_chunk_per_token": chunked_per_token,
        "drain_s_after_window": round(drained - w1, 2),
        "first_request": {
            "prompt_index": 0,
            "text": next((s.text for s in ok if s.prompt_index == 0), None),
        },
    }


async def lone_sample(url: str, model: str, max_tokens: int) -> dict[str, Any]:
    """One request alone (greedy, stops at EOS): the sample completion and a cold TTFT."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        body = request_body(model, SAMPLE_PROMPT, max_tokens, False)
        s = await stream_completion(session, url, body, -1, max_tokens)
    return {
        "prompt": SAMPLE_PROMPT,
        "text": s.text,
        "completion_tokens": s.completion_tokens,
        "finish_reason": s.finish_reason,
        "ttft_ms": round((s.chunk_times[0] - s.start) * 1000, 1) if s.chunk_times else None,
        "error": s.error,
    }


def model_id(url: str) -> str:
    data = httpx.get(url + "/v1/models", timeout=10).json().get("data") or [{}]
    return str(data[0].get("id") or "default")


def measure(
    proc: Proc, prompts: list[str], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    model = model_id(proc.url)
    sample = asyncio.run(lone_sample(proc.url, model, 64))
    before = loadavg()
    meter = CpuMeter(proc.proc.pid)
    run = asyncio.run(
        closed_loop(
            proc.url, model, prompts, args.streams, args.warmup, args.seconds, args.max_tokens
        )
    )
    return {
        "model_id": model,
        "load_average_before": before,
        **run,
        "load_average_after": loadavg(),
        "cpu_during_run": meter.result(),
    }, sample


# --- the two servers ----------------------------------------------------------------------


def start_llama_server(binary: Path, gguf: Path, log_dir: Path, args: argparse.Namespace) -> Proc:
    port = free_port()
    argv = [
        str(binary),
        "-m",
        str(gguf),
        "-np",
        str(args.streams),
        "-t",
        str(args.threads),
        "-c",
        str(args.streams * args.ctx_per_slot),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *shlex.split(args.llama_server_args),
    ]
    proc = Proc.__new__(Proc)  # Proc runs `pdcore ...`; same life cycle, another binary
    proc.name, proc.url = "llama-server", f"http://127.0.0.1:{port}"
    proc.log_path = log_dir / "llama-server.log"
    proc._log = open(proc.log_path, "wb")  # noqa: SIM115 - closed in stop()
    proc._log.write(f"+ {shlex.join(argv)}\n".encode())
    proc._log.flush()
    proc.proc = subprocess.Popen(argv, stdout=proc._log, stderr=subprocess.STDOUT)
    proc.argv = argv  # type: ignore[attr-defined]
    return proc


def pdcore_info(url: str) -> dict[str, Any]:
    """The settings pdcore chose by default that matter for speed."""
    try:
        info = httpx.get(url + "/server_info", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}
    keep = (
        "dtype",
        "quantization",
        "max_running_requests",
        "max_total_tokens",
        "chunked_prefill_size",
        "context_length",
        "page_size",
        "schedule_policy",
        "disable_radix_cache",
        "cuda_graph",
        "torch_threads",
        "kernel",
        "version",
        "model_path",
    )
    return {k: v for k, v in info.items() if any(word in k for word in keep)}


def clean_env() -> list[str]:
    """Drop PDCORE_*/SGLANG_*/LLAMA_ARG_* settings so both servers run with their defaults
    and the flags given here (the cache location stays: it only says where the converted
    model lives)."""
    prefixes = ("PDCORE_", "SGLANG_", "LLAMA_ARG_")
    dropped = [k for k in os.environ if k.startswith(prefixes) and k != "PDCORE_CACHE_DIR"]
    for k in dropped:
        del os.environ[k]
    return dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", type=Path, help="an existing llama-server binary")
    ap.add_argument("--build-only", action="store_true", help="build/find llama-server, exit")
    ap.add_argument("--model-path", type=Path, help="GGUF (default: the default model's)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams = -np slots")
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t")
    ap.add_argument("--ctx-per-slot", type=int, default=1024)
    ap.add_argument(
        "--llama-server-args",
        default="",
        help="extra llama-server flags, one string (e.g. '--poll 0'); default none",
    )
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds first")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2000, help="distinct prompts")
    ap.add_argument(
        "--short-prompts",
        action="store_true",
        help="~20-30-token prompts instead of ~100-200 (a decode-dominated workload)",
    )
    ap.add_argument("--servers", nargs="+", default=["llama-server", "pdcore"])
    ap.add_argument("--output-file", type=Path)
    args = ap.parse_args()

    binary = args.llama_server or build_llama_server()
    if args.build_only:
        print(binary)
        return
    gguf = args.model_path or default_model_path()
    dropped_env = clean_env()
    prompts = make_prompts(args.prompts, short=args.short_prompts)
    log_dir = Path(tempfile.mkdtemp(prefix="llama-server-vs-pdcore-"))
    result: dict[str, Any] = {
        "workload": {
            "endpoint": "/v1/completions, stream, stream_options.include_usage",
            "streams": args.streams,
            "closed_loop": True,
            "stagger": "stream j's first request asks for j/streams of max_tokens",
            "warmup_s": args.warmup,
            "window_s": args.seconds,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "distinct_prompts": args.prompts,
            "short_prompts": args.short_prompts,
            "gguf": str(gguf),
        },
        "cpu": cpu_info(),
        "versions": {
            "llama_server_binary": str(binary),
            "llama_server": llama_server_version(binary),
            "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION,
            "pdcore_git": git_rev(),
            "torch": importlib.metadata.version("torch"),
        },
        "env_dropped": dropped_env,
        "load_average_start": loadavg(),
        "logs": str(log_dir),
    }
    samples: dict[str, Any] = {}
    for name in args.servers:
        if name == "llama-server":
            proc = start_llama_server(binary, gguf, log_dir, args)
        elif name == "pdcore":
            # Default flags; the default model needs no --model-path.
            extra = ["--model-path", str(gguf)] if args.model_path else []
            proc = serve("pdcore", log_dir, extra)
        else:
            raise SystemExit(f"unknown server {name!r}")
        try:
            t = time.perf_counter()
            proc.wait_healthy(900)
            ready = round(time.perf_counter() - t, 1)
            print(f"{name} healthy after {ready}s; measuring", file=sys.stderr, flush=True)
            run, samples[name] = measure(proc, prompts, args)
            run["healthy_after_s"] = ready
            if name == "llama-server":
                run["argv"] = shlex.join(proc.argv)  # type: ignore[attr-defined]
            else:
                run["argv"] = shlex.join(["pdcore", "serve", "--port", "P", *extra])
                run["server_info"] = pdcore_info(proc.url)
            result[name] = run
            print(f"{name}: {run['output_tok_per_s']} tok/s", file=sys.stderr, flush=True)
        finally:
            proc.stop()
        time.sleep(3)  # let the cores settle before the next server
    result["load_average_end"] = loadavg()
    result["samples"] = samples
    if {"pdcore", "llama-server"} <= result.keys():
        p, q = result["pdcore"]["output_tok_per_s"], result["llama-server"]["output_tok_per_s"]
        result["summary"] = {
            "pdcore_tok_per_s": p,
            "llama_server_tok_per_s": q,
            "ratio_pdcore_over_llama_server": round(p / q, 3) if q else None,
            "target_met": bool(q) and p >= q,
            # Others' CPU use during each run: above ~0.05 the ratio says little.
            "others_share_of_cpus": {
                name: result[name]["cpu_during_run"]["others_share_of_cpus"]
                for name in ("llama-server", "pdcore")
            },
        }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.output_file:
        args.output_file.write_text(text + "\n")


if __name__ == "__main__":
    main()
