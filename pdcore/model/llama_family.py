"""The Llama family (Llama, Mistral, Qwen2, SmolLM) as a registry entry: pdcore.model.llama's
model over the per-head ("mha") KV pool, sharded by tensor parallelism."""

from __future__ import annotations

import torch

from pdcore.model.config import ModelConfig
from pdcore.model.family_configs import read_llama_config as read_config  # noqa: F401
from pdcore.model.kv_pool import KVPool
from pdcore.model.llama import LlamaModel
from pdcore.model.parallel import TPGroup, local_kv_heads
from pdcore.model.quantized import QuantizedWeights


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TPGroup | None,
    quant: QuantizedWeights | None = None,
) -> LlamaModel:
    return LlamaModel(config, state, dtype, device, max_positions, tp, quant)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, tp_size: int) -> int:
    return KVPool.bytes_per_token(
        config.num_layers, local_kv_heads(config, tp_size), config.head_dim, dtype
    )


def make_kv_pool(
    config: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    tp_size: int,
) -> KVPool:
    return KVPool(
        config.num_layers,
        num_pages,
        page_size,
        local_kv_heads(config, tp_size),
        config.head_dim,
        dtype,
        device,
    )
