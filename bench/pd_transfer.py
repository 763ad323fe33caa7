"""KV transfer between two processes: pdcore's nixl (or mooncake) backend vs raw vs memcpy.

For one prompt of the default model's KV shape (SmolLM2-135M: 30 layers, 3 KV heads,
head_dim 64, bf16, page_size 16) it moves the request's pages from a "prefill" process into
a "decode" process's pool and prints JSON: bytes, median latency, GB/s, ratio pdcore/raw.

- pdcore_nixl: runs built per page per layer for K and V (`kv_page_runs`, coalesced),
  submitted as one batch and polled to done, as the control plane will; pages contiguous
  (a fresh pool) and, separately, scattered at random (a fragmented pool, worst case).
- raw_nixl: the same number of bytes as one contiguous NIXL WRITE (new request each time,
  as any per-request use needs).
- memcpy: torch `copy_` of the same bytes inside one process.
Also 1 MiB and 64 MiB single transfers. Target: pdcore >= 70% of raw for the prompt.

With `--backend mooncake` the same cases run on pdcore's mooncake backend and on a raw
Mooncake `TransferEngine` (TCP, P2PHANDSHAKE; one `transfer_sync_write` of the same bytes);
the JSON has the same shape with `mooncake` in place of `nixl` in the keys.

    .venv/bin/python bench/pd_transfer.py [--tokens 2000] [--iters 30]
    UCX_NET_DEVICES=lo UCX_TLS=tcp .venv/bin/python bench/pd_transfer.py   # over TCP
    .venv/bin/python bench/pd_transfer.py --backend mooncake
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pdcore.disagg.transfer import (
    BatchStatus,
    KVLayout,
    MemoryRegion,
    TransferConfig,
    create_transfer_backend,
    kv_page_runs,
)

LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES, PAGE_SIZE = 30, 3, 64, 2, 16
SCRATCH = 64 << 20


def _side(num_pages: int, page_bytes: int, fill: bool) -> dict[str, torch.Tensor]:
    """One side's K and V pools plus a 64 MiB scratch buffer, as flat uint8 tensors."""
    size = LAYERS * num_pages * page_bytes

    def make(n: int) -> torch.Tensor:
        if fill:
            return torch.randint(0, 256, (n,), dtype=torch.uint8)
        return torch.zeros(n, dtype=torch.uint8)

    return {"k": make(size), "v": make(size), "scratch": make(SCRATCH)}


def _regions(mem: dict[str, torch.Tensor]) -> list[MemoryRegion]:
    return [MemoryRegion(t.data_ptr(), t.numel()) for t in mem.values()]


def _raw_agent(name: str, mem: dict[str, torch.Tensor]) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    # No NIXL progress thread (it spins a core), as in pdcore's backend by default.
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    agent.register_memory([(t.data_ptr(), t.numel(), 0, "") for t in mem.values()], "DRAM")
    return agent


def _raw_mooncake(mem: dict[str, torch.Tensor]) -> Any:
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("raw Mooncake engine failed to start")
    for t in mem.values():
        if engine.register_memory(t.data_ptr(), t.numel()) != 0:
            raise RuntimeError("raw Mooncake engine could not register memory")
    return engine


def _pages_digest(mem: dict[str, torch.Tensor], pages: list[int], page_bytes: int, n: int) -> str:
    h = hashlib.sha256()
    for name in ("k", "v"):
        view = mem[name].view(LAYERS, n, page_bytes)
        h.update(view[:, pages].contiguous().numpy().tobytes())
    return h.hexdigest()


