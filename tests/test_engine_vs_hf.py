"""Greedy tokens from pdcore's offline engine equal transformers' on the same fp32 weights."""

from __future__ import annotations

import pytest

from pdcore.offline import Engine
from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model


def _check(
    engine: Engine, model_path: str | None, max_new_tokens: int, page_size_note: str
) -> None:
    tok = engine.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    outs = engine.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens}
    )
    hf = load_hf_model(model_path)
    expected = hf_greedy(hf, ids, max_new_tokens, engine.core.eos_ids)
    for prompt, out, ref in zip(PROMPTS, outs, expected):
        assert out["output_ids"] == ref, f"{page_size_note}: prompt {prompt!r} diverged"


@pytest.mark.slow
def test_default_model_matches_transformers() -> None:
    engine = Engine(dtype="float32", max_total_tokens=8192)
    _check(engine, None, 24, "default model")


@pytest.mark.parametrize("page_size", [1, 16])
def test_tiny_llama_matches_transformers(tiny_llama_dir, page_size: int) -> None:
    # chunked_prefill_size=8 splits prompts into chunks, exercising prefix attention.
    engine = Engine(
        model_path=str(tiny_llama_dir),
        dtype="float32",
        page_size=page_size,
        chunked_prefill_size=8,
        max_total_tokens=4096,
    )
    _check(engine, str(tiny_llama_dir), 16, f"page_size={page_size}")


def test_prefix_cache_hit_gives_same_tokens(tiny_llama_dir) -> None:
    engine = Engine(
        model_path=str(tiny_llama_dir), dtype="float32", page_size=4, max_total_tokens=2048
    )
    prompt = PROMPTS[6]
    params = {"temperature": 0, "max_new_tokens": 12}
    first = engine.generate(prompt, params)
    second = engine.generate(prompt, params)
    assert second["meta_info"]["cached_tokens"] > 0
    assert first["output_ids"] == second["output_ids"]
