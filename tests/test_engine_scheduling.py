"""The engine under memory pressure: admission, preemption, no leaks, no hangs."""

from __future__ import annotations

import pytest

from pdcore.engine.page_allocator import PageAllocator
from pdcore.engine.request import RequestError
from pdcore.engine.sampling_params import SamplingParams
from pdcore.offline import Engine
from tests.hf_reference import PROMPTS

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def roomy(tiny_llama_dir) -> Engine:
    return Engine(
        model_path=str(tiny_llama_dir), dtype="float32", page_size=4, max_total_tokens=4096
    )


def test_tiny_pool_preempts_and_still_matches(tiny_llama_dir, roomy: Engine) -> None:
    # 8 requests of ~40-60 tokens each need ~400 tokens of KV; the pool holds 96.
    tight = Engine(
        model_path=str(tiny_llama_dir), dtype="float32", page_size=4, max_total_tokens=96
    )
    expected = [o["output_ids"] for o in roomy.generate(PROMPTS, GREEDY)]
    got = [o["output_ids"] for o in tight.generate(PROMPTS, GREEDY)]
    assert got == expected
    assert tight.core.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    assert tight.core.flush_cache()
    assert tight.core.get_load()["num_tokens"] == 0


def test_prompt_longer_than_the_pool_is_refused(tiny_llama_dir) -> None:
    engine = Engine(
        model_path=str(tiny_llama_dir), dtype="float32", page_size=4, max_total_tokens=32
    )
    assert engine.core.max_context_len == 32  # clamped to the pool
    with pytest.raises(RequestError, match="context length"):
        engine.core.add_request("r", list(range(40)), SamplingParams.from_dict(GREEDY))
    with pytest.raises(RequestError, match="empty"):
        engine.core.add_request("r2", [], SamplingParams.from_dict(GREEDY))


def test_abort_frees_pages_and_reports_abort(roomy: Engine) -> None:
    core = roomy.core
    core.add_request("a", roomy.tokenizer.encode(PROMPTS[1]), SamplingParams.from_dict(GREEDY))
    core.step()
    core.step()
    assert core.get_load()["num_tokens"] > 0
    assert core.abort_request("a")
    outs = core.step()
    assert [o.finish_reason["type"] for o in outs if o.rid == "a"] == ["abort"]
    assert core.flush_cache() and core.get_load()["num_tokens"] == 0


def test_stop_string_and_max_tokens_zero(roomy: Engine) -> None:
    first = roomy.generate(PROMPTS[0], GREEDY)
    text = first["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = roomy.generate(PROMPTS[0], {**GREEDY, "stop": [stop]})
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert text.startswith(cut["text"]) and stop not in cut["text"]
    none = roomy.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 0})
    assert none["output_ids"] == [] and none["meta_info"]["finish_reason"]["type"] == "length"


def test_seeded_sampling_is_reproducible(roomy: Engine) -> None:
    params = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7, "max_new_tokens": 12}
    a = roomy.generate(PROMPTS[2], params)["output_ids"]
    b = roomy.generate(PROMPTS[2], params)["output_ids"]
    assert a == b


def test_prefix_cache_hashes_chain_and_evicts() -> None:
    alloc = PageAllocator(num_pages=5, page_size=2)
    pages = alloc.allocate(2)
    h1 = alloc.publish(pages[0], 0, [1, 2])
    alloc.publish(pages[1], h1, [3, 4])
    alloc.release(pages)
    assert alloc.cached_prefix_len([1, 2, 3, 4, 5]) == 4
    assert alloc.cached_prefix_len([9, 2, 3, 4]) == 0  # same page, different parent
    matched, _ = alloc.match_prefix([1, 2, 3, 4, 5], max_pages=2)
    assert matched == pages
    alloc.release(matched)
    alloc.allocate(4)  # needs the two idle cached pages: evicts them
    assert alloc.num_cached() == 0 and alloc.num_available() == 0
