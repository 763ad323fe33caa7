"""Our CPU kernels, every ISA variant this CPU can run, against torch references (fresh
random inputs each run). Variants the CPU lacks are skipped with the missing features named;
the NEON variant is at least cross-compiled where an aarch64 compiler is installed.

bf16 keeps 8 bits of mantissa, so bf16 results are compared with a relative tolerance of a
few bf16 ulps (2^-8 = 0.4%) against fp32 math on the same bf16 inputs; fp32 results with
fp32 tolerances."""

from __future__ import annotations

import platform
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from pdcore.engine.attention_torch import TorchAttentionBackend
from pdcore.model import native_cpu
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.rope import RotaryTable, apply_rotary

TOL = 1.5e-2
DTYPES = [torch.bfloat16, torch.float32]


def _isa_param(name: str):
    reason = ""
    if name not in native_cpu.supported_variants():
        reason = f"this CPU ({platform.machine()}) lacks {native_cpu._missing(name)}"
    elif shutil.which("cc") is None and shutil.which("gcc") is None:
        reason = "no C compiler"
    return pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason), id=name)


ISAS = [_isa_param(name) for name in native_cpu.VARIANTS]


def kern(isa: str, dtype: torch.dtype) -> native_cpu.Kernels:
    k = native_cpu.kernels(dtype, isa)
    assert k is not None, f"{isa} is supported here but failed to build (see the log)"
    return k


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def tol(dtype: torch.dtype) -> float:
    return TOL if dtype == torch.bfloat16 else 2e-6


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(torch.bfloat16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_skinny_gemm_every_row_count_and_ragged_shapes(isa: str, dtype: torch.dtype) -> None:
    """M = 1..32 (every tile height and remainder), N not a multiple of 16, K odd, bias."""
    k_ = kern(isa, dtype)
    for n, k in [(96, 64), (80, 577), (17, 33), (5, 1), (200, 1536)]:
        w, bias = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
        packed = native_cpu.pack(w)
        for m in range(1, 33):
            x = torch.randn(m, k).to(dtype)
            y = k_.gemm(x, packed, n, bias if m % 2 else None)
            want = x.float() @ w.float().T + (bias.float() if m % 2 else 0)
            assert y.shape == (m, n) and y.dtype == dtype
            assert rel_err(y, want) < tol(dtype) * (1 + k / 1000), (n, k, m)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 8, 13, 32])
def test_skinny_gemm_strided_rows(isa: str, m: int) -> None:
    n, k = 80, 576
    w, x = bf16(n, k), bf16(m, k)
    y = kern(isa, torch.bfloat16).gemm(x, native_cpu.pack(w), n)
    wide = bf16(m, k + 32)  # a slice of a wider activation gives the same answer
    wide[:, :k] = x
    assert torch.equal(kern(isa, torch.bfloat16).gemm(wide[:, :k], native_cpu.pack(w), n), y)


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_gemm_with_bf16_weights(isa: str) -> None:
    """fp32 compute on bf16-stored weights (widened in registers): fp32 accuracy against
    the same bf16 weights in fp32."""
    for m, n, k in [(1, 96, 64), (13, 81, 575), (32, 576, 1536)]:
        w, x, bias = torch.randn(n, k).to(torch.bfloat16), torch.randn(m, k), torch.randn(n)
        y = kern(isa, torch.float32).gemm(x, native_cpu.pack(w), n, bias)
        assert y.dtype == torch.float32
        assert rel_err(y, x @ w.float().T + bias) < 1e-5


@pytest.mark.parametrize("isa", ISAS)
def test_skinny_gemm_adds_bias_before_rounding(isa: str) -> None:
    """Exact: 256 + 1 (+ bias 1) is 258, which bf16 holds; rounding 257 to bf16 first
    (256) and then adding 1 would give 256 again."""
    m, n, k = 3, 32, 16
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    w[:, 0], w[:, 1] = 256, 1
    x, bias = torch.ones(m, k, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)
    y = kern(isa, torch.bfloat16).gemm(x, native_cpu.pack(w), n, bias)
    assert torch.equal(y, torch.full((m, n), 258.0, dtype=torch.bfloat16))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(isa: str, dtype: torch.dtype) -> None:
    h, eps = 576, 1e-5
    x, delta, w = (torch.randn(*s).to(dtype) for s in [(5, h), (5, h), (h,)])

    def ref(v: torch.Tensor) -> torch.Tensor:  # transformers' LlamaRMSNorm, in fp32
        v = v.float()
        return w.float() * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps))

    k_ = kern(isa, dtype)
    assert rel_err(k_.rms_norm(x.clone(), w, eps), ref(x)) < tol(dtype)
    residual = x.clone()
    out = k_.rms_norm(residual, w, eps, delta=delta)
    assert torch.equal(residual, x + delta)  # the add in the storage type, written back
    assert rel_err(out, ref(x + delta)) < tol(dtype)
    if dtype == torch.float32:
        assert rel_err(out, F.rms_norm(x + delta, (h,), w, eps)) < 1e-6


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(isa: str, dtype: torch.dtype) -> None:
    gate_up = (torch.randn(7, 2 * 1536) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])  # exp's clamps
    want = F.silu(gate_up[:, :1536].float()) * gate_up[:, 1536:].float()
    assert rel_err(kern(isa, dtype).silu_mul(gate_up), want) < tol(dtype) / 2


