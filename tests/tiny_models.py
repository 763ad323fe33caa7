"""Tiny random-weight models (a Llama and two MoE families), built with transformers' own classes and saved with
`save_pretrained` (fp32), borrowing the default model's tokenizer so text routes work.

Used by tests/test_models_moe.py and bench/moe_decode.py. As with `tiny_llama_dir`, the
weights are random (wide init: no near-ties between greedy candidates), so the text is noise
but greedy tokens are well defined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _tokenizer():
    from pdcore.model.tokenizer import load_tokenizer

    return load_tokenizer(None)


def build_tiny_llama(folder: Path, seed: int = 1234, **overrides: Any) -> Path:
    """LlamaForCausalLM: 2 layers, GQA 4:2, llama3 RoPE scaling -- tests/conftest.py's
    `tiny_llama_dir`, and the same model for scripts outside pytest (bench/chaos_soak.py);
    `overrides`: LlamaConfig fields to change."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlamaConfig(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def build_tiny_deepseek_v3(folder: Path, seed: int = 1234, **overrides: Any) -> Path:
    """DeepseekV3ForCausalLM: 3 layers (the first dense), MLA with q LoRA and YaRN RoPE
    (interleaved), 8 routed experts in 4 groups (2 groups kept, top-2), one shared expert,
    random e_score_correction_bias. Saved in shards with model.safetensors.index.json."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tokenizer = _tokenizer()
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        rope_interleave=True,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs)).eval()
    with torch.no_grad():  # transformers zero-initialises the bias; make it matter
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="2MB")
    tokenizer.save_pretrained(str(folder))
    return folder


def build_tiny_qwen3_moe(folder: Path, seed: int = 1234, **overrides: Any) -> Path:
    """Qwen3MoeForCausalLM: 3 layers, GQA 4:2 with q/k norm, 8 experts top-2 (normalised),
    layer 1 dense through mlp_only_layers. Saved as one model.safetensors."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = _tokenizer()
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        max_position_embeddings=1024,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs)).eval()
    with torch.no_grad():  # ones by default: random norms exercise the per-head q/k norm
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder
