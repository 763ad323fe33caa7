"""What PD disaggregation buys: decode inter-token latency while long prompts arrive.

One workload, run against two deployments in one run:

- (a) unified: one `pdcore serve` using both cores (2 torch threads);
- (b) PD: one prefill and one decode `pdcore serve`, each pinned to one core (1 thread),
  behind `pdcore router`, KV moved by a real transfer backend (nixl by default).

Workload: `--streams` decode streams run the whole time (each a short prompt generating
`--stream-output-len` tokens; a finished stream is replaced at once), and every
`--burst-every` seconds a burst of `--burst-size` long prompts (`--burst-input-len` random
tokens, no prefix-cache hits) arrives. Every streamed token's arrival time is recorded.
An inter-token gap counts as "during a burst" when it overlaps the time from a burst's
arrival to the moment its last prompt got its first token (its prefill is done), else as
"quiet". Reports p50/p90/p99 ITL quiet vs burst for each deployment, their ratio, TTFT,
and goodput for a TTFT/TPOT SLO pair, as JSON; and a PNG of ITL over time for both.

    .venv/bin/python bench/pd_vs_unified.py                 # ~3 minutes; plot into docs/
    .venv/bin/python bench/pd_vs_unified.py --duration 20 --plot /tmp/itl.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deploy import Proc, free_port, router, serve  # noqa: E402
from _itl_report import plot_timelines, summarize  # noqa: E402


@dataclass
class Trace:
    """One request as the client saw it."""

    kind: str  # "stream" or "burst"
    burst: int | None
    sent: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None


async def stream_generate(
    client: httpx.AsyncClient, url: str, input_ids: list[int], max_new: int, trace: Trace
) -> Trace:
    """SGLang-native streaming /generate; one arrival time per new token."""
    body = {
        "input_ids": input_ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True},
    }
    seen = 0
    try:
        async with client.stream("POST", url + "/generate", json=body) as resp:
            if resp.status_code != 200:
                trace.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return trace
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                n = json.loads(line[6:])["meta_info"]["completion_tokens"]
                now = time.monotonic()
                trace.token_times.extend([now] * (n - seen))
                seen = n
    except httpx.HTTPError as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
    return trace


@dataclass
class Workload:
    streams: int
    stream_input_len: int
    stream_output_len: int
    burst_every: float
    first_burst_at: float
    burst_size: int
    burst_input_len: int
    burst_output_len: int
    duration: float
    vocab: int = 49152
    seed: int = 0


async def run_workload(url: str, w: Workload) -> tuple[float, list[Trace]]:
    """Streams for `duration` seconds plus bursts on a fixed schedule; returns (t0, traces)."""
    rng = random.Random(w.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, w.vocab) for _ in range(n)]

    traces: list[Trace] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.monotonic()
        end = t0 + w.duration

        async def stream_loop(i: int) -> None:
            # staggered, so the streams' short prefills don't all land in one pass
            await asyncio.sleep(i * 0.75)
            while time.monotonic() < end:
                t = Trace("stream", None, time.monotonic())
                traces.append(t)
                await stream_generate(
                    client, url, prompt(w.stream_input_len), w.stream_output_len, t
                )
                if t.error:
                    return

        async def bursts() -> None:
            k, tasks = 0, []
            while True:
                at = t0 + w.first_burst_at + k * w.burst_every
                if at + 1.0 > end:
                    break
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                for _ in range(w.burst_size):
                    t = Trace("burst", k, time.monotonic())
                    traces.append(t)
                    tasks.append(
                        asyncio.create_task(
                            stream_generate(
                                client, url, prompt(w.burst_input_len), w.burst_output_len, t
                            )
                        )
                    )
                k += 1
            await asyncio.gather(*tasks)

        await asyncio.gather(bursts(), *(stream_loop(i) for i in range(w.streams)))
    return t0, traces


def warm_up(url: str, w: Workload) -> None:
    """First passes pay one-off costs (kernel selection, weight packing, page touching)."""
    with httpx.Client(timeout=600) as client:
        for n in (w.stream_input_len, w.burst_input_len):
            body = {
                "input_ids": [101 + i % 1000 for i in range(n)],
                "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
            }
            r = client.post(url + "/generate", json=body)
            r.raise_for_status()
        client.post(url + "/flush_cache")


def deploy_unified(
    log_dir: Path, common: list[str], name: str = "unified"
) -> tuple[str, list[Proc]]:
    server = serve(name, log_dir, [*common, "--cpu-threads", "2"])
    server.wait_healthy()
    return server.url, [server]


def deploy_pd(log_dir: Path, common: list[str], backend: str) -> tuple[str, list[Proc]]:
    boot = free_port()
    pd_common = [*common, "--cpu-threads", "1", "--backend", backend]
    prefill = serve(
        "prefill",
        log_dir,
        [
            *pd_common,
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(boot),
        ],
        cores={0},
    )
    decode = serve("decode", log_dir, [*pd_common, "--disaggregation-mode", "decode"], cores={1})
    procs = [prefill, decode]
    try:
        prefill.wait_healthy()
        decode.wait_healthy()
        rt = router(log_dir, prefill, boot, decode)
        procs.append(rt)
        rt.wait_healthy()
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return rt.url, procs


def measure(name: str, deploy, w: Workload) -> dict[str, Any]:
    url, procs = deploy()
    try:
        warm_up(url, w)
        print(f"[{name}] running the workload for {w.duration:.0f} s", file=sys.stderr)
        t0, traces = asyncio.run(run_workload(url, w))
    finally:
        for p in reversed(procs):
            p.stop()
    return {"t0": t0, "traces": traces}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="nixl", help="PD transfer backend (default nixl)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-input-len", type=int, default=64)
    ap.add_argument("--stream-output-len", type=int, default=128)
    ap.add_argument("--burst-every", type=float, default=10.0)
    ap.add_argument("--first-burst-at", type=float, default=8.0)
    ap.add_argument("--burst-size", type=int, default=2)
    ap.add_argument("--burst-input-len", type=int, default=1024)
    ap.add_argument("--burst-output-len", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per deployment")
    ap.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument(
        "--unified-chunked",
        type=int,
        default=0,
        metavar="N",
        help="also run unified with --chunked-prefill-size N (the usual mitigation short of PD)",
    )
    ap.add_argument("--only", choices=["unified", "pd", "unified_chunked"], default=None)
    ap.add_argument("--plot", default="docs/pd_vs_unified_itl.png", help="PNG path ('' = none)")
    ap.add_argument("--output-file", default=None, help="also write the JSON here")
    args = ap.parse_args()

    w = Workload(
        args.streams,
        args.stream_input_len,
        args.stream_output_len,
        args.burst_every,
        args.first_burst_at,
        args.burst_size,
        args.burst_input_len,
        args.burst_output_len,
        args.duration,
    )
    common = ["--dtype", args.dtype, "--log-level", "warning"]
    if args.model_path:
        common += ["--model-path", args.model_path]
    log_dir = Path(tempfile.mkdtemp(prefix="pd-vs-unified-"))
    deployments = {
        "unified": lambda: deploy_unified(log_dir, common),
        "pd": lambda: deploy_pd(log_dir, common, args.backend),
    }
    if args.unified_chunked:
        chunked = [*common, "--chunked-prefill-size", str(args.unified_chunked)]
        deployments["unified_chunked"] = lambda: deploy_unified(log_dir, chunked, "chunked")
    slo = (args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    raw, result = {}, {"workload": vars(w), "backend": args.backend, "logs": str(log_dir)}
    for name, deploy in deployments.items():
        if args.only and name != args.only:
            continue
        raw[name] = measure(name, deploy, w)
        result[name] = summarize(raw[name]["t0"], raw[name]["traces"], slo)
    if "unified" in result and "pd" in result:
        result["itl_p99_burst_over_quiet"] = {
            n: result[n]["itl_ms"].get("p99_burst_over_quiet") for n in raw
        }
        result["goodput_fraction"] = {n: result[n]["goodput"]["fraction"] for n in raw}
    if args.plot:
        plot_timelines(raw, Path(args.plot), w)
        result["plot"] = args.plot
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_file:
        Path(args.output_file).write_text(text)


if __name__ == "__main__":
    main()