def receiver(conn: Any, num_pages: int, page_bytes: int, name: str = "nixl") -> None:
    """The decode side: registers its pool, hands out blobs, drains notifications."""
    mem = _side(num_pages, page_bytes, fill=False)
    backend = create_transfer_backend(name, TransferConfig(local_id="bench-decode"))
    backend.register_memory(_regions(mem))
    hello: dict[str, Any] = {
        "blob": backend.describe(),
        "addrs": {k: t.data_ptr() for k, t in mem.items()},
    }
    if name == "nixl":
        raw = _raw_agent("bench-raw-decode", mem)
        hello["raw_md"] = raw.get_agent_metadata()
    else:
        raw = _raw_mooncake(mem)
        hello["raw_session"] = f"127.0.0.1:{raw.get_rpc_port()}"
    conn.send(hello)
    notified = 0
    while True:  # drive both agents' progress alike: raw nixl has no pdcore progress thread
        notified += len(backend.fetch_notifications())
        if name == "nixl":
            notified += sum(len(v) for v in raw.get_new_notifs().values())
        if not conn.poll(0.0001):
            continue
        cmd, arg = conn.recv()
        if cmd == "digest":
            conn.send(_pages_digest(mem, arg, page_bytes, num_pages))
        elif cmd == "notified":
            conn.send(notified)
        else:
            break
    backend.close()


