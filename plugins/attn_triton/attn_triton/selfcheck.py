"""The triton kernels against the torch backend on random paged inputs, as a dict.

    python -m attn_triton.selfcheck            # on a CUDA machine: fp32, bf16, fp16
    TRITON_INTERPRET=1 python -m attn_triton.selfcheck --tiny   # CPU, fp32, tiny shapes

The reference is the torch backend in fp32 on the same numbers; the error reported is
max |triton - reference| / max |reference| (normwise: elementwise relative error is
meaningless where outputs cross zero). bench/gpu_check.py runs this as its "kernels" part.
"""

from __future__ import annotations

import json
import sys

import torch

from pdcore.engine.attention_torch import TorchAttentionBackend
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool

TARGETS = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_case(device, heads, kv_heads, head_dim, page_size, seq_lens, ext_lens):
    """A random fp32 pool with scattered pages, q/k/v for the new tokens, and a batch maker."""
    need = sum(-(-n // page_size) for n in seq_lens)
    pool = KVPool(1, need + 1, page_size, kv_heads, head_dim, torch.float32, device)
    pool.k[:, 1:].normal_()
    pool.v[:, 1:].normal_()
    free = (torch.randperm(need) + 1).tolist()
    tables = [[free.pop() for _ in range(-(-n // page_size))] for n in seq_lens]
    pos, slots = [], []
    for n, e, t in zip(seq_lens, ext_lens, tables):
        pos += range(n - e, n)
        slots += [t[p // page_size] * page_size + p % page_size for p in range(n - e, n)]
    total = len(pos)
    qkv = [torch.randn(total, h, head_dim, device=device) for h in (heads, kv_heads, kv_heads)]

    def batch(is_decode: bool) -> ForwardBatch:
        return ForwardBatch(
            is_decode,
            torch.zeros(total, dtype=torch.long, device=device),
            torch.tensor(pos, device=device),
            torch.tensor(slots, device=device),
            list(seq_lens),
            list(ext_lens),
            tables,
            torch.arange(len(seq_lens), device=device),
            page_size,
        )

    return pool, qkv, batch


def compare_with_torch(device, tiny: bool = False, quick: bool = False) -> dict:
    from attn_triton.backend import TritonAttentionBackend

    device = torch.device(device)
    heads, kv_heads, head_dim = (4, 2, 16) if tiny else (32, 8, 128)
    dtypes = [torch.float32] if tiny else [torch.float32, torch.bfloat16, torch.float16]
    long = 40 if tiny else (1500 if quick else 4000)
    cases = {
        "decode": ([7, long, 300 % long + 1, 1], [1, 1, 1, 1]),
        "extend_prefix": ([long, 37, 200 % long + 20], [64 % long, 37, 20]),
    }
    out: dict = {}
    for dtype in dtypes:
        for page_size in (1, 16):
            for name, (lens, exts) in cases.items():
                is_decode = name == "decode"
                torch.manual_seed(0)
                pool, (q, k, v), make = random_case(
                    device, heads, kv_heads, head_dim, page_size, lens, exts
                )
                ref = TorchAttentionBackend(heads, kv_heads, head_dim, device)
                b = make(is_decode)
                ref.prepare(b, pool)
                want = ref.forward(0, q, k, v, b, pool).float()
                pool.k, pool.v = pool.k.to(dtype), pool.v.to(dtype)
                tri = TritonAttentionBackend(heads, kv_heads, head_dim, device, dtype)
                b = make(is_decode)
                tri.prepare(b, pool)
                got = tri.forward(0, q.to(dtype), k.to(dtype), v.to(dtype), b, pool).float()
                rel = ((got - want).abs().max() / want.abs().max()).item()
                key = f"{name}/{str(dtype).removeprefix('torch.')}/page{page_size}"
                out[key] = {"max_rel_err": rel, "ok": rel <= TARGETS[dtype]}
    out["all_ok"] = all(v["ok"] for v in out.values())
    return out


if __name__ == "__main__":
    tiny = "--tiny" in sys.argv
    print(json.dumps(compare_with_torch("cpu" if tiny else "cuda", tiny=tiny), indent=2))
