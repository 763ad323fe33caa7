"""Triton kernels for paged attention over pdcore's KV pool, and their launchers.

The pool of one layer is seen flat: K and V are [num_slots, kv_heads, head_dim] with slot =
page * page_size + offset. Each sequence's pages come from a per-step int32 metadata table
`meta` [B, cols]: decode rows are [seq_len, page_0, page_1, ...]; extend rows are
[seq_len, extend_len, q_start, page_0, ...]. Tokens are gathered slot by slot, so any page
size works (1 included). Softmax runs online in fp32 with exp2; matmuls accumulate in fp32.

Decode is flash-decoding: grid (batch, kv_head, split). Each program takes the whole GQA
group of query heads as the M side of one tl.dot (padded to 16 rows), walks its slice of
the sequence and writes a normalised partial output plus its log-sum-exp; a second kernel
merges the splits. The grid depends only on (batch, num_splits), never on sequence lengths,
so a captured CUDA graph replays it for any lengths written into the same `meta` buffer.

Extend (prefill with or without a cached prefix) is causal flash attention over a ragged
batch: grid (head, query block, sequence); every key, prefix or new, is read from the pool
(the new tokens' K/V are written there first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    Meta,
    PartOut,
    PartLse,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_meta,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    sm_scale_log2,
    page_size,
    num_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = Meta + b.to(tl.int64) * stride_meta
    seq_len = tl.load(row)
    blocks_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < GROUP
    dmask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    q_ptrs = Q + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=hmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        page = tl.load(row + 1 + offs_n // page_size, mask=nmask, other=0)
        slot = page.to(tl.int64) * page_size + offs_n % page_size
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], kv_mask, 0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], kv_mask, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # An empty split (start >= end) leaves l_i == 0: it stores lse = -inf and weighs nothing.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    base_o = PartOut + b.to(tl.int64) * stride_pb + split * stride_ps
    o_ptrs = base_o + heads[:, None] * stride_ph + offs_d[None, :]
    tl.store(o_ptrs, out, mask=hmask[:, None] & dmask[None, :])
    tl.store(PartLse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _decode_merge_kernel(
    PartOut,
    PartLse,
    Out,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ot,
    stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_splits
    dmask = offs_d < HEAD_DIM
    lse = tl.load(PartLse + b.to(tl.int64) * stride_lb + h * stride_lh + offs_s, smask, -1e30)
    lse = tl.where(smask, lse, float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    base = PartOut + b.to(tl.int64) * stride_pb + h * stride_ph
    part = tl.load(
        base + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=smask[:, None] & dmask[None, :],
        other=0.0,
    )
    den = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    o_ptrs = Out + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=dmask)


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    Meta,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_meta,
    sm_scale_log2,
    page_size,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    mb = tl.program_id(1)
    b = tl.program_id(2)
    row = Meta + b.to(tl.int64) * stride_meta
    seq_len = tl.load(row)
    ext = tl.load(row + 1)
    q_start = tl.load(row + 2)
    prefix = seq_len - ext
    kvh = h // GROUP

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < ext
    dmask = offs_d < HEAD_DIM
    q_pos = prefix + offs_m
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=mmask[:, None] & dmask[None, :],
        other=0.0,
    )
    # Keys up to the last query of this block (causal); nothing for blocks past the chunk.
    end = tl.minimum(seq_len, prefix + (mb + 1) * BLOCK_M)
    end = tl.where(mb * BLOCK_M < ext, end, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        page = tl.load(row + 3 + offs_n // page_size, mask=nmask, other=0)
        slot = page.to(tl.int64) * page_size + offs_n % page_size
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], kv_mask, 0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        visible = nmask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        # Key 0 is visible to every real query row, so m_new is finite after the first block.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], kv_mask, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


_LOG2E = 1.4426950408889634


class KernelConfig:
    """Block sizes and warps; small blocks in the interpreter (it runs numpy per program)."""

    def __init__(self, head_dim: int, dtype: torch.dtype, interpret: bool) -> None:
        self.head_dim = head_dim
        self.block_d = max(16, triton.next_power_of_2(head_dim))
        self.precision = "ieee" if dtype == torch.float32 else "tf32"
        wide = dtype.itemsize >= 4 or self.block_d > 128
        # 2 pipeline stages: q + double-buffered K/V tiles stay under the ~99 KB of shared
        # memory of sm_86/sm_89 cards (Triton's default of 3 may not; unverified on a GPU)
        self.stages = 2
        if interpret:
            self.decode_block_n, self.block_m, self.block_n, self.warps = 16, 16, 16, 1
        elif wide:
            self.decode_block_n, self.block_m, self.block_n, self.warps = 32, 32, 32, 4
        else:
            self.decode_block_n, self.block_m, self.block_n, self.warps = 64, 64, 64, 4


def _check_last_dim(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("attention tensors need a contiguous head_dim")


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [slots, KVH, D]
    v_cache: torch.Tensor,
    meta: torch.Tensor,  # int32 [B, 1 + pages]: seq_len, page table
    page_size: int,
    num_splits: int,
    scale: float,
    cfg: KernelConfig,
) -> torch.Tensor:
    """Attention of one new query per sequence over its paged KV; returns [B, H, D]."""
    _check_last_dim(q, k_cache, v_cache)
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    part = torch.empty((batch, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        meta,
        part,
        lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        meta.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        scale * _LOG2E,
        page_size,
        num_splits,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=cfg.block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=cfg.decode_block_n,
        PRECISION=cfg.precision,
        num_warps=cfg.warps,
    )
    _decode_merge_kernel[(batch, heads)](
        part,
        lse,
        out,
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=cfg.block_d,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        num_warps=1 if cfg.warps == 1 else 2,
    )
    return out


def extend_attention(
    q: torch.Tensor,  # [T, H, D]: the new tokens of every sequence, back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: torch.Tensor,  # int32 [B, 3 + pages]: seq_len, extend_len, q_start, page table
    page_size: int,
    max_extend: int,
    scale: float,
    cfg: KernelConfig,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its prefix and themselves."""
    _check_last_dim(q, k_cache, v_cache)
    tokens, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    grid = (heads, triton.cdiv(max_extend, cfg.block_m), meta.shape[0])
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        meta.stride(0),
        scale * _LOG2E,
        page_size,
        GROUP=heads // kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=cfg.block_d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        PRECISION=cfg.precision,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return out
