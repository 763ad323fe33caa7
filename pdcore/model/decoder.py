"""The pre-norm decoder skeleton the MoE families share: embed, then per layer
`h += attn(norm(h))`, `h += mlp(norm(h))`, then the final norm and the LM head.

A family builds its layers (any attention, any MLP: dense or MoE) and says how per-step
attention metadata is prepared; the loop itself is written once here. Plain tensors and
functional ops, as in pdcore.model.llama.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pdcore.model.attention import AttentionBackend
from pdcore.model.config import ModelConfig
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.linear import Linear
from pdcore.model.parallel import TPGroup
from pdcore.model.rope import RotaryTable

# attention(layer index, normed hidden, cos, sin, batch, pool, backend) -> [T, hidden]
Attention = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, ForwardBatch, KVPool, AttentionBackend],
    torch.Tensor,
]


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    attention: Attention
    post_norm: torch.Tensor
    mlp: Callable[[torch.Tensor], torch.Tensor]


class Decoder:
    """Embedding, norms and LM head of an HF `model.*` / `lm_head` checkpoint; the family's
    subclass fills `self.layers` and may override `prepare`."""

    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        rotary: RotaryTable,
        num_heads: int,
        num_kv_heads: int,
        tp: TPGroup | None = None,
    ) -> None:
        """`num_heads`, `num_kv_heads`: this rank's (with TP its shard of the query heads;
        `num_kv_heads` what the KV pool stores per token, 1 for MLA's latent). With TP the
        layers' attention and MLP return partial sums, all-reduced here; embedding and
        norms are replicated and only the driver (rank 0) holds the LM head."""
        self.tp = tp or TPGroup(device=device)
        self.config = config
        self.dtype = dtype
        self.device = device
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.rotary = rotary
        self.embed = self.to(state["model.embed_tokens.weight"])
        self.norm = self.to(state["model.norm.weight"])
        tied = config.tie_word_embeddings or "lm_head.weight" not in state
        self.lm_head: Linear | None = None  # followers never compute logits
        if self.tp.is_driver:
            self.lm_head = Linear(self.embed if tied else self.to(state["lm_head.weight"]))
        self.layers: list[DecoderLayer] = []
        self._norm_shape = (config.hidden_size,)

    def to(self, t: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor on this model's device and dtype."""
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self._norm_shape, weight, self.config.rms_norm_eps)

    def prepare(self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend) -> None:
        """Per-step attention metadata, once before the layers (default: the backend's)."""
        attn.prepare(batch, pool)

    @torch.inference_mode()
    def expert_parallel_idle(self) -> None:
        """--enable-dp-attention: this rank has no batch this step but a peer has one; take
        part in every MoE layer's all-to-alls, in layer order, with no tokens of its own.
        Attention and dense layers have no collectives across the dp ranks, so these are
        the only ones a peer's forward waits on."""
        for layer in self.layers:
            mlp: Any = layer.mlp
            experts = getattr(mlp, "experts", None)
            if experts is not None:
                experts.idle(self.config.hidden_size, int(mlp.top_k), self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend) -> torch.Tensor:
        """fp32 logits for the rows in batch.logits_indices: [S, vocab] (a TP follower
        returns an empty tensor: only the driver samples)."""
        self.prepare(batch, pool, attn)
        hidden = F.embedding(batch.input_ids, self.embed)
        cos, sin = self.rotary.lookup(batch.positions)
        tp = self.tp
        for i, layer in enumerate(self.layers):
            x = self.rms_norm(hidden, layer.input_norm)
            hidden = hidden + tp.all_reduce(layer.attention(i, x, cos, sin, batch, pool, attn))
            hidden = hidden + tp.all_reduce(layer.mlp(self.rms_norm(hidden, layer.post_norm)))
        if self.lm_head is None:
            return hidden.new_empty((0,))
        hidden = self.rms_norm(hidden.index_select(0, batch.logits_indices), self.norm)
        return self.lm_head(hidden).float()
