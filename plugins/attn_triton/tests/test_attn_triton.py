"""The triton backend against the torch backend, in Triton's CPU interpreter.

TRITON_INTERPRET=1 is set before the kernels are imported (Triton decides per kernel, when
it is decorated), so the kernels run as numpy on CPU tensors: slow, so shapes stay tiny,
and fp32 only (the interpreter computes bf16 wrongly). Inputs are fresh random numbers each
run; a failure prints the seed that reproduces it.
"""

from __future__ import annotations

import os
import random

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import torch  # noqa: E402
from attn_triton.backend import TritonAttentionBackend  # noqa: E402

from pdcore.engine.attention_torch import TorchAttentionBackend  # noqa: E402
from pdcore.engine.cuda_graph import capture_sizes, supports_cuda_graph  # noqa: E402
from pdcore.model.forward_batch import ForwardBatch  # noqa: E402
from pdcore.model.kv_pool import KVPool  # noqa: E402

HEAD_DIM = 16


@pytest.fixture
def seed() -> int:
    value = random.randrange(2**31)
    torch.manual_seed(value)
    return value


def _setup(group: int, page_size: int, seq_lens: list[int], kv_heads: int = 2):
    """A random pool and a random, scattered page table per sequence."""
    num_pages = sum(-(-n // page_size) for n in seq_lens) + 4  # a few pages nobody owns
    pool = KVPool(1, num_pages, page_size, kv_heads, HEAD_DIM, torch.float32, torch.device("cpu"))
    pool.k[:, 1:].normal_()
    pool.v[:, 1:].normal_()
    free = torch.randperm(num_pages - 1).add(1).tolist()
    tables = []
    for length in seq_lens:
        n = -(-length // page_size)
        tables.append([free.pop() for _ in range(n)])
    heads = kv_heads * group
    return pool, tables, heads, kv_heads


def _batch(is_decode, seq_lens, extend_lens, tables, page_size) -> ForwardBatch:
    positions, slots = [], []
    for length, ext, table in zip(seq_lens, extend_lens, tables):
        for p in range(length - ext, length):
            positions.append(p)
            slots.append(table[p // page_size] * page_size + p % page_size)
    t = len(positions)
    return ForwardBatch(
        is_decode=is_decode,
        input_ids=torch.zeros(t, dtype=torch.long),
        positions=torch.tensor(positions),
        out_slots=torch.tensor(slots),
        seq_lens=list(seq_lens),
        extend_lens=list(extend_lens),
        page_tables=tables,
        logits_indices=torch.arange(len(seq_lens)),
        page_size=page_size,
    )


def _run(backend, pool, batch, q, k, v, prepare=True):
    pool = _clone_pool(pool)
    if prepare:
        backend.prepare(batch, pool)
    return backend.forward(0, q, k, v, batch, pool), pool


def _clone_pool(pool: KVPool) -> KVPool:
    copy = KVPool.__new__(KVPool)
    copy.__dict__.update(pool.__dict__)
    copy.k, copy.v = pool.k.clone(), pool.v.clone()
    return copy


def _qkv(tokens: int, heads: int, kv_heads: int):
    # q as a view of a wider tensor, as the model hands it (split of a fused projection).
    qk = torch.randn(tokens, heads + kv_heads, HEAD_DIM)
    q, k = qk.split([heads, kv_heads], dim=1)
    return q, k, torch.randn(tokens, kv_heads, HEAD_DIM)


def _compare(seed, is_decode, group, page_size, seq_lens, extend_lens, splits_target=None):
    pool, tables, heads, kv_heads = _setup(group, page_size, seq_lens)
    q, k, v = _qkv(sum(extend_lens), heads, kv_heads)
    ref = TorchAttentionBackend(heads, kv_heads, HEAD_DIM)
    tri = TritonAttentionBackend(heads, kv_heads, HEAD_DIM, "cpu", torch.float32)
    if splits_target is not None:
        tri.target_programs = splits_target
    b_ref = _batch(is_decode, seq_lens, extend_lens, tables, page_size)
    b_tri = _batch(is_decode, seq_lens, extend_lens, tables, page_size)
    want, pool_ref = _run(ref, pool, b_ref, q, k, v)
    got, pool_tri = _run(tri, pool, b_tri, q, k, v)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"seed {seed}: max abs error {err}"
    assert torch.equal(pool_ref.k, pool_tri.k) and torch.equal(pool_ref.v, pool_tri.v)
    return b_tri


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_matches_torch(seed, group, page_size):
    lens = [random.randint(1, 60) for _ in range(3)]
    batch = _compare(seed, True, group, page_size, lens, [1] * 3, splits_target=48)
    assert batch.attn_meta["num_splits"] > 1 or max(lens) <= 16  # the merge ran over splits


def test_decode_single_split_and_length_one(seed):
    _compare(seed, True, 4, 16, [1, 33], [1, 1], splits_target=1)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_extend_with_cached_prefix_matches_torch(seed, group, page_size):
    exts = [random.randint(1, 20) for _ in range(3)]
    prefixes = [0, random.randint(1, 40), random.randint(1, 40)]
    random.shuffle(prefixes)
    lens = [p + e for p, e in zip(prefixes, exts)]
    _compare(seed, False, group, page_size, lens, exts)


def test_decode_through_cuda_graph_buffers(seed):
    """Capture-time metadata, then replay-time rewrites of the same table, padding included:
    what a CUDA graph replays, run eagerly on CPU."""
    page_size, max_pages = 4, 20
    lens = [random.randint(1, 60) for _ in range(3)]
    pool, tables, heads, kv_heads = _setup(4, page_size, lens)
    q, k, v = _qkv(3, heads, kv_heads)
    ref = TorchAttentionBackend(heads, kv_heads, HEAD_DIM)
    want, _ = _run(ref, pool, _batch(True, lens, [1] * 3, tables, page_size), q, k, v)

    tri = TritonAttentionBackend(heads, kv_heads, HEAD_DIM, "cpu", torch.float32)
    tri.target_programs = 32
    tri.init_cuda_graph_state(max_bs=8, max_pages=max_pages)
    bs = 4
    captured = _batch(True, [1] * bs, [1] * bs, [[0]] * bs, page_size)
    tri.prepare_for_capture(bs, captured, pool)
    assert captured.attn_meta["num_splits"] > 1
    real = _batch(True, lens, [1] * 3, tables, page_size)
    tri.prepare_for_replay(bs, real, pool)
    # Padded inputs as the graph runner writes them: token rows 3.. go to slot 0.
    pad = lambda t: torch.cat([t, torch.zeros((1, *t.shape[1:]), dtype=t.dtype)])  # noqa: E731
    captured.out_slots = pad(real.out_slots)
    got, _ = _run(tri, pool, captured, pad(q), pad(k), pad(v), prepare=False)
    err = (got[:3] - want).abs().max().item()
    assert err < 1e-4, f"seed {seed}: max abs error {err}"
    assert torch.isfinite(got).all()  # the padding row too


def test_graph_helpers():
    assert capture_sizes(1) == [1]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(24) == [1, 2, 4, 8, 16, 24]
    tri = TritonAttentionBackend(4, 2, HEAD_DIM, "cpu", torch.float32)
    assert supports_cuda_graph(tri)
    assert not supports_cuda_graph(TorchAttentionBackend(4, 2, HEAD_DIM))


def test_registered_and_available():
    from pdcore.plugins import get_registry

    registry = get_registry("attention_backend")
    assert "triton" in registry.names()
    from attn_triton import check

    assert check() is None
