"""Prefill's transfer queues over a real backend: 1 vs 2 decode peers, QUEUE_SIZE 4 vs 1.

A sender (this process) pushes prompts' KV to N receiver processes through pdcore's
`TransferQueues` -- exactly what `PrefillKVManager` sends through -- on the real mooncake
backend (TCP here). Each prompt is the default model's 2,000-token KV (30 layers x K/V,
60 coalesced runs, 46 MB), `--sends` prompts per peer, all queued at once. It prints JSON:
per case the peers, QUEUE_SIZE, THREAD_POOL_SIZE, seconds and aggregate GB/s, plus ratios.

    .venv/bin/python bench/pd_transfer_parallel.py [--sends 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch

from pdcore.disagg.transfer import (
    BatchState,
    BatchStatus,
    MemoryRegion,
    TransferConfig,
    create_transfer_backend,
)
from pdcore.disagg.transfer_queues import SendJob, TransferQueues

LAYERS, PAGE_BYTES, PAGES = 30, 16 * 3 * 64 * 2, 125  # 2,000 tokens of SmolLM2-135M
RUN_BYTES = PAGES * PAGE_BYTES  # one layer's K (or V) for the prompt: contiguous pages
RUNS = 2 * LAYERS
PROMPT_BYTES = RUNS * RUN_BYTES


def receiver(conn: Any, backend_name: str) -> None:
    mem = torch.zeros(PROMPT_BYTES, dtype=torch.uint8)
    backend = create_transfer_backend(backend_name, TransferConfig(local_id="bench-recv"))
    backend.register_memory([MemoryRegion(mem.data_ptr(), mem.numel())])
    conn.send({"blob": backend.describe(), "addr": mem.data_ptr()})
    while not conn.poll(0.0005):
        backend.fetch_notifications()
    backend.close()


def run_case(
    backend: Any, src: int, peers: list[tuple[str, int]], queues: int, threads: int, sends: int
) -> float:
    lock = threading.RLock()
    tq = TransferQueues(backend, lock, queues, threads, name="bench-send")
    left = len(peers) * sends
    all_done = threading.Event()
    failures: list[str] = []

    def on_done(state: BatchState) -> None:
        nonlocal left
        with lock:
            if state.status is not BatchStatus.DONE:
                failures.append(str(state.reason))
            left -= 1
            if left == 0:
                all_done.set()

    runs = {
        peer: np.array(
            [(src + i * RUN_BYTES, dst + i * RUN_BYTES, RUN_BYTES) for i in range(RUNS)],
            dtype=np.uint64,
        )
        for peer, dst in peers
    }
    t0 = time.perf_counter()
    for room in range(sends):
        for peer, _ in peers:
            tq.put(SendJob(peer, room, runs[peer], b"done", on_done, lambda: False))
    all_done.wait()
    elapsed = time.perf_counter() - t0
    tq.close()
    if failures:
        raise RuntimeError(f"sends failed: {failures[:3]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="mooncake")
    ap.add_argument("--sends", type=int, default=8, help="prompts per peer per case")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="THREAD_POOL_SIZE")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    procs, conns, hellos = [], [], []
    for _ in range(2):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=receiver, args=(child, args.backend), daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)
        hellos.append(parent.recv())
    src_mem = torch.randint(0, 256, (PROMPT_BYTES,), dtype=torch.uint8)
    backend = create_transfer_backend(args.backend, TransferConfig(local_id="bench-send"))
    backend.register_memory([MemoryRegion(src_mem.data_ptr(), src_mem.numel())])
    peers = []
    for i, hello in enumerate(hellos):
        backend.connect(f"decode-{i}", hello["blob"])
        peers.append((f"decode-{i}", hello["addr"]))

    cases = [
        ("1 peer, QUEUE_SIZE 4", peers[:1], 4, args.threads),
        ("2 peers, QUEUE_SIZE 4", peers, 4, args.threads),
        ("2 peers, QUEUE_SIZE 1", peers, 1, args.threads),
        ("2 peers, QUEUE_SIZE 1, THREAD_POOL_SIZE 1", peers, 1, 1),
    ]
    run_case(backend, src_mem.data_ptr(), peers, 4, args.threads, 1)  # warm the connections
    results = []
    for name, case_peers, q, t in cases:
        times = [
            run_case(backend, src_mem.data_ptr(), case_peers, q, t, args.sends)
            for _ in range(args.repeats)
        ]
        secs = statistics.median(times)
        total = len(case_peers) * args.sends * PROMPT_BYTES
        results.append(
            {
                "case": name,
                "peers": len(case_peers),
                "queue_size": q,
                "thread_pool_size": t,
                "bytes": total,
                "seconds": round(secs, 4),
                "aggregate_gbps": round(total / secs / 1e9, 3),
            }
        )
    base = results[0]["aggregate_gbps"]
    for r in results:
        r["vs_1_peer"] = round(r["aggregate_gbps"] / base, 2)
    backend.close()
    for c in conns:
        c.send("exit")
    for p in procs:
        p.join(10)
    print(
        json.dumps(
            {
                "backend": args.backend,
                "prompt_bytes": PROMPT_BYTES,
                "runs_per_prompt": RUNS,
                "sends_per_peer": args.sends,
                "repeats": args.repeats,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
