"""What tensor parallelism costs per decode step on this machine: compute vs all-reduce.

Each configuration starts `tp` rank processes (spawn) joined in a real TP group (gloo on
CPU, as `pdcore serve --tp-size N` does), prefills `batch` sequences of PROMPT_LEN tokens
and then times DECODE_STEPS decode steps on rank 0, split into:

  broadcast_ms   rank 0 sending the step's ForwardBatch to the followers (tp_sync)
  allreduce_ms   the 2 * num_layers all-reduces of the step (o_proj and down outputs),
                 wall time rank 0 spends in them -- this includes waiting for the slowest
                 rank, so it is "communication + imbalance"
  compute_ms     the rest of the step

Output: one JSON object (stdout, or --out FILE). On a GPU the same split predicts NCCL's
cost by replacing allreduce_ms with (2 * layers) * (latency + bytes / bus bandwidth).

    python bench/tp_cost.py --out docs/tp_cost.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PROMPT_LEN = 32
PAGE = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(
    rank: int, tp: int, model_path: str | None, port: int, cfg: dict[str, Any], out: Any
) -> None:
    import torch

    from pdcore.engine.tp_sync import BATCH, STOP, BatchBroadcaster, BatchReceiver
    from pdcore.model.forward_batch import ForwardBatch
    from pdcore.model.kv_pool import KVPool
    from pdcore.model.llama import LlamaModel
    from pdcore.model.loader import load_state_dict, resolve_model
    from pdcore.model.parallel import TPGroup, init_tp_group
    from pdcore.plugins import get_registry

    torch.set_num_threads(cfg["threads"])
    cpu = torch.device("cpu")
    group = (
        init_tp_group(rank, tp, f"127.0.0.1:{port}", "127.0.0.1", 120, cpu) if tp > 1 else TPGroup()
    )
    resolved = resolve_model(model_path)
    mc = resolved.config
    model = LlamaModel(mc, load_state_dict(resolved), torch.float32, cpu, 512, group)
    batch_size, steps = cfg["batch"], cfg["steps"]
    pages_per_seq = (PROMPT_LEN + steps) // PAGE + 1
    pool = KVPool(
        mc.num_layers,
        1 + batch_size * pages_per_seq,
        PAGE,
        model.num_kv_heads,
        mc.head_dim,
        torch.float32,
        cpu,
    )
    attn = get_registry("attention_backend").create(
        "torch",
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=mc.head_dim,
        device=cpu,
        dtype=torch.float32,
    )
    if rank != 0:
        receiver = BatchReceiver(group)
        while True:
            msg = receiver.recv()
            if msg.kind == STOP:
                group.close()
                return
            if msg.kind == BATCH and msg.batch is not None:
                model.forward(msg.batch, pool, attn)

    tables = [
        list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)) for i in range(batch_size)
    ]

    def make(decode: bool, length: int) -> ForwardBatch:
        ids, pos, slots, rows = [], [], [], []
        for table in tables:
            span = range(length - 1, length) if decode else range(length)
            for p in span:
                ids.append(7 + p % 50)
                pos.append(p)
                slots.append(table[p // PAGE] * PAGE + p % PAGE)
            rows.append(len(ids) - 1)
        n = 1 if decode else length
        return ForwardBatch(
            is_decode=decode,
            input_ids=torch.tensor(ids),
            positions=torch.tensor(pos),
            out_slots=torch.tensor(slots),
            seq_lens=[length] * batch_size,
            extend_lens=[n] * batch_size,
            page_tables=tables,
            logits_indices=torch.tensor(rows),
            page_size=PAGE,
        )

    sender = BatchBroadcaster(group) if tp > 1 else None

    def run(batch: ForwardBatch) -> tuple[float, float]:
        t0 = time.perf_counter()
        if sender is not None:
            sender.send_batch(batch)
        t1 = time.perf_counter()
        model.forward(batch, pool, attn)
        return t1 - t0, time.perf_counter() - t1

    run(make(False, PROMPT_LEN))
    rows = []
    for step in range(steps):
        batch = make(True, PROMPT_LEN + 1 + step)
        group.allreduce_seconds = 0.0
        bcast, fwd = run(batch)
        rows.append((bcast, fwd, group.allreduce_seconds or 0.0))
    if sender is not None:
        sender.stop()
        group.close()
    warm = rows[cfg["warmup"] :]

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 3)

    out.put(
        {
            "step_ms": ms([b + f for b, f, _ in warm]),
            "broadcast_ms": ms([b for b, _, _ in warm]),
            "allreduce_ms": ms([a for _, _, a in warm]),
            "compute_ms": ms([f - a for _, f, a in warm]),
            "allreduces_per_step": 2 * mc.num_layers if tp > 1 else 0,
            "allreduce_bytes_each": batch_size * mc.hidden_size * 4,
        }
    )


def measure(model_path: str | None, tp: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    cfg = {"batch": batch, "steps": steps, "warmup": warmup, "threads": max(cores // tp, 1)}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, tp, model_path, port, cfg, queue)) for r in range(tp)
    ]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=600)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return {"tp": tp, "batch": batch, "threads_per_rank": cfg["threads"], **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-model", help="HF folder of a small Llama whose heads divide by 2")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    runs: list[dict[str, Any]] = []
    models: list[tuple[str, str | None, list[int]]] = [("default (SmolLM2-135M)", None, [1, 3])]
    if args.tiny_model:
        models.insert(0, ("tiny", args.tiny_model, [1, 2]))
    for name, path, tps in models:
        for batch in args.batch:
            for tp in tps:
                row = measure(path, tp, batch, args.steps, args.warmup)
                row["model"] = name
                print(json.dumps(row), file=sys.stderr)
                runs.append(row)
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_end": list(os.getloadavg()),  # other work on the machine skews it
        },
        "backend": "gloo (CPU), one process per rank, loopback TCP",
        "dtype": "float32",
        "prompt_len": PROMPT_LEN,
        "decode_steps": args.steps,
        "warmup_steps": args.warmup,
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