@pytest.mark.parametrize("isa", ISAS)
def test_rope_in_place_matches_transformers_form(isa: str) -> None:
    """bf16: bit-exact against the torch path (same roundings, op by op)."""
    heads, kv_heads, dim = 9, 3, 64
    table = RotaryTable(dim, 10000.0, None, 256, torch.bfloat16, torch.device("cpu"))
    positions = torch.tensor([0, 7, 200, 31])
    qkv = bf16(4, (heads + 2 * kv_heads) * dim)
    want = apply_rotary(
        qkv[:, : (heads + kv_heads) * dim].view(4, -1, dim), *table.lookup(positions)
    )
    got = qkv.clone()
    kern(isa, torch.bfloat16).rope_(got, heads + kv_heads, dim, table.cos, table.sin, positions)
    assert torch.equal(got[:, : (heads + kv_heads) * dim].view(4, -1, dim), want)
    assert torch.equal(got[:, (heads + kv_heads) * dim :], qkv[:, (heads + kv_heads) * dim :])


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_rope_matches_torch(isa: str) -> None:
    table = RotaryTable(128, 10000.0, None, 64, torch.float32, torch.device("cpu"))
    positions = torch.tensor([0, 5, 63])
    qkv = torch.randn(3, 5 * 128)
    want = apply_rotary(qkv[:, : 4 * 128].view(3, 4, 128), *table.lookup(positions))
    kern(isa, torch.float32).rope_(qkv, 4, 128, table.cos, table.sin, positions)
    assert rel_err(qkv[:, : 4 * 128].view(3, 4, 128), want) < 1e-6


def _random_pool(kv_heads: int, dim: int, page: int, dtype: torch.dtype, pages: int) -> KVPool:
    pool = KVPool(
        num_layers=1, num_pages=pages, page_size=page, num_kv_heads=kv_heads, head_dim=dim,
        dtype=dtype, device=torch.device("cpu"),
    )  # fmt: skip
    pool.k.normal_()
    pool.v.normal_()
    return pool


