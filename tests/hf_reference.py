"""Greedy tokens from Hugging Face transformers: the correctness reference for pdcore."""

from __future__ import annotations

from pathlib import Path

import torch

# Eight prompts of different lengths, shared by the engine and server parity tests.
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that blows over it at night.",
    "1, 2, 3, 4,",
    "Hello",
    "def fibonacci(n):",
    "List three colours:",
    "Once upon a time, in a land far away, there lived a king who had three daughters and",
    "Q: What is 2+2?\nA:",
]


def load_hf_model(model_path: str | None):
    """transformers' own loading of the same weights (the GGUF via gguf_file=, or the HF folder)."""
    from transformers import AutoModelForCausalLM

    from pdcore.model.loader import default_model_path

    path = Path(model_path) if model_path else default_model_path()
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def hf_greedy(
    model, prompts_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int]
) -> list[list[int]]:
    """One generate() per prompt (no padding), stopping at eos like pdcore does."""
    outputs = []
    with torch.inference_mode():
        for ids in prompts_ids:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=eos_ids[0],
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs
