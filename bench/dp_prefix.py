"""Prefix-cache hit rate of `pdcore serve --dp-size 2` under each --load-balance-method.

The workload: 4 shared prefixes of ~512 tokens, 8 different suffixes each, sent one at a
time in a shuffled order (seed 0), so a method that ignores prefixes scatters each prefix
over both replicas. The hit rate is
the share of prompt tokens the engines served from their prefix caches (each response's
`meta_info.cached_tokens`). Each replica's KV pool is sized (--max-total-tokens) to hold
about two prefixes, as a real pool holds a fraction of the traffic's prefixes: spreading
every prefix over every replica then also evicts.

    python bench/dp_prefix.py [--methods round_robin prefix_aware] [--out result.json]

Prints one JSON object: per method, hit rate, prompt/cached tokens and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deploy import cpu_model, serve  # noqa: E402

PREFIX_WORDS = 400  # ~512 tokens with the default tokenizer
TOPICS = ["astronomy", "cooking", "sailing", "chess"]


def workload(tokenizer) -> list[list[int]]:
    """Prompts (token ids) in the order they are sent."""
    prefixes = []
    for t, topic in enumerate(TOPICS):
        words = " ".join(f"{topic}{(i * 7 + t) % 97}" for i in range(PREFIX_WORDS))
        ids = tokenizer.encode(f"Notes on {topic}: {words}")[:512]
        prefixes.append(ids)
    prompts = [
        p + tokenizer.encode(f" Question {s}: summarise part {s}.")
        for s in range(8)
        for p in prefixes
    ]
    random.Random(0).shuffle(prompts)  # arrival order as traffic has it, fixed by the seed
    return prompts


def run_method(method: str, prompts: list[list[int]], log_dir: Path, kv_tokens: int) -> dict:
    args = [
        "--dp-size",
        "2",
        "--load-balance-method",
        method,
        "--max-total-tokens",
        str(kv_tokens),
        "--dtype",
        "float32",
    ]
    proc = serve(f"serve-{method}", log_dir, args)
    try:
        proc.wait_healthy()
        prompt_tokens = cached = 0
        t0 = time.monotonic()
        with httpx.Client(base_url=proc.url, timeout=600) as client:
            for ids in prompts:
                body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}
                meta = client.post("/generate", json=body).json()["meta_info"]
                prompt_tokens += meta["prompt_tokens"]
                cached += meta["cached_tokens"]
        return {
            "hit_rate": round(cached / prompt_tokens, 4),
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached,
            "wall_s": round(time.monotonic() - t0, 1),
        }
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["round_robin", "prefix_aware"])
    ap.add_argument("--kv-tokens", type=int, default=1280, help="KV pool per replica")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from pdcore.model.tokenizer import load_tokenizer

    prompts = workload(load_tokenizer(None))
    result: dict = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "requests": len(prompts),
        "prefixes": len(TOPICS),
        "prefix_tokens": 512,
        "kv_tokens_per_replica": a.kv_tokens,
        "methods": {},
    }
    with tempfile.TemporaryDirectory(prefix="pdcore-dp-bench-") as tmp:
        for method in a.methods:
            result["methods"][method] = run_method(method, prompts, Path(tmp), a.kv_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
