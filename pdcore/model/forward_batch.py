"""What one forward pass computes: which tokens, at which positions, writing KV into which slots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardBatch:
    """A batch is all-decode (one new token per sequence) or all-extend (a chunk per sequence).

    `out_slots` are flat KV slots (page * page_size + offset) where the new tokens' K/V go;
    `page_tables` cover every token of each sequence after this step. Attention backends
    stash their per-step metadata in `attn_meta` once, then reuse it in every layer.
    """

    is_decode: bool
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    out_slots: torch.Tensor  # [T] long
    seq_lens: list[int]  # KV length of each sequence after this step
    extend_lens: list[int]  # new tokens of each sequence in this step
    page_tables: list[list[int]]
    logits_indices: torch.Tensor  # [S] rows of the hidden states whose logits are needed
    page_size: int
    attn_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def prefix_lens(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens, self.extend_lens)]
