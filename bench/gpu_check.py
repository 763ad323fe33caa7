"""One prepared GPU check for pdcore: kernels, decode, prefill and NIXL, as JSON.

    python bench/gpu_check.py [--quick] [--out result.json]   # on a CUDA machine, minutes
    python bench/gpu_check.py --dry-run                        # CPU: tiny shapes, plumbing only

Parts, each guarded so one failure keeps the others (its entry says "error"):
  kernels  triton decode/extend vs the torch backend in fp32, bf16 and fp16 (relative error)
  decode   an 8B Llama-shaped model with random bf16 weights: pdcore (triton backend, CUDA
           graphs and eager) step time at batch 1 and 16 against the memory roofline
           ((weight + KV bytes) / measured copy bandwidth), beside transformers `generate`
           with a static cache on the same weights
  prefill  2048 tokens through pdcore: tokens/s and TFLOP/s against a measured bf16 matmul
           rate; transformers' forward beside it; argmax agreement of the last logits
  nixl     if nixl imports: a VRAM->VRAM write between two processes, 1 MiB and 64 MiB

Needs only torch, transformers, triton and this repository (not installed: the paths are
added here; pluggy, if absent, is stubbed, as only its decorators run at import time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "plugins" / "attn_triton", ROOT / "plugins" / "pd_nixl"):
    sys.path.insert(0, str(_p))

SHAPES = {  # Llama 3 8B, and a tiny stand-in for --dry-run
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336, vocab=128256),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=512),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and cases (~1-2 min)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, Triton interpreter")
    p.add_argument("--parts", default="kernels,decode,prefill,nixl", help="comma-separated")
    p.add_argument("--context", type=int, default=1024, help="KV length during decode timing")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--hf-compile", action="store_true", help="let transformers torch.compile")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.context, args.prefill_tokens = min(args.context, 48), min(args.prefill_tokens, 64)
    return args


def _stub_pluggy() -> None:
    try:
        import pluggy  # noqa: F401
    except ImportError:
        marker = lambda project: lambda *a, **k: a[0] if a and callable(a[0]) else (lambda f: f)  # noqa: E731
        sys.modules["pluggy"] = types.SimpleNamespace(HookimplMarker=marker, HookspecMarker=marker)


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _time(fn, device, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over reps runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----- kernels ------------------------------------------------------------------------------
def check_kernels(args, torch, device) -> dict:
    from attn_triton.selfcheck import compare_with_torch

    return compare_with_torch(device, tiny=args.dry_run, quick=args.quick)


# ----- models ------------------------------------------------------------------------------
def build_models(args, torch, device, dtype, with_hf=True):
    """transformers' LlamaForCausalLM with random weights, and pdcore's model on the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdcore.model.config import ModelConfig
    from pdcore.model.llama import LlamaModel

    s = SHAPES["tiny" if args.dry_run else "8b"]
    max_pos = max(args.context + 256, args.prefill_tokens + 64)
    cfg = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(max_pos, 8192),
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    mc = ModelConfig(
        architecture="llama",
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_layers=s["layers"],
        num_heads=s["heads"],
        num_kv_heads=s["kv_heads"],
        head_dim=s["hidden"] // s["heads"],
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=500000.0,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )
    model = LlamaModel(mc, dict(hf.state_dict()), dtype, device, max_pos)
    return mc, model, (hf if with_hf else None)


def _attn(args, torch, mc, device, dtype):
    if args.dry_run:  # the triton kernels in the interpreter are too slow for a model loop
        from pdcore.engine.attention_torch import TorchAttentionBackend as cls
    else:
        from attn_triton.backend import TritonAttentionBackend as cls
    return cls(mc.num_heads, mc.num_kv_heads, mc.head_dim, device, dtype)


def _weight_bytes(mc, dtype) -> int:
    from pdcore.engine.setup import weight_bytes

    embed = mc.vocab_size * mc.hidden_size * dtype.itemsize  # only a few rows are read
    return weight_bytes(mc, dtype) - embed


def copy_bandwidth(torch, device) -> float:
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, reps=10)
    return 2 * n / t  # read + write bytes per second


