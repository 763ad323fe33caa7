"""Our bf16 CPU kernels against fp32 references (fresh random inputs each run).

bf16 keeps 8 bits of mantissa, so results are compared with a relative tolerance of a few
bf16 ulps (2^-8 = 0.4%) against fp32 math on the same bf16 inputs."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pdcore.engine.attention_torch import TorchAttentionBackend
from pdcore.engine.forward_batch import ForwardBatch
from pdcore.engine.kv_pool import KVPool
from pdcore.model import native_cpu

BF16 = native_cpu.kernels(torch.bfloat16)
F32 = native_cpu.kernels(torch.float32)
pytestmark = pytest.mark.skipif(
    BF16 is None or F32 is None, reason="needs a CPU with AVX512-BF16 and a C compiler"
)
TOL = 1.5e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(torch.bfloat16)


def test_fp32_skinny_gemm_with_bias() -> None:
    """The fp32 model path: same kernel, fp32 weights and outputs, fp32 accuracy."""
    for m, n, k in [(1, 96, 64), (13, 80, 576), (32, 576, 1536)]:
        w, x, bias = torch.randn(n, k), torch.randn(m, k), torch.randn(n)
        y = F32.gemm(x, native_cpu.pack(w), n, bias)
        assert y.dtype == torch.float32 and rel_err(y, x @ w.T + bias) < 1e-5


@pytest.mark.parametrize("m", [1, 3, 8, 13, 32])
@pytest.mark.parametrize("n,k", [(96, 64), (80, 576), (576, 1536)])
def test_skinny_gemm(m: int, n: int, k: int) -> None:
    w, x = bf16(n, k), bf16(m, k)
    y = BF16.gemm(x, native_cpu.pack(w), n)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert rel_err(y, x.float() @ w.float().T) < TOL
    # strided rows (a slice of a wider activation) give the same answer
    wide = bf16(m, k + 32)
    wide[:, :k] = x
    assert torch.equal(BF16.gemm(wide[:, :k], native_cpu.pack(w), n), y)


def test_rms_norm_with_and_without_residual() -> None:
    h, eps = 576, 1e-5
    x, delta, w = bf16(5, h), bf16(5, h), bf16(h)

    def ref(v: torch.Tensor) -> torch.Tensor:  # transformers' LlamaRMSNorm, in fp32
        v = v.float()
        return w.float() * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps))

    assert rel_err(BF16.rms_norm(x.clone(), w, eps), ref(x)) < TOL
    residual = x.clone()
    out = BF16.rms_norm(residual, w, eps, delta=delta)
    assert torch.equal(residual, x + delta)  # bf16 add, written back in place
    assert rel_err(out, ref(x + delta)) < TOL


def test_silu_mul() -> None:
    gate_up = bf16(7, 2 * 1536) * 4
    want = F.silu(gate_up[:, :1536].float()) * gate_up[:, 1536:].float()
    assert rel_err(BF16.silu_mul(gate_up), want) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,page", [(9, 3, 64, 16), (8, 8, 64, 1), (32, 8, 128, 4)]
)
def test_decode_attention_matches_sdpa(
    heads: int, kv_heads: int, dim: int, page: int, dtype: torch.dtype
) -> None:
    pool = KVPool(
        num_layers=1, num_pages=400, page_size=page, num_kv_heads=kv_heads, head_dim=dim,
        dtype=dtype, device=torch.device("cpu"),
    )  # fmt: skip
    pool.k.normal_()
    pool.v.normal_()
    lens = [random.randint(1, 70) for _ in range(6)]
    free = random.sample(range(1, 400), 399)
    tables = [[free.pop() for _ in range(-(-n // page))] for n in lens]
    out_slots = torch.tensor(
        [t[(n - 1) // page] * page + (n - 1) % page for t, n in zip(tables, lens)]
    )
    b = len(lens)
    qkv = torch.randn(b, heads + 2 * kv_heads, dim).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    batch = ForwardBatch(
        is_decode=True, input_ids=torch.zeros(b, dtype=torch.long),
        positions=torch.zeros(b, dtype=torch.long), out_slots=out_slots, seq_lens=lens,
        extend_lens=[1] * b, page_tables=tables, logits_indices=torch.arange(b), page_size=page,
    )  # fmt: skip
    backend = TorchAttentionBackend(heads, kv_heads, dim, "cpu", dtype)
    assert backend._native is not None
    backend.prepare(batch, pool)
    got = backend.forward(0, q, k, v, batch, pool)
    # the new K/V rows landed in their slots
    assert torch.equal(pool.k_flat(0)[out_slots], k) and torch.equal(pool.v_flat(0)[out_slots], v)
    # reference: fp32 attention over each sequence's slots
    group = heads // kv_heads
    for i, (table, n) in enumerate(zip(tables, lens)):
        slots = torch.tensor([table[t // page] * page + t % page for t in range(n)])
        keys = pool.k_flat(0)[slots].float().repeat_interleave(group, dim=1)  # [n, H, D]
        vals = pool.v_flat(0)[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), keys) * dim**-0.5
        want = torch.einsum("hn,nhd->hd", scores.softmax(-1), vals).reshape(-1)
        assert rel_err(got[i], want) < (TOL if dtype == torch.bfloat16 else 1e-5), (i, n)


def test_rope_in_place_matches_transformers_form() -> None:
    from pdcore.model.rope import RotaryTable, apply_rotary

    heads, kv_heads, dim = 9, 3, 64
    table = RotaryTable(dim, 10000.0, None, 256, torch.bfloat16, torch.device("cpu"))
    positions = torch.tensor([0, 7, 200, 31])
    qkv = bf16(4, (heads + 2 * kv_heads) * dim)
    want = apply_rotary(
        qkv[:, : (heads + kv_heads) * dim].view(4, -1, dim), *table.lookup(positions)
    )
    got = qkv.clone()
    BF16.rope_(got, heads + kv_heads, dim, table.cos, table.sin, positions)
    assert torch.equal(got[:, : (heads + kv_heads) * dim].view(4, -1, dim), want)
    assert torch.equal(got[:, (heads + kv_heads) * dim :], qkv[:, (heads + kv_heads) * dim :])


def test_skinny_gemm_adds_bias_before_rounding() -> None:
    """Exact: 256 + 1 (+ bias 1) is 258, which bf16 holds; rounding 257 to bf16 first
    (256) and then adding 1 would give 256 again."""
    m, n, k = 3, 32, 16
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    w[:, 0], w[:, 1] = 256, 1
    x, bias = torch.ones(m, k, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)
    y = BF16.gemm(x, native_cpu.pack(w), n, bias)
    assert torch.equal(y, torch.full((m, n), 258.0, dtype=torch.bfloat16))


def test_fp32_fused_ops_match_torch() -> None:
    from pdcore.model.rope import RotaryTable, apply_rotary

    h, eps = 576, 1e-5
    x, delta, w = torch.randn(5, h), torch.randn(5, h), torch.randn(h)
    want = F.rms_norm(x + delta, (h,), w, eps)
    residual = x.clone()
    got = F32.rms_norm(residual, w, eps, delta=delta)
    assert torch.equal(residual, x + delta) and rel_err(got, want) < 1e-6
    gate_up = torch.randn(3, 2 * 64) * 4
    want = F.silu(gate_up[:, :64]) * gate_up[:, 64:]
    assert rel_err(F32.silu_mul(gate_up), want) < 1e-6
    table = RotaryTable(64, 10000.0, None, 64, torch.float32, torch.device("cpu"))
    positions = torch.tensor([0, 5, 63])
    qkv = torch.randn(3, 5 * 64)
    want = apply_rotary(qkv[:, : 4 * 64].view(3, 4, 64), *table.lookup(positions))
    F32.rope_(qkv, 4, 64, table.cos, table.sin, positions)
    assert rel_err(qkv[:, : 4 * 64].view(3, 4, 64), want) < 1e-6
