"""The built-in "torch" attention backend: paged attention with gathers and SDPA (CPU and CUDA).

Decode folds the GQA group into the query-length axis, so one SDPA call over
[batch, kv_heads, group, head_dim] queries serves every sequence without repeating K/V.
On a CPU with pdcore's kernels, decode and prefill (extend) both run in C straight from
the page pool (kernels/decode_attention.c, kernels/extend_attention.c): no gathers, no
masks; prefill measured 1.7-2x torch's SDPA on SmolLM2's shapes (512 tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdcore.model import native_cpu
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool


def slot_indices(page_table: list[int], length: int, page_size: int) -> torch.Tensor:
    """Flat KV slots of tokens [0, length) of one sequence."""
    pages = torch.tensor(page_table, dtype=torch.long)
    slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    return slots[:length]


class TorchAttentionBackend:
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.device = torch.device(device)
        self.scale = head_dim**-0.5
        # on a CPU with our kernels: attention reads K/V straight from the pool in C
        self._native = None
        if (
            self.device.type == "cpu"
            and dtype in (torch.bfloat16, torch.float32)
            and native_cpu.decode_attention_applies(num_heads, num_kv_heads, head_dim)
        ):
            self._native = native_cpu.kernels(dtype)
        # the model may call the same decode kernel for every layer at once (attention.py)
        self.c_decode_attention = self._native is not None
        self._page_offsets: dict[int, torch.Tensor] = {}  # arange(page_size), per size

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        meta = batch.attn_meta
        if batch.is_decode and self._native is not None:
            # The C kernel reads slots[s, t] for t < lens[s] only: every page's slots, the
            # table padded with page 0 -- four tensor ops per step, whatever the batch (one
            # per sequence and a dozen more cost ~0.15 ms per batch-1 step here).
            ps = batch.page_size
            max_pages = (max(batch.seq_lens) + ps - 1) // ps
            table = torch.tensor(
                [(p + [0] * max_pages)[:max_pages] for p in batch.page_tables], dtype=torch.long
            )
            offsets = self._page_offsets.get(ps)
            if offsets is None:
                offsets = self._page_offsets[ps] = torch.arange(ps)
            meta["slots"] = (table.unsqueeze(-1) * ps + offsets).view(batch.num_seqs, -1)
            meta["lens"] = torch.tensor(batch.seq_lens, dtype=torch.long)
        elif batch.is_decode:
            max_len = max(batch.seq_lens)
            max_pages = (max_len + batch.page_size - 1) // batch.page_size
            table = torch.zeros((batch.num_seqs, max_pages), dtype=torch.long)
            for i, pages in enumerate(batch.page_tables):
                n = min(len(pages), max_pages)
                table[i, :n] = torch.tensor(pages[:n], dtype=torch.long)
            cols = torch.arange(max_len)
            lens = torch.tensor(batch.seq_lens, dtype=torch.long)
            valid = cols[None, :] < lens[:, None]
            slots = table[:, cols // batch.page_size] * batch.page_size + cols % batch.page_size
            meta["slots"] = torch.where(valid, slots, 0).to(self.device)
            meta["lens"] = lens
            meta["kv_index"] = meta["slots"].view(-1)
            meta["max_len"] = max_len
            meta["mask"] = valid[:, None, None, :].to(self.device)
            meta["all_full"] = bool(valid.all())
        elif self._native is not None:  # the C kernel: every sequence's slots, one table
            every: list[torch.Tensor] = []
            seqs, start, offset = [], 0, 0
            for pages, seq_len, ext in zip(batch.page_tables, batch.seq_lens, batch.extend_lens):
                every.append(slot_indices(pages, seq_len, batch.page_size))
                seqs.append((start, ext, seq_len, offset))
                start += ext
                offset += seq_len
            meta["slots"] = torch.cat(every)
            meta["seqs"] = torch.tensor(seqs, dtype=torch.long)
        else:
            meta["seqs"] = []
            start = 0
            for pages, seq_len, ext in zip(batch.page_tables, batch.seq_lens, batch.extend_lens):
                prefix = seq_len - ext
                if prefix == 0:
                    meta["seqs"].append((start, ext, None, None))
                else:
                    slots = slot_indices(pages, seq_len, batch.page_size).to(self.device)
                    rows = torch.arange(prefix, seq_len)[:, None]
                    mask = (torch.arange(seq_len)[None, :] <= rows).to(self.device)
                    meta["seqs"].append((start, ext, slots, mask))
                start += ext

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        pool: KVPool,
    ) -> torch.Tensor:
        k_cache = pool.k_flat(layer)
        v_cache = pool.v_flat(layer)
        if batch.is_decode and self._native is not None:
            meta = batch.attn_meta
            return self._native.decode_attention(
                q, k, v, k_cache, v_cache, meta["slots"], batch.out_slots, meta["lens"], self.scale
            )
        k_cache.index_copy_(0, batch.out_slots, k)
        v_cache.index_copy_(0, batch.out_slots, v)
        if batch.is_decode:
            return self._decode(q, k_cache, v_cache, batch)
        if self._native is not None:
            meta = batch.attn_meta
            return self._native.extend_attention(
                q, k_cache, v_cache, meta["slots"], meta["seqs"], self.scale
            )
        return self._extend(q, k, v, k_cache, v_cache, batch)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        meta = batch.attn_meta
        b = q.shape[0]
        index, length = meta["kv_index"], meta["max_len"]
        # index_select on a flat index is several times faster than advanced indexing here.
        keys = k_cache.index_select(0, index).view(b, length, self.num_kv_heads, -1).transpose(1, 2)
        values = (
            v_cache.index_select(0, index).view(b, length, self.num_kv_heads, -1).transpose(1, 2)
        )
        queries = q.view(b, self.num_kv_heads, self.group, self.head_dim)
        mask = None if meta["all_full"] else meta["mask"]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=self.scale
        )
        return out.reshape(b, self.num_heads * self.head_dim)

    def _extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        outputs = []
        for start, ext, slots, mask in batch.attn_meta["seqs"]:
            qi = q[start : start + ext].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if slots is None:
                ki = k[start : start + ext].transpose(0, 1).unsqueeze(0)
                vi = v[start : start + ext].transpose(0, 1).unsqueeze(0)
                out = F.scaled_dot_product_attention(
                    qi, ki, vi, is_causal=True, scale=self.scale, enable_gqa=True
                )
            else:
                ki = k_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
                vi = v_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
                out = F.scaled_dot_product_attention(
                    qi, ki, vi, attn_mask=mask, scale=self.scale, enable_gqa=True
                )
            outputs.append(out.squeeze(0).transpose(0, 1).reshape(ext, -1))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