def _medians(fns: dict[str, Callable[[], Any]], iters: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each fn, measured interleaved (one of each per round) so that drift
    on a busy machine hits every contender alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _stat(nbytes: int, seconds: float) -> dict[str, float]:
    return {"latency_ms": round(seconds * 1e3, 3), "gb_per_s": round(nbytes / seconds / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--backend", choices=("nixl", "mooncake"), default="nixl")
    args = ap.parse_args()
    page_bytes = PAGE_SIZE * KV_HEADS * HEAD_DIM * DTYPE_BYTES
    pages = -(-args.tokens // PAGE_SIZE)
    num_pages = 2 * pages + 8  # room to scatter; page 0 is the pool's padding page
    kv_bytes = 2 * LAYERS * pages * page_bytes

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(
        target=receiver, args=(there, num_pages, page_bytes, args.backend), daemon=True
    )
    proc.start()
    try:
        hello = here.recv()
        out = _run(args, hello, here, page_bytes, pages, num_pages, kv_bytes)
        here.send(("exit", None))
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    print(json.dumps(out, indent=2))


def _run(args: Any, hello: dict[str, Any], conn: Any, page_bytes: int, pages: int,
         num_pages: int, kv_bytes: int) -> dict[str, Any]:  # fmt: skip
    name = args.backend
    mem = _side(num_pages, page_bytes, fill=True)
    backend = create_transfer_backend(name, TransferConfig(local_id="bench-prefill"))
    backend.register_memory(_regions(mem))
    backend.connect("decode", hello["blob"])
    if name == "nixl":
        raw = _raw_agent("bench-raw-prefill", mem)
        raw_peer = raw.add_remote_agent(hello["raw_md"])
        raw_peer = raw_peer.decode() if isinstance(raw_peer, bytes) else raw_peer
    else:
        raw = _raw_mooncake(mem)
    remote = hello["addrs"]
    local_layout = KVLayout(mem["k"].data_ptr(), mem["v"].data_ptr(), LAYERS, num_pages, page_bytes)
    remote_layout = KVLayout(remote["k"], remote["v"], LAYERS, num_pages, page_bytes)

    def pdcore_write(make_runs: Callable[[], Any]) -> None:
        batch = backend.submit("decode", make_runs(), b"room")
        while not (state := backend.poll(batch)).finished:
            pass
        backend.release(batch)
        assert state.status is BatchStatus.DONE, state.reason

    def raw_write(src: int, dst: int, n: int) -> None:
        if name == "mooncake":
            ret = raw.transfer_sync_write(hello["raw_session"], src, dst, n)
            assert ret == 0, ret
            return
        handle = raw.initialize_xfer(
            "WRITE",
            raw.get_xfer_descs([(src, n, 0)], "DRAM"),
            raw.get_xfer_descs([(dst, n, 0)], "DRAM"),
            raw_peer,
            b"room",
        )
        status = raw.transfer(handle)
        while status == "PROC":
            status = raw.check_xfer_state(handle)
        handle.release()
        assert status == "DONE", status

    rng = np.random.default_rng(0)
    contiguous = list(range(1, pages + 1))
    scattered_src = sorted(rng.choice(np.arange(1, num_pages), pages, replace=False).tolist())
    scattered_dst = rng.permutation(np.arange(1, num_pages))[:pages].tolist()
    layouts = (local_layout, remote_layout)
    build = {
        "contiguous": lambda: kv_page_runs(*layouts, contiguous, contiguous),
        "scattered": lambda: kv_page_runs(*layouts, scattered_src, scattered_dst),
    }
    memcpy_dst = torch.empty(SCRATCH, dtype=torch.uint8)
    src_k, dst_k = mem["k"].data_ptr(), remote["k"]
    src_s, dst_s = mem["scratch"].data_ptr(), remote["scratch"]
    it = args.iters

    def memcpy(n: int) -> Callable[[], Any]:
        src = torch.cat([mem["k"], mem["v"]])[:n] if n > SCRATCH else mem["scratch"][:n]
        dst = torch.empty_like(src) if n > SCRATCH else memcpy_dst[:n]
        return lambda: dst.copy_(src)

    prompt: dict[str, Any] = {"case": f"{args.tokens}-token prompt", "bytes": kv_bytes}
    prompt["runs"] = {k: len(f()) for k, f in build.items()}
    prompt["runs_uncoalesced"] = 2 * LAYERS * pages
    built = _medians(build, it)
    prompt["build_runs_ms"] = {k: round(v * 1e3, 3) for k, v in built.items()}
    fns: dict[str, Callable[[], Any]] = {
        f"raw_{name}": lambda: raw_write(src_k, dst_k, kv_bytes),
        f"pdcore_{name}_contiguous": lambda: pdcore_write(build["contiguous"]),
        f"pdcore_{name}_scattered": lambda: pdcore_write(build["scattered"]),
        "memcpy": memcpy(kv_bytes),
    }
    prompt.update({k: _stat(kv_bytes, v) for k, v in _medians(fns, it).items()})
    for case in build:
        ratio = prompt[f"pdcore_{name}_{case}"]["gb_per_s"] / prompt[f"raw_{name}"]["gb_per_s"]
        prompt[f"ratio_pdcore_{case}_raw"] = round(ratio, 3)

    # Byte-exact: each page pattern once more, then the decode side's pages are compared.
    exact = True
    for case, (src_pages, dst_pages) in {
        "scattered": (scattered_src, scattered_dst),
        "contiguous": (contiguous, contiguous),
    }.items():
        pdcore_write(build[case])
        conn.send(("digest", dst_pages))
        exact &= conn.recv() == _pages_digest(mem, src_pages, page_bytes, num_pages)

    singles = []
    for label, n in (("1 MiB", 1 << 20), ("64 MiB", 64 << 20)):
        runs = np.array([[src_s, dst_s, n]], dtype=np.uint64)
        fns = {
            f"raw_{name}": lambda n=n: raw_write(src_s, dst_s, n),
            f"pdcore_{name}": lambda r=runs: pdcore_write(lambda: r),
            "memcpy": memcpy(n),
        }
        row: dict[str, Any] = {"case": label, "bytes": n}
        row.update({k: _stat(n, v) for k, v in _medians(fns, it).items()})
        row["ratio_pdcore_raw"] = round(
            row[f"pdcore_{name}"]["gb_per_s"] / row[f"raw_{name}"]["gb_per_s"], 3
        )
        singles.append(row)
    conn.send(("notified", None))
    notified = conn.recv()
    backend.close()
    return {
        "kv_shape": {
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "bfloat16",
            "page_size": PAGE_SIZE,
            "page_bytes_per_layer": page_bytes,
            "tokens": args.tokens,
            "pages": pages,
            "kv_bytes_per_request": kv_bytes,
        },  # fmt: skip
        "memory": "DRAM (CPU)",
        "backend": name,
        "ucx": {k: v for k, v in os.environ.items() if k.startswith("UCX_")} or "defaults",
        "iters": it,
        "results": [prompt, *singles],
        "target": f"pdcore >= 0.7 x raw {name} for the prompt (contiguous pages)",
        "meets_target": prompt["ratio_pdcore_contiguous_raw"] >= 0.7,
        "byte_exact": exact,
        "notifications_received": notified,
    }


if __name__ == "__main__":
    main()
