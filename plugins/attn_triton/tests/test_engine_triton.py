"""The whole engine with --attention-backend triton (Triton's CPU interpreter) gives the same
greedy tokens as with the torch backend, on a tiny random-weight Llama: prefill, decode, and
a second prompt that extends a cached prefix."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from pathlib import Path  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, GQA 4:2, head_dim 16, with the default model's tokenizer (as tests/conftest)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdcore.model.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama-triton")
    tokenizer = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # wide logits: no near-ties between greedy candidates
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(4321)
    LlamaForCausalLM(config).eval().save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def _engine(backend: str, model: Path):
    from pdcore import Engine

    return Engine(
        model_path=str(model),
        attention_backend=backend,
        device="cpu",
        dtype="float32",
        page_size=16,
        max_total_tokens=512,
    )


def _tokens(engine) -> list[list[int]]:
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    shared = list(range(100, 140))  # 40 tokens: two full pages the second call finds cached
    first = engine.generate(
        input_ids=[shared + [7, 8, 9], list(range(300, 311)), [5, 6, 7]], sampling_params=params
    )
    second = engine.generate(input_ids=shared + [21, 22, 23, 24, 25], sampling_params=params)
    assert second["meta_info"]["cached_tokens"] >= 32
    return [r["output_ids"] for r in first] + [second["output_ids"]]


@pytest.fixture(scope="module")
def torch_tokens(tiny_llama: Path) -> list[list[int]]:
    return _tokens(_engine("torch", tiny_llama))


def test_engine_greedy_tokens_match_torch_backend(tiny_llama: Path, torch_tokens) -> None:
    assert _tokens(_engine("triton", tiny_llama)) == torch_tokens


class _Replay:
    def __init__(self, fn) -> None:
        self.replay = fn


def test_decode_through_graph_runner_logic(tiny_llama: Path, torch_tokens) -> None:
    """CudaGraphRunner's replay path (static inputs, padded batch sizes, in-place attention
    metadata) on CPU: "capture" keeps the forward call, "replay" runs it again."""
    from pdcore.engine.cuda_graph import CudaGraphRunner, _CapturedAttention

    class EagerGraphs(CudaGraphRunner):
        replays: list[int] = []

        def _capture_all(self) -> None:
            proxy = _CapturedAttention(self.attn)
            for bs in reversed(self.sizes):
                batch = self._batch(bs)
                self.attn.prepare_for_capture(bs, batch, self.pool)
                out = self.model.forward(batch, self.pool, proxy)

                def run(bs=bs, batch=batch, out=out):
                    self.replays.append(bs)
                    out.copy_(self.model.forward(batch, self.pool, proxy))

                self.graphs[bs], self.outputs[bs] = _Replay(run), out

    engine = _engine("triton", tiny_llama)
    runner = engine.core.runner
    runner.graphs = EagerGraphs(runner.model, runner.pool, runner.attn, max_bs=4, max_pages=16)
    assert _tokens(engine) == torch_tokens
    assert {1, 4} <= set(EagerGraphs.replays)  # 3 sequences padded to 4, then 1 alone
