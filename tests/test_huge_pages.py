"""The streamed weights in transparent huge pages (pdcore/model/huge_pages.py): the copies
equal the originals and sit in one mapping the kernel was told to back with 2 MiB pages;
a model's decode weights move there at load, and nothing moves where THP is unavailable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdcore.model import huge_pages, native_cpu
from pdcore.model.huge_pages import HUGE_PAGE, huge_page_copies, thp_unavailable


def _smaps_field(t: torch.Tensor, field: str) -> str | None:
    """`field` of the /proc/self/smaps entry of the mapping holding `t`."""
    addr, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            inside = int(lo, 16) <= addr < int(hi, 16)
        elif inside and head == field + ":":
            return line.split(maxsplit=1)[1].strip()
    return None


def test_copies_equal_the_originals_in_one_aligned_mapping() -> None:
    originals = [
        torch.randint(0, 255, (3, 1000), dtype=torch.uint8),
        torch.randn(7, 33),
        torch.randn(5, 64, 16).to(torch.bfloat16),
        torch.arange(1, dtype=torch.int64),
    ]
    copies = huge_page_copies(originals)
    for o, c in zip(originals, copies):
        assert c.dtype == o.dtype and c.shape == o.shape and torch.equal(c, o)
        assert c.data_ptr() % 64 == 0
    if thp_unavailable() is not None:
        assert all(c is o for o, c in zip(originals, copies))
        return
    ptrs = [c.data_ptr() for c in copies]
    assert ptrs[0] % HUGE_PAGE == 0  # the mapping starts on a 2 MiB boundary
    assert ptrs == sorted(ptrs) and ptrs[-1] - ptrs[0] < HUGE_PAGE  # side by side
    originals[1].zero_()  # copies, not views of the originals
    assert copies[1].abs().sum() > 0


@pytest.mark.skipif(thp_unavailable() is not None, reason=str(thp_unavailable()))
def test_the_mapping_is_advised_for_huge_pages() -> None:
    (copy,) = huge_page_copies([torch.ones(3 * HUGE_PAGE, dtype=torch.uint8)])
    assert _smaps_field(copy, "THPeligible") == "1"
    assert (
        huge_pages.huge_page_bytes(copy)
        == int(_smaps_field(copy, "AnonHugePages").split()[0]) * 1024
    )  # type: ignore[union-attr]


def test_refuses_non_contiguous_tensors() -> None:
    if thp_unavailable() is not None:
        pytest.skip(str(thp_unavailable()))
    with pytest.raises(ValueError, match="contiguous"):
        huge_page_copies([torch.randn(4, 4).t()])


def _streamed(model) -> list[torch.Tensor]:
    return [
        getattr(layer, n).packed_weights()
        for layer in model.layers
        for n in ("qkv", "o_proj", "gate_up", "down")
    ]


def test_model_weights_move_at_load(tmp_path, monkeypatch) -> None:
    """A dense fp32 model's packed panels move into one advised mapping at load (where THP
    is available) and stay put where it is not; greedy tokens are the same either way."""
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
    monkeypatch.setattr("pdcore.model.llama.thp_unavailable", lambda: "test: off")
    stayed = Engine(**settings)
    a, b = (_streamed(e.core.runner.model) for e in (moved, stayed))
    for x, y in zip(a, b):
        assert torch.equal(x, y) and x.data_ptr() != y.data_ptr()
    if thp_unavailable() is None:
        assert _smaps_field(a[0], "THPeligible") == "1"
        span = a[-1].data_ptr() + a[-1].numel() * a[-1].element_size() - a[0].data_ptr()
        assert span < sum(t.numel() * t.element_size() + 64 for t in a)  # side by side
    prompt = [5, 9, 2, 7, 7, 1, 30, 4]
    out = [
        e.generate(input_ids=prompt, sampling_params=params)["output_ids"] for e in (moved, stayed)
    ]
    assert out[0] == out[1]


def test_zeros_are_zero_lazy_and_advised() -> None:
    """The KV pool's storage: zero-filled, the shape and dtype asked for, and (with THP)
    in an advised mapping of which nothing is committed before the first touch."""
    from pdcore.model.huge_pages import huge_page_zeros
    from pdcore.model.kv_pool import KVPool

    z = huge_page_zeros((3, 5, 7), torch.bfloat16)
    if thp_unavailable() is not None:
        assert z is None
        return
    assert z is not None and z.shape == (3, 5, 7) and z.dtype == torch.bfloat16
    assert not z.any() and z.data_ptr() % HUGE_PAGE == 0
    assert _smaps_field(z, "THPeligible") == "1"
    big = huge_page_zeros((64 * HUGE_PAGE // 4,), torch.float32)  # 64 pages of 2 MiB
    assert big is not None and _smaps_field(big, "Rss") == "0 kB"  # untouched: no RAM
    pool = KVPool(2, 9, 16, 3, 64, torch.float32, torch.device("cpu"))
    assert not pool.k[:, 0].any() and not pool.v[:, 0].any()  # the padding page
    assert _smaps_field(pool.k, "THPeligible") == "1"
