"""DeepseekV3ForCausalLM: multi-head latent attention (pdcore.model.mla) over the "mla" KV
pool, and mixture-of-experts layers with routed and shared experts and DeepSeek's grouped
top-k routing; the first `first_k_dense_replace` layers keep a dense MLP.

Numbers follow transformers' modeling_deepseek_v3.py: YaRN RoPE on the rope dims only,
softmax scale (qk_head_dim)^-0.5 times mscale(factor, mscale_all_dim)^2 under YaRN, router
in fp32 (sigmoid scores + e_score_correction_bias for the choice, unbiased scores as
weights, normalised when norm_topk_prob, times routed_scaling_factor).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from pdcore.model.attention import AttentionBackend
from pdcore.model.config import ModelConfig
from pdcore.model.decoder import Decoder, DecoderLayer
from pdcore.model.family_configs import read_deepseek_v3_config as read_config  # noqa: F401
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool, MLAKVPool
from pdcore.model.mla import MLADims, MLAttention, prepare_mla
from pdcore.model.moe import Experts, SwiGLU, ToDevice, check_ep, grouped_topk
from pdcore.model.parallel import HeadShard, TPGroup
from pdcore.model.rope import RotaryTable, yarn_mscale


def mla_dims(config: ModelConfig) -> MLADims:
    e = config.extra
    return MLADims(
        num_heads=config.num_heads,
        q_lora_rank=e["q_lora_rank"],
        kv_lora_rank=int(e["kv_lora_rank"]),
        qk_nope_head_dim=int(e["qk_nope_head_dim"]),
        qk_rope_head_dim=int(e["qk_rope_head_dim"]),
        v_head_dim=int(e["v_head_dim"]),
    )


def softmax_scale(config: ModelConfig) -> float:
    """(qk_head_dim)^-0.5, times mscale^2 when YaRN sets mscale_all_dim (transformers'
    yarn_apply_mscale): the logits' share of YaRN's magnitude correction."""
    dims = mla_dims(config)
    scale = dims.qk_head_dim**-0.5
    rope = config.rope_scaling or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        mscale_all_dim = rope.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_mscale(float(rope["factor"]), float(mscale_all_dim))
            scale *= m * m
    return scale


class DeepseekMoE:
    """Routed experts (grouped top-k) plus the shared experts, summed."""

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        prefix: str,
        config: ModelConfig,
        to: ToDevice,
        device: torch.device,
        tp: TPGroup,
        ep: bool,
        ep_group: TPGroup | None = None,
    ) -> None:
        """With `tp`: the shared experts split by channel; the routed experts split by
        channel too, or (`ep`) whole experts per rank. The output is then a partial sum
        the decoder all-reduces. `ep_group` (dp-attention): the routed experts split
        whole over that group instead."""
        e = config.extra
        self.gate = state[prefix + "gate.weight"].to(device, torch.float32).contiguous()
        bias = state.get(prefix + "gate.e_score_correction_bias")
        self.bias = None if bias is None else bias.to(device, torch.float32)
        self.experts = Experts.from_state(
            state, prefix + "experts.", int(e["n_routed_experts"]), to, tp, ep, ep_group
        )
        self.shared = (
            SwiGLU.from_state(state, prefix + "shared_experts.", to, tp)
            if int(e["n_shared_experts"] or 0) > 0
            else None
        )
        self.top_k = int(e["num_experts_per_tok"])
        self.n_group, self.topk_group = int(e["n_group"]), int(e["topk_group"])
        self.norm_topk_prob = bool(e["norm_topk_prob"])
        self.scaling = float(e["routed_scaling_factor"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate)  # the router runs in fp32, as transformers'
        ids, weights = grouped_topk(
            logits,
            self.bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.norm_topk_prob,
            self.scaling,
        )
        out = self.experts(x, ids, weights)
        return out if self.shared is None else out + self.shared(x)


class DeepseekV3Model(Decoder):
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
        dims = dataclasses.replace(mla_dims(config), num_heads=shard.num_heads)
        rotary = RotaryTable(
            dims.qk_rope_head_dim,
            config.rope_theta,
            config.rope_scaling,
            max_positions,
            dtype,
            device,
        )
        super().__init__(config, state, dtype, device, rotary, shard.num_heads, 1, tp)
        ep = ep_group is None and check_ep(config, tp.size, ep_size)
        scale = softmax_scale(config)
        interleave = bool(config.extra["rope_interleave"])
        first_dense = int(config.extra["first_k_dense_replace"])
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            mlp = (
                SwiGLU.from_state(state, prefix + "mlp.", self.to, tp)
                if i < first_dense
                else DeepseekMoE(state, prefix + "mlp.", config, self.to, device, tp, ep, ep_group)
            )
            self.layers.append(
                DecoderLayer(
                    self.to(state[prefix + "input_layernorm.weight"]),
                    MLAttention(state, prefix, dims, scale, interleave, self.to, shard.head_start),
                    self.to(state[prefix + "post_attention_layernorm.weight"]),
                    mlp,
                )
            )

    def prepare(self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend) -> None:
        prepare_mla(batch, self.device)  # MLA attends itself; the backend is not used


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPGroup | None,
    ep_size: int = 1,
    ep_group: TPGroup | None = None,
) -> DeepseekV3Model:
    return DeepseekV3Model(config, state, dtype, device, max_positions, tp, ep_size, ep_group)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, tp_size: int) -> int:
    """The latent and the rope key, once per layer (every TP rank would hold all of it)."""
    d = mla_dims(config)
    return MLAKVPool.mla_bytes_per_token(
        config.num_layers, d.kv_lora_rank, d.qk_rope_head_dim, dtype
    )


def make_kv_pool(
    config: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    tp_size: int,
) -> KVPool:
    d = mla_dims(config)
    return MLAKVPool(
        config.num_layers, num_pages, page_size, d.kv_lora_rank, d.qk_rope_head_dim, dtype, device
    )
