"""Multi-head latent attention (DeepSeek-V2/V3) over the "mla" KV pool, in torch.

Per token the pool keeps one entry of kv_lora_rank + rope_dim values: the normed latent
c = RMSNorm(W_DKV x) and the RoPE'd key part shared by all heads (pdcore.model.kv_pool's
MLAKVPool). Per-head keys and values are never stored:

- extend (prefill): keys and values are expanded from the latents, k_nope = W_UK c,
  v = W_UV c, for the whole sequence (prefix read back from the pool), as transformers
  computes them;
- decode: the absorbed form. W_UK is folded into the query (q_lat = q_nope W_UK), so each
  head scores [q_lat, q_pe] . [c, k_pe] against the cached entries directly -- one shared
  KV "head", MQA-style -- and the attention output, a mix of latents, goes through W_UV
  afterwards. A decode step reads kv_lora_rank + rope_dim values per cached token instead
  of heads x (k + v) dims.

DeepSeek-V3 checkpoints lay the rope dims out interleaved (x0, x1), (x2, x3), ...; the rows
of those projections are permuted once at load to the half-split layout, where the usual
rotate-half RoPE gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdcore.model.attention import AttentionBackend
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.linear import Linear
from pdcore.model.moe import ToDevice
from pdcore.model.rope import apply_rotary

# transformers builds q_a_layernorm and kv_a_layernorm without passing rms_norm_eps
LORA_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLADims:
    num_heads: int
    q_lora_rank: int | None  # None: q comes from one q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def entry_dim(self) -> int:
        """Values per token per layer in the pool."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def deinterleave_rows(weight: torch.Tensor, rope_dim: int, group: int) -> torch.Tensor:
    """Reorder the last `rope_dim` rows of every `group` rows from interleaved pairs
    (x0, x1, x2, x3, ...) to halves (x0, x2, ..., x1, x3, ...)."""
    w = weight.view(-1, group, *weight.shape[1:])
    rope = w[:, group - rope_dim :]
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    return torch.cat([w[:, : group - rope_dim], rope[:, perm]], dim=1).reshape(weight.shape)


