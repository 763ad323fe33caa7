"""The one-call C decode loop (pdcore/model/decode_layers.py, kernels/decode_layers.c)
against the per-kernel Python loop it replaces (LlamaModel._layers_native): the same
kernels in the same order, so the logits must be bit for bit equal -- on dense fp32 weights
(a tiny random Llama) and on the default model's GGUF blocks (quantized linears), with
several sequences of different lengths in one decode batch."""

from __future__ import annotations

import pytest
import torch

from pdcore.engine.config import EngineConfig
from pdcore.engine.tp_worker import load_rank
from pdcore.model import native_cpu
from pdcore.model.forward_batch import ForwardBatch

pytestmark = pytest.mark.slow


def _decode_logits(runner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill each prompt alone, then `steps` decode steps of all of them together (the
    next input: each sequence's greedy token); the logits of every decode step."""
    ps = runner.pool.page_size
    pages_per_seq = 8
    tables = [
        list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)) for i in range(len(prompts))
    ]
    seqs = [list(p) for p in prompts]

    def slot(i: int, pos: int) -> int:
        return tables[i][pos // ps] * ps + pos % ps

    nxt = []
    for i, ids in enumerate(seqs):
        n = len(ids)
        batch = ForwardBatch(
            is_decode=False, input_ids=torch.tensor(ids), positions=torch.arange(n),
            out_slots=torch.tensor([slot(i, p) for p in range(n)]), seq_lens=[n],
            extend_lens=[n], page_tables=[tables[i]], logits_indices=torch.tensor([n - 1]),
            page_size=ps,
        )  # fmt: skip
        nxt.append(int(runner.run(batch).argmax(-1)))
    out = []
    for _ in range(steps):
        for i, tok in enumerate(nxt):
            seqs[i].append(tok)
        lens = [len(s) for s in seqs]
        batch = ForwardBatch(
            is_decode=True, input_ids=torch.tensor(nxt), positions=torch.tensor(lens) - 1,
            out_slots=torch.tensor([slot(i, n - 1) for i, n in enumerate(lens)]),
            seq_lens=lens, extend_lens=[1] * len(seqs), page_tables=tables[: len(seqs)],
            logits_indices=torch.arange(len(seqs)), page_size=ps,
        )  # fmt: skip
        logits = runner.run(batch)
        out.append(logits)
        nxt = logits.argmax(-1).tolist()
    return out


def _compare(config: EngineConfig, prompts: list[list[int]], monkeypatch) -> None:
    if native_cpu.kernels(torch.float32) is None:
        pytest.skip(f"no kernels here: {native_cpu.describe()}")
    rank = load_rank(config)
    model = rank.runner.model
    with torch.inference_mode():
        c_loop = _decode_logits(rank.runner, prompts, steps=4)
    assert model._decode_layers is not None, "the C loop did not apply"
    rank.runner.pool.k.zero_()
    rank.runner.pool.v.zero_()
    monkeypatch.setattr(type(model), "_c_decode_layers", lambda *a: None)
    with torch.inference_mode():
        python_loop = _decode_logits(rank.runner, prompts, steps=4)
    for a, b in zip(c_loop, python_loop):
        assert torch.equal(a, b), (a - b).abs().max()


def test_c_loop_equals_python_loop_dense(tmp_path, monkeypatch) -> None:
    from tests.tiny_models import build_tiny_llama

    # head_dim 32: the C decode attention's shapes (the shared tiny Llama's is 16)
    folder = build_tiny_llama(tmp_path, hidden_size=128, intermediate_size=256)
    config = EngineConfig(
        model_path=str(folder), dtype="float32", quantization="none", max_total_tokens=512
    )
    _compare(
        config,
        [[5, 9, 2], [7] * 11, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]],
        monkeypatch,
    )


@pytest.mark.parametrize("acts", ["int16", "int8"])
def test_c_loop_equals_python_loop_gguf(acts: str, monkeypatch) -> None:
    config = EngineConfig(
        dtype="float32", quantization="gguf", gguf_activations=acts, max_total_tokens=512
    )
    _compare(config, [[1, 2, 3, 4], [42] * 20, [100, 200, 300]], monkeypatch)


def test_c_loop_only_up_to_its_buffers_rows(monkeypatch) -> None:
    """A decode batch of more than MAX_ROWS sequences runs the Python loop (the C loop's
    buffers hold MAX_ROWS rows: a server's 33rd concurrent request once overran them)."""
    from types import SimpleNamespace

    if native_cpu.kernels(torch.float32) is None:
        pytest.skip(f"no kernels here: {native_cpu.describe()}")
    rank = load_rank(EngineConfig(dtype="float32", quantization="gguf", max_total_tokens=512))
    model, pool = rank.runner.model, rank.runner.pool
    attn = SimpleNamespace(c_decode_attention=True)
    batch = SimpleNamespace(is_decode=True)
    h = model.config.hidden_size
    rows = native_cpu.MAX_ROWS
    assert model._c_decode_layers(torch.zeros(rows, h), batch, pool, attn) is not None
    assert model._c_decode_layers(torch.zeros(rows + 1, h), batch, pool, attn) is None
