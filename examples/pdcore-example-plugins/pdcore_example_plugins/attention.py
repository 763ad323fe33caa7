"""The "reference" attention backend: the attention-backend contract in its plainest form.

Every sequence is handled on its own, decode and extend alike: gather the sequence's K/V
from its pages, compute softmax(Q K^T / sqrt(d)) V with a causal mask in float32, repeat
K/V heads for grouped-query attention. Slow (a Python loop per sequence and per layer), but
each step is the textbook formula, so it is the thing to compare a fast kernel against.

The contract (pdcore/model/attention.py), as the model calls it for one forward pass:

    backend.prepare(batch, pool)                      # once, before the layers
    for layer in range(num_layers):
        out = backend.forward(layer, q, k, v, batch, pool)
        # q [T, H, D], k/v [T, KVH, D] for the T new tokens of the batch (all sequences,
        # concatenated); write k/v into the pool at batch.out_slots, return [T, H * D]
"""

from __future__ import annotations

import torch

from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool


class ReferenceAttentionBackend:
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} groups")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads  # query heads sharing one K/V head (GQA)
        self.device = torch.device(device)
        self.scale = head_dim**-0.5

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        """Per-step metadata, shared by every layer: for each sequence, its rows in q/k/v,
        how many tokens came before this step, and the flat KV slots of all its tokens.

        A flat slot is page * page_size + offset: the row of `pool.k_flat(layer)` that holds
        that token's K. page_tables[i] lists sequence i's pages in token order and already
        covers this step's tokens, whose slots are batch.out_slots.
        """
        seqs = []
        row = 0
        for pages, seq_len, new in zip(batch.page_tables, batch.seq_lens, batch.extend_lens):
            positions = torch.arange(seq_len)
            page_of_token = torch.tensor(pages, dtype=torch.long)[positions // batch.page_size]
            slots = page_of_token * batch.page_size + positions % batch.page_size
            seqs.append((row, new, seq_len - new, slots.to(self.device)))
            row += new
        batch.attn_meta["reference"] = seqs

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        pool: KVPool,
    ) -> torch.Tensor:
        # 1. The new tokens' K/V go into the cache first: a sequence attends to itself.
        k_cache, v_cache = pool.k_flat(layer), pool.v_flat(layer)  # [slots, KVH, D] views
        k_cache[batch.out_slots] = k
        v_cache[batch.out_slots] = v

        out = torch.empty(
            q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device
        )
        for row, new, prefix, slots in batch.attn_meta["reference"]:
            out[row : row + new] = self._attend(
                q[row : row + new], k_cache[slots], v_cache[slots], prefix
            )
        return out

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: int
    ) -> torch.Tensor:
        """One sequence: q [n, H, D] for its tokens prefix..prefix+n-1, keys/values
        [prefix + n, KVH, D] for all its tokens. Returns [n, H * D]."""
        n, length = q.shape[0], keys.shape[0]
        # 2. GQA: query head h reads K/V head h // group, so repeat each K/V head `group` times.
        keys = keys.repeat_interleave(self.group, dim=1)  # [L, H, D]
        values = values.repeat_interleave(self.group, dim=1)
        # 3. Scores per head, in float32 whatever the pool's dtype: [H, n, L].
        scores = torch.einsum("nhd,lhd->hnl", q.float(), keys.float()) * self.scale
        # 4. Causal mask: the token at position prefix + i sees positions 0..prefix + i.
        query_pos = torch.arange(prefix, prefix + n, device=q.device)[:, None]
        key_pos = torch.arange(length, device=q.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        # 5. Softmax over the keys, weighted sum of the values: [n, H, D] -> [n, H * D].
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("hnl,lhd->nhd", probs, values.float())
        return out.reshape(n, self.num_heads * self.head_dim).to(q.dtype)
