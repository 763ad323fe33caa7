"""What pipeline parallelism does to a decode step on this machine, and what micro-batches buy.

Each configuration starts the stages as processes (spawn) joined in a real pipeline group
(gloo on CPU, as `pdcore serve --pp-size N` does) with the engine's own code: stage 0 is
`PipelineRunner` (batch broadcast, its layers, activations out, logits back), stages 1..N-1
are `StageWorker`s. It prefills `batch` sequences of PROMPT_LEN tokens, then times
decode steps on stage 0 (median after warm-up), and the prefill step itself (the
same batch of prompts prefilled again, median of 3 after one warm-up). pp 1 is the plain engine
runner with the same threads per process.

    python bench/pp_cost.py --out docs/pp_cost.json
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


def _stage(rank: int, pp: int, micro: int, model_path: str | None, port: int, cfg: dict, out: Any):
    import torch

    from pdcore.engine.config import EngineConfig
    from pdcore.engine.pp_stage import StageWorker, load_stage
    from pdcore.engine.tp_worker import load_rank
    from pdcore.model.forward_batch import ForwardBatch
    from pdcore.model.pipeline_split import init_pipeline_grid

    torch.set_num_threads(cfg["threads"])
    batch_size, steps = cfg["batch"], cfg["steps"]
    pages_per_seq = (PROMPT_LEN + steps) // PAGE + 1
    settings = EngineConfig(
        model_path=model_path,
        dtype="float32",
        max_total_tokens=PAGE * (batch_size * pages_per_seq + 1),
        page_size=PAGE,
    )
    cpu = torch.device("cpu")
    if pp > 1:
        group = init_pipeline_grid(rank, pp, 1, f"127.0.0.1:{port}", "127.0.0.1", 120, cpu)
        if rank > 0:
            worker = StageWorker(settings, group)
            worker.micro_batches = micro
            worker.run()
            group.close()
            return
        runner: Any = load_stage(settings, group).runner
        runner.micro_batches = micro
    else:
        runner = load_rank(settings).runner
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

    prefill = []
    for _ in range(4):  # the same prompts again into the same slots: a compute-bound step
        t0 = time.perf_counter()
        runner.run(make(False, PROMPT_LEN))
        prefill.append(time.perf_counter() - t0)
    times = []
    for step in range(steps):
        batch = make(True, PROMPT_LEN + 1 + step)
        t0 = time.perf_counter()
        runner.run(batch)
        times.append(time.perf_counter() - t0)
    if runner.broadcaster is not None:
        runner.broadcaster.stop()
    out.put(
        {
            "decode_step_ms": round(statistics.median(times[cfg["warmup"] :]) * 1e3, 3),
            "prefill_step_ms": round(statistics.median(prefill[1:]) * 1e3, 3),
            "prefill_tokens": batch_size * PROMPT_LEN,
        }
    )


def measure(model_path: str | None, pp: int, micro: int, batch: int, steps: int, warmup: int):
    cfg = {"batch": batch, "steps": steps, "warmup": warmup, "threads": 1}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_stage, args=(r, pp, micro, model_path, port, cfg, queue))
        for r in range(pp)
    ]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=900)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return {"pp": pp, "micro_batches": micro, "batch": batch, "threads_per_stage": 1, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    runs = []
    for pp, micro in [(1, 1), (2, 1), (2, 2)]:
        row = measure(args.model_path, pp, micro, args.batch, args.steps, args.warmup)
        print(json.dumps(row), file=sys.stderr)
        runs.append(row)
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "model": args.model_path or "default (SmolLM2-135M)",
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