class MLAttention:
    """One layer's MLA weights and forward (callable as a pdcore.model.decoder Attention)."""

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        prefix: str,
        dims: MLADims,
        scale: float,
        rope_interleave: bool,
        to: ToDevice,
        head_start: int = 0,
    ) -> None:
        """`dims.num_heads`: this rank's heads, from global head `head_start` (TP: the
        rows of q / q_b and kv_b and the columns of o_proj of those heads; the latent
        projection, its norm and so the cached entries are the same on every rank)."""
        d = dims
        self.dims = d
        self.scale = scale
        attn = prefix + "self_attn."

        def rows(name: str, group: int) -> torch.Tensor:
            w = state[attn + name]
            return deinterleave_rows(w, d.qk_rope_head_dim, group) if rope_interleave else w

        def heads(w: torch.Tensor, per_head: int, dim: int = 0) -> torch.Tensor:
            return w.narrow(dim, head_start * per_head, d.num_heads * per_head)

        kv_a = rows("kv_a_proj_with_mqa.weight", d.entry_dim)
        if d.q_lora_rank is None:
            first = heads(rows("q_proj.weight", d.qk_head_dim), d.qk_head_dim)
            self.q_a_norm = None
            self.q_b = None
        else:
            first = state[attn + "q_a_proj.weight"]
            self.q_a_norm = to(state[attn + "q_a_layernorm.weight"])
            self.q_b = Linear(to(heads(rows("q_b_proj.weight", d.qk_head_dim), d.qk_head_dim)))
        # Both projections read the same normed hidden state: one matmul.
        self.fused_a = Linear(to(torch.cat([first, kv_a])))
        self.split_a = [first.shape[0], d.entry_dim]
        self.kv_norm = to(state[attn + "kv_a_layernorm.weight"])
        # [heads * (nope + v), kv_lora_rank]
        kv_b = heads(state[attn + "kv_b_proj.weight"], d.qk_nope_head_dim + d.v_head_dim)
        self.kv_b = Linear(to(kv_b))
        per_head = kv_b.view(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        self.w_uk = to(per_head[:, : d.qk_nope_head_dim])  # [H, nope, c]
        self.w_uv_t = to(per_head[:, d.qk_nope_head_dim :].transpose(1, 2))  # [H, c, v]
        self.o_proj = Linear(to(heads(state[attn + "o_proj.weight"], d.v_head_dim, dim=1)))
        if attn + "kv_a_proj_with_mqa.bias" in state or attn + "o_proj.bias" in state:
            raise ValueError("MLA with attention_bias is not supported")

    def __call__(
        self,
        layer: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        pool: KVPool,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        d, t = self.dims, x.shape[0]
        first, ckv = self.fused_a(x).split(self.split_a, dim=-1)
        if self.q_b is not None:
            assert self.q_a_norm is not None
            first = self.q_b(F.rms_norm(first, (first.shape[-1],), self.q_a_norm, LORA_NORM_EPS))
        q = first.view(t, d.num_heads, d.qk_head_dim)
        q_nope, q_pe = q.split([d.qk_nope_head_dim, d.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin)
        latent = F.rms_norm(
            ckv[:, : d.kv_lora_rank], (d.kv_lora_rank,), self.kv_norm, LORA_NORM_EPS
        )
        k_pe = apply_rotary(ckv[:, d.kv_lora_rank :].view(t, 1, -1), cos, sin).view(t, -1)
        entry = torch.cat([latent, k_pe], dim=-1)
        cache = pool.k_flat(layer)  # [slots, 1, entry_dim]
        cache.index_copy_(0, batch.out_slots, entry.unsqueeze(1))
        if batch.is_decode:
            out = self._decode(q_nope, q_pe, cache, batch)
        else:
            out = self._extend(torch.cat([q_nope, q_pe], dim=-1), entry, cache, batch)
        return self.o_proj(out)

    def _decode(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        d, b = self.dims, q_nope.shape[0]
        meta = batch.attn_meta["mla"]
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [B, H, c]
        queries = torch.cat([q_lat, q_pe], dim=-1).unsqueeze(1)  # [B, 1, H, c + rope]
        entries = cache.index_select(0, meta.index).view(b, 1, meta.max_len, d.entry_dim)
        out = F.scaled_dot_product_attention(
            queries,
            entries,
            entries[..., : d.kv_lora_rank],
            attn_mask=meta.mask,
            scale=self.scale,
        )  # [B, 1, H, c]: per head, a mix of latents
        out = torch.bmm(out.squeeze(1).transpose(0, 1), self.w_uv_t)  # [H, B, v]
        return out.transpose(0, 1).reshape(b, d.num_heads * d.v_head_dim)

    def _extend(
        self, q: torch.Tensor, entry: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        d = self.dims
        outputs = []
        for start, ext, slots, mask in batch.attn_meta["mla"].seqs:
            lat = entry[start : start + ext] if slots is None else cache.index_select(0, slots)
            lat = lat.view(-1, d.entry_dim)
            s = lat.shape[0]
            kv = self.kv_b(lat[:, : d.kv_lora_rank]).view(s, d.num_heads, -1)
            k_nope, v = kv.split([d.qk_nope_head_dim, d.v_head_dim], dim=-1)
            k_pe = lat[:, None, d.kv_lora_rank :].expand(s, d.num_heads, d.qk_rope_head_dim)
            k = torch.cat([k_nope, k_pe], dim=-1)
            qi = q[start : start + ext].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            ki, vi = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=self.scale
            )
            outputs.append(out.squeeze(0).transpose(0, 1).reshape(ext, -1))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


@dataclass
class _DecodeMeta:
    index: torch.Tensor  # [B * max_len] flat slots (padding -> slot 0 of the padding page)
    max_len: int
    mask: torch.Tensor | None  # [B, 1, 1, max_len] or None when every row is full


@dataclass
class _ExtendMeta:
    # per sequence: (first row, new tokens, slots of the whole sequence or None when it
    # has no prefix, mask [new, seq] or None for plain causal)
    seqs: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]


def prepare_mla(batch: ForwardBatch, device: torch.device) -> None:
    """Build the step's gather indices and masks once (batch.attn_meta["mla"])."""
    ps = batch.page_size
    if batch.is_decode:
        max_len = max(batch.seq_lens)
        max_pages = (max_len + ps - 1) // ps
        table = torch.zeros((batch.num_seqs, max_pages), dtype=torch.long)
        for i, pages in enumerate(batch.page_tables):
            n = min(len(pages), max_pages)
            table[i, :n] = torch.tensor(pages[:n], dtype=torch.long)
        cols = torch.arange(max_len)
        valid = cols[None, :] < torch.tensor(batch.seq_lens, dtype=torch.long)[:, None]
        slots = torch.where(valid, table[:, cols // ps] * ps + cols % ps, 0)
        mask = None if bool(valid.all()) else valid[:, None, None, :].to(device)
        batch.attn_meta["mla"] = _DecodeMeta(slots.view(-1).to(device), max_len, mask)
        return
    seqs: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []
    start = 0
    for pages, seq_len, ext in zip(batch.page_tables, batch.seq_lens, batch.extend_lens):
        prefix = seq_len - ext
        if prefix == 0:
            seqs.append((start, ext, None, None))
        else:
            table = torch.tensor(pages, dtype=torch.long)
            slots = (table[:, None] * ps + torch.arange(ps)).reshape(-1)[:seq_len]
            rows = torch.arange(prefix, seq_len)[:, None]
            mask = torch.arange(seq_len)[None, :] <= rows
            seqs.append((start, ext, slots.to(device), mask.to(device)))
        start += ext
    batch.attn_meta["mla"] = _ExtendMeta(seqs)
