"""Each model family's reader of an HF config.json, apart from its torch model code.

`pdcore serve` checks the model against the parallelism flags before any weight loads --
in the HTTP frontend, which never imports torch (pdcore/server/spawn.py) -- so the readers
live here, and each family module re-exports its own as `read_config` (the registry's
`FamilyModule` contract).
"""

from __future__ import annotations

from typing import Any

from pdcore.model.config import SUPPORTED_ARCHITECTURES, ModelConfig


def read_llama_config(cfg: dict[str, Any]) -> ModelConfig:
    model_type = str(cfg.get("model_type", "llama")).lower()
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model_type '{model_type}' is not a Llama-family model; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return ModelConfig.from_hf_dict(cfg)


_DEEPSEEK_KEYS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "first_k_dense_replace",
    "rope_interleave",
)
_DEEPSEEK_DEFAULTS: dict[str, Any] = {
    "n_shared_experts": 0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "first_k_dense_replace": 0,
    "rope_interleave": True,
    "q_lora_rank": None,
}


def read_deepseek_v3_config(cfg: dict[str, Any]) -> ModelConfig:
    """The shared fields, plus MLA and MoE numbers in `extra`. The pool stores one
    "head" per token: num_kv_heads 1, head_dim kv_lora_rank + qk_rope_head_dim."""
    missing = [k for k in _DEEPSEEK_KEYS if k not in cfg and k not in _DEEPSEEK_DEFAULTS]
    if missing:
        raise ValueError(f"DeepseekV3 config.json lacks {', '.join(missing)}")
    extra: dict[str, Any] = {k: cfg.get(k, _DEEPSEEK_DEFAULTS.get(k)) for k in _DEEPSEEK_KEYS}
    scoring, method = cfg.get("scoring_func", "sigmoid"), cfg.get("topk_method", "noaux_tc")
    if scoring != "sigmoid" or method not in ("noaux_tc", "group_limited_greedy"):
        raise ValueError(
            "DeepseekV3ForCausalLM: only sigmoid scoring with grouped top-k is implemented "
            f"(scoring_func={scoring!r}, topk_method={method!r})"
        )
    return ModelConfig.from_hf_dict(
        cfg,
        num_kv_heads=1,
        head_dim=int(extra["kv_lora_rank"]) + int(extra["qk_rope_head_dim"]),
        extra=extra,
    )


_QWEN3_MOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 0,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": 0,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def read_qwen3_moe_config(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("use_sliding_window"):
        raise ValueError("Qwen3MoeForCausalLM with use_sliding_window is not supported")
    extra = {
        k: cfg.get(k, d) if cfg.get(k) is not None else d for k, d in _QWEN3_MOE_DEFAULTS.items()
    }
    if cfg.get("num_experts") is None and cfg.get("num_local_experts") is not None:
        extra["num_experts"] = cfg["num_local_experts"]  # transformers 5 saves this name
    return ModelConfig.from_hf_dict(cfg, extra=extra)