def _decode_batch(torch, device, bs, length, tables, page_size):
    from pdcore.model.forward_batch import ForwardBatch

    slots = [t[(length - 1) // page_size] * page_size + (length - 1) % page_size for t in tables]
    return ForwardBatch(
        is_decode=True,
        input_ids=torch.randint(0, 100, (bs,), device=device),
        positions=torch.full((bs,), length - 1, dtype=torch.long, device=device),
        out_slots=torch.tensor(slots, device=device),
        seq_lens=[length] * bs,
        extend_lens=[1] * bs,
        page_tables=tables,
        logits_indices=torch.arange(bs, device=device),
        page_size=page_size,
    )


def bench_decode(args, torch, device) -> dict:
    from pdcore.engine.model_runner import ModelRunner
    from pdcore.model.kv_pool import KVPool

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    mc, model, hf = build_models(args, torch, device, dtype)
    ps, ctx = args.page_size, args.context
    steps = 4 if args.dry_run else (16 if args.quick else 64)
    batches = (1, 16)
    per_seq = -(-(ctx + steps + 2) // ps)
    pool = KVPool(
        mc.num_layers, max(batches) * per_seq + 1, ps, mc.num_kv_heads, mc.head_dim, dtype, device
    )
    attn = _attn(args, torch, mc, device, dtype)
    graph = ModelRunner(model, pool, attn, cuda_graph_max_bs=max(batches))
    eager = ModelRunner(model, pool, attn, disable_cuda_graph=True)
    bw = copy_bandwidth(torch, device)
    kv_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype.itemsize
    result = {"copy_bandwidth_GBps": bw / 1e9, "context": ctx, "steps": steps}
    for bs in batches:
        tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(bs)]
        runs = [_decode_batch(torch, device, bs, ctx + i, tables, ps) for i in range(steps)]
        row = {}
        for name, runner in (("graph", graph), ("eager", eager)):
            if name == "graph" and runner.graphs is None:
                row["graph"] = "not captured (CPU, or backend without graph support)"
                continue

            def loop(runner=runner, runs=runs):
                for b in runs:
                    b.attn_meta.clear()
                    runner.run(b)

            row[f"pdcore_{name}_step_ms"] = _time(loop, device, reps=3) / steps * 1e3
        if graph.graphs is not None:  # the same step through both paths: same logits
            b = runs[0]
            b.attn_meta.clear()
            a = graph.run(b).clone()
            b.attn_meta.clear()
            row["graph_vs_eager_max_abs_diff"] = (a - eager.run(b)).abs().max().item()
        roof = (_weight_bytes(mc, dtype) + bs * (ctx + steps / 2) * kv_token) / bw
        row["roofline_step_ms"] = roof * 1e3
        best = row.get("pdcore_graph_step_ms", row["pdcore_eager_step_ms"])
        row["pdcore_fraction_of_roofline"] = row["roofline_step_ms"] / best
        row["hf_static_step_ms"] = _hf_decode_ms(args, torch, device, hf, mc, bs, steps)
        row["pdcore_speedup_vs_hf"] = row["hf_static_step_ms"] / best
        result[f"batch_{bs}"] = row
    return result


def _hf_decode_ms(args, torch, device, hf, mc, bs, steps) -> float:
    ids = torch.randint(0, mc.vocab_size, (bs, args.context), device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    kw["cache_implementation"] = "static"
    if not args.hf_compile:
        kw["disable_compile"] = True

    def gen(n):
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    t1 = _time(lambda: gen(1), device, reps=2, warmup=1)
    tn = _time(lambda: gen(steps + 1), device, reps=2, warmup=1)
    return (tn - t1) / steps * 1e3


# ----- prefill ------------------------------------------------------------------------------
def matmul_rate(torch, device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, device, reps=10)


def bench_prefill(args, torch, device) -> dict:
    from pdcore.model.forward_batch import ForwardBatch
    from pdcore.model.kv_pool import KVPool

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    mc, model, hf = build_models(args, torch, device, dtype)
    n, ps = args.prefill_tokens, args.page_size
    pages = -(-n // ps)
    pool = KVPool(mc.num_layers, pages + 1, ps, mc.num_kv_heads, mc.head_dim, dtype, device)
    attn = _attn(args, torch, mc, device, dtype)
    ids = torch.randint(0, mc.vocab_size, (n,), device=device)

    def batch():
        return ForwardBatch(
            False,
            ids,
            torch.arange(n, device=device),
            torch.arange(ps, (pages + 1) * ps, device=device)[:n],
            [n],
            [n],
            [list(range(1, pages + 1))],
            torch.tensor([n - 1], device=device),
            ps,
        )

    t = _time(lambda: model.forward(batch(), pool, attn), device, reps=3 if args.quick else 5)
    linear = _weight_bytes(mc, dtype) // dtype.itemsize - mc.vocab_size * mc.hidden_size
    attn_flops = 4 * mc.num_layers * mc.num_heads * mc.head_dim * n * n / 2  # causal
    flops = 2 * linear * n + attn_flops + 2 * mc.vocab_size * mc.hidden_size
    peak = matmul_rate(torch, device, dtype)
    out = {"tokens": n, "pdcore_s": t, "pdcore_tokens_per_s": n / t}
    out |= {"pdcore_TFLOPs": flops / t / 1e12, "matmul_TFLOPs": peak / 1e12}
    out["fraction_of_matmul_rate"] = flops / t / peak
    with torch.inference_mode():
        ours = model.forward(batch(), pool, attn)[0]
        hf_fwd = lambda: hf(ids[None], use_cache=False, logits_to_keep=1).logits  # noqa: E731
        theirs = hf_fwd()[0, -1].float()
        out["hf_s"] = _time(hf_fwd, device, reps=3)
    out["hf_tokens_per_s"] = n / out["hf_s"]
    out["last_logits_argmax_equal"] = bool(ours.argmax() == theirs.argmax())
    out["last_logits_max_abs_diff"] = (ours - theirs).abs().max().item()
    return out


# ----- nixl ---------------------------------------------------------------------------------
def _nixl_receiver(conn, size: int, dev: str) -> None:
    import torch
    from pd_nixl.backend import NixlBackend

    from pdcore.disagg.transfer import MemoryRegion, TransferConfig

    buf = torch.zeros(size, dtype=torch.uint8, device=dev)
    backend = NixlBackend(TransferConfig(local_id="gpu-check-receiver"))
    backend.register_memory([MemoryRegion(buf.data_ptr(), size, device=dev)])
    conn.send((backend.describe(), buf.data_ptr()))
    conn.recv()
    backend.close()


def bench_nixl(args, torch, device) -> dict:
    import importlib.util
    import multiprocessing as mp

    if importlib.util.find_spec("nixl") is None:
        return {"skipped": "nixl is not importable"}
    from pd_nixl.backend import NixlBackend

    from pdcore.disagg.transfer import MemoryRegion, TransferConfig

    dev = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    sizes = [1 << 20, 64 << 20]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_nixl_receiver, args=(child, max(sizes), dev), daemon=True)
    proc.start()
    sender = None
    try:
        blob, remote = parent.recv() if parent.poll(120) else (None, None)
        if blob is None:
            return {"error": "receiver process did not start within 120 s"}
        src = torch.randint(0, 255, (max(sizes),), dtype=torch.uint8, device=dev)
        sender = NixlBackend(TransferConfig(local_id="gpu-check-sender"))
        sender.register_memory([MemoryRegion(src.data_ptr(), src.numel(), device=dev)])
        sender.connect("receiver", blob)
        out = {"memory": "VRAM" if dev != "cpu" else "DRAM (dry run)"}
        for size in sizes:
            times = []
            for i in range(3 if args.dry_run else 20):
                start = time.perf_counter()
                batch = sender.submit("receiver", [(src.data_ptr(), remote, size)], b"n%d" % i)
                while not (state := sender.poll(batch)).finished:
                    pass
                times.append(time.perf_counter() - start)
                sender.release(batch)
                if state.reason:
                    return {"error": f"transfer failed: {state.reason}"}
            med = statistics.median(times)
            out[f"{size >> 20}MiB"] = {"median_ms": med * 1e3, "GBps": size / med / 1e9}
        return out
    finally:
        if sender is not None:
            sender.close()
        parent.send("exit")
        proc.join(30)


# ----- main ---------------------------------------------------------------------------------
PARTS = {
    "kernels": check_kernels,
    "decode": bench_decode,
    "prefill": bench_prefill,
    "nixl": bench_nixl,
}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
    _stub_pluggy()
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    report: dict = {
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "quick": args.quick,
        "dry_run": args.dry_run,
    }
    for mod in ("triton", "transformers"):
        try:
            report[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - report, carry on
            report[mod] = f"unavailable: {exc}"
    for name in args.parts.split(","):
        start = time.perf_counter()
        try:
            report[name] = PARTS[name](args, torch, device)
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others
            report[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-2000:],
            }
        report[name]["seconds"] = round(time.perf_counter() - start, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu_check] {name} done in {report[name]['seconds']} s", file=sys.stderr)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
