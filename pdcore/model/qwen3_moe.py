"""Qwen3MoeForCausalLM: GQA attention with a per-head RMSNorm on q and k (before RoPE) over
the per-head ("mha") KV pool and the configured attention backend; MoE layers with softmax
top-k routing and no shared experts. A layer is sparse when it is not in `mlp_only_layers`
and (index + 1) is a multiple of `decoder_sparse_step`; the others keep a dense MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdcore.model.attention import AttentionBackend
from pdcore.model.config import ModelConfig
from pdcore.model.decoder import Decoder, DecoderLayer
from pdcore.model.family_configs import read_qwen3_moe_config as read_config  # noqa: F401
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.linear import Linear

# Per-head K/V like Llama: the same pool and sizing (re-exported for the registry).
from pdcore.model.llama_family import kv_bytes_per_token, make_kv_pool  # noqa: F401
from pdcore.model.moe import Experts, SwiGLU, ToDevice, check_ep, softmax_topk
from pdcore.model.parallel import HeadShard, TPGroup
from pdcore.model.rope import RotaryTable, apply_rotary


def is_sparse(config: ModelConfig, layer: int) -> bool:
    e = config.extra
    return (
        layer not in e["mlp_only_layers"]
        and int(e["num_experts"]) > 0
        and (layer + 1) % int(e["decoder_sparse_step"]) == 0
    )


class _Attention:
    __slots__ = ("qkv", "q_norm", "k_norm", "o_proj", "sizes", "heads", "head_dim", "eps")

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        prefix: str,
        config: ModelConfig,
        to: ToDevice,
        shard: HeadShard,
        driver: bool,
    ) -> None:
        """This rank's heads (`shard`: q/k/v rows, o_proj columns, as for Llama); o_proj's
        bias, if any, is added by the driver only (the output is all-reduced)."""
        attn = prefix + "self_attn."
        hd = config.head_dim
        q_rows = (shard.head_start * hd, shard.num_heads * hd)
        kv_rows = (shard.kv_head_start * hd, shard.num_kv_heads * hd)
        rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        names = {p: attn + f"{p}_proj." for p in "qkv"}
        self.qkv = Linear(
            to(torch.cat([state[names[p] + "weight"].narrow(0, *rows[p]) for p in "qkv"])),
            to(torch.cat([state[names[p] + "bias"].narrow(0, *rows[p]) for p in "qkv"]))
            if names["q"] + "bias" in state
            else None,
        )
        self.q_norm = to(state[attn + "q_norm.weight"])
        self.k_norm = to(state[attn + "k_norm.weight"])
        self.o_proj = Linear(
            to(state[attn + "o_proj.weight"].narrow(1, *q_rows)),
            to(state[attn + "o_proj.bias"]) if attn + "o_proj.bias" in state and driver else None,
        )
        self.heads = (shard.num_heads, shard.num_kv_heads, shard.num_kv_heads)
        self.sizes = [h * hd for h in self.heads]
        self.head_dim = hd
        self.eps = config.rms_norm_eps

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
        t, hd = x.shape[0], self.head_dim
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q = F.rms_norm(q.reshape(t, -1, hd), (hd,), self.q_norm, self.eps)
        k = F.rms_norm(k.reshape(t, -1, hd), (hd,), self.k_norm, self.eps)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn.forward(layer, q, k, v.reshape(t, -1, hd), batch, pool)
        return self.o_proj(out)


class _SparseMoE:
    def __init__(
        self,
        state: dict[str, torch.Tensor],
        prefix: str,
        config: ModelConfig,
        to: ToDevice,
        tp: TPGroup,
        ep: bool,
        ep_group: TPGroup | None = None,
    ) -> None:
        e = config.extra
        self.gate = Linear(to(state[prefix + "gate.weight"]))  # every rank routes every token
        self.experts = Experts.from_state(
            state, prefix + "experts.", int(e["num_experts"]), to, tp, ep, ep_group
        )
        self.top_k = int(e["num_experts_per_tok"])
        self.norm_topk_prob = bool(e["norm_topk_prob"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        return self.experts(x, ids, weights)


class Qwen3MoeModel(Decoder):
    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        tp: TPGroup | None = None,
        ep_size: int = 1,
        ep_group: TPGroup | None = None,
    ) -> None:
        tp = tp or TPGroup(device=device)
        shard = HeadShard.of(config, tp.size, tp.rank)
        rotary = RotaryTable(
            config.head_dim, config.rope_theta, config.rope_scaling, max_positions, dtype, device
        )
        super().__init__(
            config, state, dtype, device, rotary, shard.num_heads, shard.num_kv_heads, tp
        )
        ep = ep_group is None and check_ep(config, tp.size, ep_size)
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            mlp = (
                _SparseMoE(state, prefix + "mlp.", config, self.to, tp, ep, ep_group)
                if is_sparse(config, i)
                else SwiGLU.from_state(state, prefix + "mlp.", self.to, tp)
            )
            self.layers.append(
                DecoderLayer(
                    self.to(state[prefix + "input_layernorm.weight"]),
                    _Attention(state, prefix, config, self.to, shard, tp.is_driver),
                    self.to(state[prefix + "post_attention_layernorm.weight"]),
                    mlp,
                )
            )


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPGroup | None,
    ep_size: int = 1,
    ep_group: TPGroup | None = None,
) -> Qwen3MoeModel:
    return Qwen3MoeModel(config, state, dtype, device, max_positions, tp, ep_size, ep_group)
