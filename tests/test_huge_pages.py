"""The streamed weights in transparent huge pages (pdcore/model/huge_pages.py): the copies
equal the originals and sit side by side in one mapping the kernel was told to back with
huge pages; a model's decode weights (dense panels, GGUF blocks, the LM head) move there at
load, greedy tokens unchanged; nothing moves where THP is unavailable or refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdcore.model import huge_pages, native_cpu
from pdcore.model.huge_pages import huge_page_size, move_to_huge_pages, thp_unavailable

needs_thp = pytest.mark.skipif(thp_unavailable() is not None, reason=str(thp_unavailable()))


def _smaps_field(t: torch.Tensor, field: str) -> str | None:
    """`field` of the /proc/self/smaps entry (a VMA) holding `t`."""
    addr, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            inside = int(lo, 16) <= addr < int(hi, 16)
        elif inside and head == field + ":":
            return line.split(maxsplit=1)[1].strip()
    return None


def _move(originals: list[torch.Tensor]) -> tuple[int, list[torch.Tensor | None]]:
    copies: list[torch.Tensor | None] = [None] * len(originals)

    def replace(i: int, copy: torch.Tensor) -> None:
        copies[i] = copy

    return move_to_huge_pages(len(originals), originals.__getitem__, replace), copies


@needs_thp
def test_copies_equal_the_originals_side_by_side_in_an_advised_mapping() -> None:
    originals = [
        torch.randint(0, 255, (3, 1000), dtype=torch.uint8),
        torch.randn(7, 33),
        torch.randn(5, 64, 16).to(torch.bfloat16),
        torch.arange(1, dtype=torch.int64),
    ]
    moved, copies = _move(originals)
    assert moved == sum(t.nbytes for t in originals)
    for o, c in zip(originals, copies):
        assert c is not None and c.dtype == o.dtype and c.shape == o.shape and torch.equal(c, o)
        assert c.data_ptr() % 64 == 0 and c.data_ptr() != o.data_ptr()
    ptrs = [c.data_ptr() for c in copies if c is not None]
    assert ptrs[0] % huge_page_size() == 0  # the mapping starts on a huge page boundary
    assert ptrs == sorted(ptrs) and ptrs[-1] - ptrs[0] < 64 * 1024  # side by side
    assert _smaps_field(copies[0], "THPeligible") == "1"  # type: ignore[arg-type]


def test_nothing_moves_without_thp_or_when_the_advice_is_refused(monkeypatch) -> None:
    originals = [torch.randn(4, 4)]
    monkeypatch.setattr(huge_pages, "thp_unavailable", lambda: "test: off")
    assert _move(originals) == (0, [None])
    monkeypatch.undo()
    monkeypatch.setattr(huge_pages, "_advised_arena", lambda nbytes: None)
    assert _move(originals) == (0, [None])


def test_refuses_non_contiguous_tensors() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        _move([torch.randn(4, 4).t()])


def _streamed(model) -> list[torch.Tensor]:
    return [
        lin.weight.packed if hasattr(lin.weight, "packed") else lin.packed_weights()
        for lin in model.streamed_linears()
    ]


def _check_moved(model) -> None:
    """Every streamed tensor (layers, then the LM head) in one advised mapping, in order."""
    tensors = _streamed(model)
    for t in tensors:
        assert _smaps_field(t, "THPeligible") == "1"
    first, last = tensors[0], tensors[-1]
    span = last.data_ptr() + last.nbytes - first.data_ptr()
    assert 0 < span <= sum(t.nbytes + 64 for t in tensors)


@needs_thp
def test_dense_model_weights_move_at_load(tmp_path, monkeypatch) -> None:
    """A dense fp32 model's packed panels (Linear): moved at load; the greedy tokens equal
    those of the same model left in 4 KiB pages."""
    if native_cpu.kernels(torch.float32) is None:
        pytest.skip(f"no kernels here: {native_cpu.describe()}")
    from pdcore.offline import Engine
    from tests.tiny_models import build_tiny_llama

    folder = build_tiny_llama(tmp_path, hidden_size=128, intermediate_size=256)
    settings = dict(
        model_path=str(folder), dtype="float32", quantization="none", max_total_tokens=512
    )
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    moved = Engine(**settings)
    _check_moved(moved.core.runner.model)
    monkeypatch.setattr(huge_pages, "thp_unavailable", lambda: "test: off")
    stayed = Engine(**settings)
    for a, b in zip(_streamed(moved.core.runner.model), _streamed(stayed.core.runner.model)):
        assert torch.equal(a, b)
    assert _smaps_field(_streamed(stayed.core.runner.model)[0], "THPeligible") != "1" or (
        "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    )
    prompt = [5, 9, 2, 7, 7, 1, 30, 4]
    out = [e.generate(input_ids=prompt, sampling_params=params) for e in (moved, stayed)]
    assert out[0]["output_ids"] == out[1]["output_ids"]


@needs_thp
def test_gguf_blocks_and_lm_head_move_at_load() -> None:
    """The default model's GGUF blocks (QuantLinear) and its Q8_0 LM head."""
    if native_cpu.kernels(torch.float32) is None:
        pytest.skip(f"no kernels here: {native_cpu.describe()}")
    from pdcore.engine.config import EngineConfig
    from pdcore.engine.tp_worker import load_rank

    model = load_rank(
        EngineConfig(dtype="float32", quantization="gguf", max_total_tokens=512)
    ).runner.model
    _check_moved(model)
