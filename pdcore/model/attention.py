"""The attention-backend contract the model calls in every layer (plugins implement it)."""

from __future__ import annotations

from typing import Protocol

import torch

from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool


class AttentionBackend(Protocol):
    """Created by a factory registered under pdcore_register_attention_backends.

    The factory is called as factory(num_heads=, num_kv_heads=, head_dim=, device=, dtype=).
    A backend that also implements `pdcore.engine.cuda_graph.GraphAttentionBackend`
    (fixed-size metadata buffers updated in place) gets its CUDA decode steps captured and
    replayed as CUDA graphs; without it, decode runs eagerly.
    """

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        """Build per-step metadata once (index tensors, masks) before the layers run."""

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        batch: ForwardBatch,
        pool: KVPool,
    ) -> torch.Tensor:
        """Write k/v into the pool at batch.out_slots, attend, return [T, num_heads * head_dim]."""
        ...


C_DECODE_ATTENTION = "c_decode_attention"
"""Optional attribute of a backend (True/False): its decode steps attend with pdcore's C
kernel (kernels/decode_attention.c) from batch.attn_meta["slots"] and ["lens"] with
softmax scale `backend.scale`, writing the step's k/v rows at batch.out_slots. Where it is
True, an fp32 model may run a whole decode step's layers in one C call
(pdcore/model/decode_layers.py) instead of calling `forward` per layer -- the same kernel
on the same metadata."""
