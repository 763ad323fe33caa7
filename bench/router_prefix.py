"""Which routing policy makes the prefill servers' prefix caches hit: round_robin,
cache_aware, kv_aware.

Deployment: 2 prefill + 1 decode real `pdcore serve` (default model, KV moved by the `fake`
transfer backend: the prefill side computes the prompt for real, which is what is
measured) behind `pdcore router --policy P`, a fresh router per policy and flushed caches.

Workload ("cold"): 4 shared prefixes of ~1,024 tokens (distinct random English words) x 8
short suffixes, 32 `/generate` requests in the order s0p0 s0p1 s0p2 s0p3 s1p0 ..., 4 at a
time, 1 output token each. The hit rate is the prefill servers' own count: the change of
`pdcore_cached_tokens_total` / `pdcore_prompt_tokens_total` over the run (their /metrics).
Best possible: each prefix computed once, on one server (28 of 32 prompts hit); round
robin computes each prefix on both servers (24 of 32).

Scenario "restart" (where kv_aware goes beyond a text tree): the caches were warmed
through an earlier router (each prefix once, round robin, in reverse order) and the router
was restarted: cache_aware's tree starts empty, kv_aware reads what the servers hold.

    .venv/bin/python bench/router_prefix.py > docs/router_prefix.json   # ~5 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deploy import Proc, free_port, serve  # noqa: E402

from pdcore.model.loader import resolve_model  # noqa: E402
from pdcore.router.policy_tokens import PromptTokenizer  # noqa: E402

POLICIES = ("round_robin", "cache_aware", "kv_aware")
_WORD_TEXT = (
    "river stone maple orbit lantern cobalt harbor violet summit ember quartz meadow "
    "falcon copper glacier saffron thunder willow canyon marble cedar beacon prism tundra "
    "velvet ash compass delta echo garnet horizon ivory jasmine kelp lagoon mosaic nectar "
    "onyx pepper quill raven sierra tidal umber vertex walnut yarrow zephyr acorn bramble"
)
WORDS = _WORD_TEXT.split()


def make_prefix(tok: PromptTokenizer, seed: int, tokens: int) -> str:
    """Random words until the text is `tokens` long (ends on a word: stable boundary)."""
    rng = random.Random(seed)
    words = [f"Document {seed}:"]
    while len(tok.encode(" ".join(words))) < tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def workload(tok: PromptTokenizer, prefixes: int, suffixes: int, tokens: int) -> list[str]:
    heads = [make_prefix(tok, p, tokens) for p in range(prefixes)]
    return [
        f"{heads[p]} Question {s}: what is item {s * 7 + p}?"
        for s in range(suffixes)
        for p in range(prefixes)
    ]


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for name in ("pdcore_cached_tokens_total", "pdcore_prompt_tokens_total"):
        m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


async def send_all(url: str, prompts: list[str], concurrency: int) -> list[str]:
    """POST each prompt (in order, `concurrency` at a time); the errors, if any."""
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(text: str) -> None:
            async with sem:
                body = {"text": text, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
                r = await client.post(url + "/generate", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")

        tasks = []
        for text in prompts:
            tasks.append(asyncio.create_task(one(text)))
            await asyncio.sleep(0.01)  # keep the arrival order
        await asyncio.gather(*tasks)
    return errors


def start_router(
    log: Path, policy: str, prefills: list[tuple[Proc, int]], decode: Proc, poll: float
) -> Proc:
    port = free_port()
    args = [
        "router",
        "--pd-disaggregation",
        "--port",
        str(port),
        "--policy",
        policy,
        "--kv-poll-interval-secs",
        str(poll),
        # A prefill busy with a 1,024-token prompt on a shared CPU answers /health late;
        # this bench measures routing, not health checking.
        "--disable-health-check",
    ]
    for proc, boot in prefills:
        args += ["--prefill", proc.url, str(boot)]
    args += ["--decode", decode.url]
    r = Proc(f"router-{policy}-{time.monotonic_ns()}", args, log, f"http://127.0.0.1:{port}")
    r.wait_healthy(120)
    return r


def flush(servers: list[Proc]) -> None:
    for s in servers:
        for _ in range(100):
            if httpx.post(s.url + "/flush_cache", timeout=30).status_code == 200:
                break
            time.sleep(0.2)


def run_policy(
    policy: str,
    scenario: str,
    prompts: list[str],
    heads: list[str],
    prefills: list[tuple[Proc, int]],
    decode: Proc,
    log: Path,
    args: Any,
) -> dict:
    servers = [p for p, _ in prefills]
    flush([*servers, decode])
    if scenario == "restart":  # warm through another router, then start a fresh one
        warm = start_router(log, "round_robin", prefills, decode, args.poll)
        try:
            asyncio.run(send_all(warm.url, list(reversed(heads)), 1))
        finally:
            warm.stop()
    router = start_router(log, policy, prefills, decode, args.poll)
    try:
        time.sleep(2 * args.poll + 0.5)  # kv_aware: its first poll
        if policy == "kv_aware":  # until its tokenizer is loaded it routes like cache_aware
            deadline = time.monotonic() + 120
            while "(prefill): tokenizer from" not in router.log_path.read_text():
                if time.monotonic() > deadline:
                    raise TimeoutError("kv_aware did not find the model's tokenizer")
                time.sleep(0.2)
        before = [counters(s.url) for s in servers]
        t0 = time.monotonic()
        errors = asyncio.run(send_all(router.url, prompts, args.concurrency))
        elapsed = time.monotonic() - t0
        after = [counters(s.url) for s in servers]
    finally:
        router.stop()
    per_server = []
    for b, a in zip(before, after, strict=True):
        cached = a["pdcore_cached_tokens_total"] - b["pdcore_cached_tokens_total"]
        prompt = a["pdcore_prompt_tokens_total"] - b["pdcore_prompt_tokens_total"]
        per_server.append({"prompt_tokens": int(prompt), "cached_tokens": int(cached)})
    cached = sum(s["cached_tokens"] for s in per_server)
    prompt = sum(s["prompt_tokens"] for s in per_server)
    return {
        "policy": policy,
        "prefix_hit_rate": round(cached / prompt, 4) if prompt else None,
        "cached_tokens": cached,
        "prompt_tokens": prompt,
        "per_prefill": per_server,
        "seconds": round(elapsed, 2),
        "errors": errors[:5],
        "num_errors": len(errors),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--suffixes", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--poll", type=float, default=0.5, help="--kv-poll-interval-secs")
    ap.add_argument("--scenarios", nargs="+", default=["cold", "restart"])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--serve-args", default="--max-total-tokens 16384 --page-size 16")
    args = ap.parse_args()

    tok = PromptTokenizer.load(resolve_model(None).folder)
    prompts = workload(tok, args.prefixes, args.suffixes, args.prefix_tokens)
    heads = [make_prefix(tok, p, args.prefix_tokens) for p in range(args.prefixes)]
    log = Path(tempfile.mkdtemp(prefix="router-prefix-"))
    common = ["--backend", "fake", *args.serve_args.split()]
    boots = [free_port(), free_port()]
    procs: list[Proc] = []
    try:
        prefills = []
        for i, boot in enumerate(boots):
            p = serve(
                f"prefill{i}",
                log,
                [
                    *common,
                    "--disaggregation-mode",
                    "prefill",
                    "--disaggregation-bootstrap-port",
                    str(boot),
                ],
            )
            procs.append(p)
            prefills.append((p, boot))
        decode = serve("decode", log, [*common, "--disaggregation-mode", "decode"])
        procs.append(decode)
        for p in procs:
            p.wait_healthy()
        results: dict[str, Any] = {}
        for scenario in args.scenarios:
            results[scenario] = [
                run_policy(pol, scenario, prompts, heads, prefills, decode, log, args)
                for pol in args.policies
            ]
            print(json.dumps({scenario: results[scenario]}), file=sys.stderr)
    finally:
        for p in procs:
            p.stop()
    rates = {s: {r["policy"]: r["prefix_hit_rate"] for r in rs} for s, rs in results.items()}
    out = {
        "workload": {
            "prefixes": args.prefixes,
            "suffixes": args.suffixes,
            "prefix_tokens": [len(tok.encode(h)) for h in heads],
            "prompt_tokens": [len(tok.encode(p)) for p in prompts[: args.prefixes]],
            "concurrency": args.concurrency,
            "prefill_servers": 2,
            "decode_servers": 1,
            "transfer_backend": "fake",
            "model": "default (SmolLM2-135M-Instruct)",
            "best_possible_hits": f"{(args.suffixes - 1) * args.prefixes} of "
            f"{args.suffixes * args.prefixes} prompts",
        },
        "hit_rate": rates,
        "results": results,
        "logs": str(log),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