def _paged_case(
    heads: int,
    kv_heads: int,
    dim: int,
    page: int,
    dtype: torch.dtype,
    lens: list[int] | None = None,
):
    lens = lens or [1, 2, 15, 16, 17, *(random.randint(1, 70) for _ in range(4))]
    pages = max(400, sum(-(-n // page) for n in lens) + 1)
    pool = _random_pool(kv_heads, dim, page, dtype, pages)
    free = random.sample(range(1, pages), pages - 1)
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
    return pool, lens, tables, out_slots, batch, q, k, v


def _check_attention(got, pool, lens, tables, out_slots, q, k, v, page, dtype) -> None:
    # the new K/V rows landed in their slots
    assert torch.equal(pool.k_flat(0)[out_slots], k) and torch.equal(pool.v_flat(0)[out_slots], v)
    heads, dim = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    for i, (table, n) in enumerate(zip(tables, lens)):  # fp32 attention over its slots
        slots = torch.tensor([table[t // page] * page + t % page for t in range(n)])
        keys = pool.k_flat(0)[slots].float().repeat_interleave(group, dim=1)  # [n, H, D]
        vals = pool.v_flat(0)[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), keys) * dim**-0.5
        want = torch.einsum("hn,nhd->hd", scores.softmax(-1), vals).reshape(-1)
        assert rel_err(got[i], want) < (TOL if dtype == torch.bfloat16 else 1e-5), (i, n)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,dim,page",
    [(9, 3, 64, 16), (8, 8, 64, 1), (32, 8, 128, 4), (12, 2, 96, 16), (4, 1, 256, 4)],
)
def test_decode_attention_matches_reference(
    isa: str, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, page: int
) -> None:
    """Page sizes 1/4/16, GQA ratios 1/3/4/6/4, head_dim 64/96/128/256."""
    pool, lens, tables, out_slots, batch, q, k, v = _paged_case(heads, kv_heads, dim, page, dtype)
    backend = TorchAttentionBackend(heads, kv_heads, dim, "cpu", dtype)
    backend.prepare(batch, pool)  # builds the slot table the kernel reads
    meta = batch.attn_meta
    got = kern(isa, dtype).decode_attention(
        q, k, v, pool.k_flat(0), pool.v_flat(0), meta["slots"], out_slots,
        meta["lens"], dim**-0.5,
    )  # fmt: skip
    _check_attention(got, pool, lens, tables, out_slots, q, k, v, page, dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[1000], [31, 300], [17], [40, 1, 97], [129] * 5])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_decode_attention_long_and_short_sequences(
    isa: str, dtype: torch.dtype, lens: list[int], threads: int
) -> None:
    """Beyond the mixed batch above: a 1000-token sequence, lengths that are no multiple
    of the kernel's token blocks, a 1-token sequence beside long ones, fewer (sequence, KV
    head) items than threads (1 sequence x 3 KV heads on 4 threads) and more -- on 1 to 4
    threads."""
    heads, kv_heads, dim, page = 9, 3, 64, 16
    pool, lens, tables, out_slots, batch, q, k, v = _paged_case(
        heads, kv_heads, dim, page, dtype, lens
    )
    backend = TorchAttentionBackend(heads, kv_heads, dim, "cpu", dtype)
    backend.prepare(batch, pool)
    meta = batch.attn_meta
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kern(isa, dtype).decode_attention(
            q, k, v, pool.k_flat(0), pool.v_flat(0), meta["slots"], out_slots,
            meta["lens"], dim**-0.5,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    _check_attention(got, pool, lens, tables, out_slots, q, k, v, page, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_backend_uses_the_picked_variant(dtype: torch.dtype) -> None:
    if native_cpu.kernels(dtype) is None:
        pytest.skip(f"no kernels here: {native_cpu.describe()}")
    heads, kv_heads, dim, page = 9, 3, 64, 16
    pool, lens, tables, out_slots, batch, q, k, v = _paged_case(heads, kv_heads, dim, page, dtype)
    backend = TorchAttentionBackend(heads, kv_heads, dim, "cpu", dtype)
    assert backend._native is not None
    backend.prepare(batch, pool)
    got = backend.forward(0, q, k, v, batch, pool)
    _check_attention(got, pool, lens, tables, out_slots, q, k, v, page, dtype)


def _extend_case(heads: int, kv_heads: int, dim: int, page: int, dtype: torch.dtype):
    """A prefill batch: sequences with and without a cached prefix (already in the pool),
    new tokens not multiples of the kernel's blocks, pages scattered over the pool."""
    pool = _random_pool(kv_heads, dim, page, dtype, 600)
    specs = [(0, 1), (0, 70), (33, 5), (130, 97), (random.randint(1, 90), random.randint(1, 90))]
    lens = [p + e for p, e in specs]
    free = random.sample(range(1, 600), 599)
    tables = [[free.pop() for _ in range(-(-n // page))] for n in lens]
    new_slots = [
        t[i // page] * page + i % page for t, (p, e) in zip(tables, specs) for i in range(p, p + e)
    ]
    total = sum(e for _, e in specs)
    qkv = torch.randn(total, heads + 2 * kv_heads, dim).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    batch = ForwardBatch(
        is_decode=False, input_ids=torch.zeros(total, dtype=torch.long),
        positions=torch.tensor([i for p, e in specs for i in range(p, p + e)]),
        out_slots=torch.tensor(new_slots), seq_lens=lens, extend_lens=[e for _, e in specs],
        page_tables=tables, logits_indices=torch.arange(len(specs)), page_size=page,
    )  # fmt: skip
    return pool, specs, tables, batch, q, k, v


def _check_extend(got, pool, specs, tables, q, page, dtype) -> None:
    heads, dim = q.shape[1], q.shape[2]
    group = heads // pool.k.shape[-2]
    row = 0
    for (prefix, ext), table in zip(specs, tables):  # fp32 causal attention over its slots
        n = prefix + ext
        slots = torch.tensor([table[t // page] * page + t % page for t in range(n)])
        keys = pool.k_flat(0)[slots].double().repeat_interleave(group, dim=1)  # [n, H, D]
        vals = pool.v_flat(0)[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("rhd,nhd->hrn", q[row : row + ext].double(), keys) * dim**-0.5
        future = torch.arange(n)[None, :] > torch.arange(prefix, n)[:, None]
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        want = torch.einsum("hrn,nhd->rhd", probs, vals).reshape(ext, -1)
        tol_ = TOL if dtype == torch.bfloat16 else 1e-5
        assert rel_err(got[row : row + ext], want) < tol_, (prefix, ext)
        row += ext


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,dim,page", [(9, 3, 64, 16), (8, 8, 64, 1), (12, 2, 96, 4), (4, 1, 256, 16)]
)
def test_extend_attention_matches_reference(
    isa: str, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, page: int
) -> None:
    """Prefill attention (kernels/extend_attention.c): causal within the new tokens, the
    whole cached prefix visible, K/V read through the page table."""
    pool, specs, tables, batch, q, k, v = _extend_case(heads, kv_heads, dim, page, dtype)
    pool.k_flat(0).index_copy_(0, batch.out_slots, k)
    pool.v_flat(0).index_copy_(0, batch.out_slots, v)
    backend = TorchAttentionBackend(heads, kv_heads, dim, "cpu", dtype)
    backend.prepare(batch, pool)  # the slot table and per-sequence rows the kernel reads
    meta = batch.attn_meta
    got = kern(isa, dtype).extend_attention(
        q, pool.k_flat(0), pool.v_flat(0), meta["slots"], meta["seqs"], dim**-0.5
    )
    _check_extend(got, pool, specs, tables, q, page, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_backend_prefills_in_c(dtype: torch.dtype) -> None:
    """The backend writes the batch's K/V rows into the pool, then attends from it in C."""
    if native_cpu.kernels(dtype) is None:
        pytest.skip(f"no kernels here: {native_cpu.describe()}")
    pool, specs, tables, batch, q, k, v = _extend_case(9, 3, 64, 16, dtype)
    backend = TorchAttentionBackend(9, 3, 64, "cpu", dtype)
    backend.prepare(batch, pool)
    got = backend.forward(0, q, k, v, batch, pool)
    assert torch.equal(pool.k_flat(0)[batch.out_slots], k)
    assert torch.equal(pool.v_flat(0)[batch.out_slots], v)
    _check_extend(got, pool, specs, tables, q, 16, dtype)


def test_variant_choice_env(monkeypatch: pytest.MonkeyPatch) -> None:
    supported = native_cpu.supported_variants()
    monkeypatch.setenv("PDCORE_DISABLE_NATIVE_KERNELS", "1")
    assert native_cpu.pick_variant()[0] is None
    monkeypatch.delenv("PDCORE_DISABLE_NATIVE_KERNELS")
    assert native_cpu.pick_variant()[0] == (supported[0] if supported else None)
    monkeypatch.setenv("PDCORE_CPU_ISA", "nonsense")
    isa, why = native_cpu.pick_variant()
    assert isa is None and "nonsense" in why
    for name in native_cpu.VARIANTS:
        monkeypatch.setenv("PDCORE_CPU_ISA", name)
        isa, why = native_cpu.pick_variant()
        assert (isa == name) == (name in supported), why


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 variants")
@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512bf16"])
def test_x86_variants_compile(isa: str, tmp_path) -> None:
    """Every x86 variant builds here even where the CPU cannot run it."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    native_cpu.compile_variant(isa, tmp_path / f"{isa}.so")
    assert b"pdcore_f32_bf16w_skinny_gemm" in (tmp_path / f"{isa}.so").read_bytes()


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="no aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)",
)
def test_neon_variant_cross_compiles(tmp_path) -> None:
    """The NEON build compiles and exports every kernel (it runs on ARM machines only)."""
    out = tmp_path / "neon.so"
    native_cpu.compile_variant("neon", out, cc="aarch64-linux-gnu-gcc")
    assert out.read_bytes()[:4] == b"\x7fELF" and out.read_bytes()[18] == 183  # EM_AARCH64
    symbols = out.read_bytes()
    for kind in ("bf16", "f32"):
        for fn in ("skinny_gemm", "rms_norm", "silu_mul", "rope", "decode_attention"):
            assert f"pdcore_{kind}_{fn}".encode() in symbols
    assert b"pdcore_f32_bf16w_skinny_gemm" in symbols
