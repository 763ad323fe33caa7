"""Prefill's transfer queues over a real backend: 1 vs 2 decode peers, QUEUE_SIZE 4 vs 1.

A sender (this process) pushes prompts' KV to N receiver processes through pdcore's
`TransferQueues` -- exactly what `PrefillKVManager` sends through -- on the real mooncake
backend (TCP here). Each prompt is the default model's 2,000-token KV (30 layers x K/V,
60 coalesced runs, 46 MB), `--sends` prompts per peer, all queued at once. It prints JSON:
per case the peers, QUEUE_SIZE, THREAD_POOL_SIZE, seconds and aggregate GB/s, plus ratios.

    .venv/bin/python bench/pd_transfer_parallel.py [--sends 8] [--repeats 3]
    .venv/bin/python bench/pd_transfer_parallel.py --peer-cpu-quota 0.25   # needs root

Why `--peer-cpu-quota`: Mooncake's TCP transport copies every byte with the CPU on both ends,
so on a 2-core machine one sender and two receivers share the same two cores and the cases
measure the machine, not the queues. With a quota, each receiver process runs in its own cpu
cgroup capped at that fraction of a core -- a decode peer limited by its own host (its NIC,
its busy cores), not by the sender -- which is the situation the queues are for: two such
peers should fill ~2x one peer's rate, QUEUE_SIZE 1 should serialise them, and a peer
throttled further (the "slow peer" cases, a quarter of the quota) should not hold up the
other one's sends when each has its own queue.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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
    # 5 ms between drains: the notifications only need draining, and a tight loop would eat
    # a throttled peer's CPU quota.
    while not conn.poll(0.005):
        backend.fetch_notifications()
    backend.close()


class CpuCap:
    """A cpu cgroup (v2 under /sys/fs/cgroup, else v1 under /sys/fs/cgroup/cpu) holding one
    process, capped at `fraction` of a core. Root only; removed by `close`."""

    PERIOD_US = 10_000  # short periods: the cap holds within sub-second sends

    def __init__(self, name: str, pid: int, fraction: float) -> None:
        v2 = "/sys/fs/cgroup"
        controllers = ""
        if os.path.exists(f"{v2}/cgroup.controllers"):
            with open(f"{v2}/cgroup.controllers") as f:
                controllers = f.read()
        if "cpu" in controllers.split():
            self.root, self.v2 = v2, True
        elif os.path.isdir("/sys/fs/cgroup/cpu"):
            self.root, self.v2 = "/sys/fs/cgroup/cpu", False
        else:
            raise SystemExit("--peer-cpu-quota: no writable cpu cgroup on this machine")
        self.path = f"{self.root}/{name}"
        os.makedirs(self.path, exist_ok=True)
        self.set(fraction)
        with open(f"{self.path}/cgroup.procs", "w") as f:
            f.write(str(pid))

    def set(self, fraction: float) -> None:
        quota = max(1000, int(fraction * self.PERIOD_US))
        if self.v2:
            with open(f"{self.path}/cpu.max", "w") as f:
                f.write(f"{quota} {self.PERIOD_US}")
        else:
            with open(f"{self.path}/cpu.cfs_period_us", "w") as f:
                f.write(str(self.PERIOD_US))
            with open(f"{self.path}/cpu.cfs_quota_us", "w") as f:
                f.write(str(quota))

    def close(self) -> None:
        try:
            with open(f"{self.path}/cgroup.procs") as f:
                pids = f.read().split()
            for pid in pids:
                with open(f"{self.root}/cgroup.procs", "w") as f:
                    f.write(pid)
            os.rmdir(self.path)
        except OSError:
            pass


def run_case(
    backend: Any, src: int, peers: list[tuple[str, int]], queues: int, threads: int, sends: int
) -> tuple[float, dict[str, float]]:
    """Seconds until every send landed, and per peer the seconds until its last send did."""
    lock = threading.RLock()
    tq = TransferQueues(backend, lock, queues, threads, name="bench-send")
    left = {peer: sends for peer, _ in peers}
    finished: dict[str, float] = {}
    all_done = threading.Event()
    failures: list[str] = []
    t0 = time.perf_counter()

    def on_done_for(peer: str) -> Any:
        def on_done(state: BatchState) -> None:
            with lock:
                if state.status is not BatchStatus.DONE:
                    failures.append(str(state.reason))
                left[peer] -= 1
                if left[peer] == 0:
                    finished[peer] = time.perf_counter() - t0
                    if len(finished) == len(left):
                        all_done.set()

        return on_done

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
            tq.put(SendJob(peer, room, runs[peer], b"done", on_done_for(peer), lambda: False))
    all_done.wait()
    elapsed = time.perf_counter() - t0
    tq.close()
    if failures:
        raise RuntimeError(f"sends failed: {failures[:3]}")
    return elapsed, finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="mooncake")
    ap.add_argument("--sends", type=int, default=8, help="prompts per peer per case")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="THREAD_POOL_SIZE")
    ap.add_argument(
        "--peer-cpu-quota",
        type=float,
        default=0.0,
        help="cap each receiver at this fraction of a core (cpu cgroup; root only); "
        "adds the slow-peer cases. 0: no cap",
    )
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    procs, conns, hellos, caps = [], [], [], []
    for i in range(2):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=receiver, args=(child, args.backend), daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)
        hellos.append(parent.recv())
        if args.peer_cpu_quota > 0:
            caps.append(CpuCap(f"pdcore-bench-{os.getpid()}-{i}", p.pid, args.peer_cpu_quota))
    try:
        out = measure(args, hellos, caps)
    finally:
        for cap in caps:
            cap.close()
        for c in conns:
            c.send("exit")
        for p in procs:
            p.join(10)
    print(json.dumps(out, indent=2))


def measure(args: argparse.Namespace, hellos: list[dict[str, Any]], caps: list[CpuCap]) -> Any:
    src_mem = torch.randint(0, 256, (PROMPT_BYTES,), dtype=torch.uint8)
    backend = create_transfer_backend(args.backend, TransferConfig(local_id="bench-send"))
    backend.register_memory([MemoryRegion(src_mem.data_ptr(), src_mem.numel())])
    peers = []
    for i, hello in enumerate(hellos):
        backend.connect(f"decode-{i}", hello["blob"])
        peers.append((f"decode-{i}", hello["addr"]))

    cases: list[tuple[str, list[tuple[str, int]], int, int, float]] = [
        ("1 peer, QUEUE_SIZE 4", peers[:1], 4, args.threads, 1.0),
        ("2 peers, QUEUE_SIZE 4", peers, 4, args.threads, 1.0),
        ("2 peers, QUEUE_SIZE 1", peers, 1, args.threads, 1.0),
        ("2 peers, QUEUE_SIZE 1, THREAD_POOL_SIZE 1", peers, 1, 1, 1.0),
    ]
    if caps:
        # decode-0 throttled to a quarter of the others' quota: does decode-1 wait for it?
        cases += [
            ("slow decode-0 + decode-1, QUEUE_SIZE 4", peers, 4, args.threads, 0.25),
            ("slow decode-0 + decode-1, QUEUE_SIZE 1", peers, 1, args.threads, 0.25),
        ]
    run_case(backend, src_mem.data_ptr(), peers, 4, args.threads, 1)  # warm the connections
    results = []
    for name, case_peers, q, t, slow in cases:
        if caps:
            caps[0].set(args.peer_cpu_quota * slow)
        runs = [
            run_case(backend, src_mem.data_ptr(), case_peers, q, t, args.sends)
            for _ in range(args.repeats)
        ]
        secs = statistics.median(r[0] for r in runs)
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
                "per_peer_seconds": {
                    peer: round(statistics.median(r[1][peer] for r in runs), 4)
                    for peer, _ in case_peers
                },
            }
        )
    base = results[0]["aggregate_gbps"]
    for r in results[:4]:
        r["vs_1_peer"] = round(r["aggregate_gbps"] / base, 2)
    backend.close()
    return {
        "backend": args.backend,
        "prompt_bytes": PROMPT_BYTES,
        "runs_per_prompt": RUNS,
        "sends_per_peer": args.sends,
        "repeats": args.repeats,
        "peer_cpu_quota": args.peer_cpu_quota or None,
        "cpu_count": os.cpu_count(),
        "results": results,
    }


if __name__ == "__main__":
    main()
