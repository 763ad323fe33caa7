"""The routing policies' choices and the prefix tree behind cache_aware, without processes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdcore.plugins import get_registry
from pdcore.router.policies import RouteRequest, Worker
from pdcore.router.policy_cache_aware import CacheAwarePolicy
from pdcore.router.policy_kv_aware import KvAwarePolicy, WorkerBlocks
from pdcore.router.policy_load import is_imbalanced, worker_load
from pdcore.router.policy_power_of_two import PowerOfTwoPolicy
from pdcore.router.policy_settings import PolicyOptions, policy_option
from pdcore.router.policy_tokens import block_hashes
from pdcore.router.prefix_tree import PrefixTree

pytestmark = pytest.mark.timeout(60)


def workers(n: int, **kw: Any) -> list[Worker]:
    return [Worker(url=f"http://w{i}:1", role="prefill", **kw) for i in range(n)]


def req(text: str = "", **body: Any) -> RouteRequest:
    return RouteRequest(body={"text": text, **body} if text else body, text=text)


# --- prefix tree -----------------------------------------------------------------------

texts = st.text(alphabet="abc", max_size=12)
ops = st.lists(st.tuples(texts, st.sampled_from(["t0", "t1", "t2"])), max_size=25)


def common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prefixes(strings: list[str]) -> set[str]:
    return {s[:k] for s in strings for k in range(1, len(s) + 1)}


@settings(max_examples=200, deadline=None)
@given(ops, texts)
def test_tree_matches_a_brute_force_model(inserts: list[tuple[str, str]], probe: str) -> None:
    tree, seen = PrefixTree(), {}
    for text, tenant in inserts:
        tree.insert(text, tenant)
        seen.setdefault(tenant, []).append(text)
    for tenant, strings in seen.items():
        # size = characters of the tenant's own trie: its distinct non-empty prefixes
        assert tree.size(tenant) == len(prefixes(strings))
        assert tree.match_tenant(probe, tenant) == max(common(probe, s) for s in strings)
    matched, tenant = tree.match(probe)
    best = max((common(probe, s) for ss in seen.values() for s in ss), default=0)
    assert matched == best
    if best:
        assert tenant is not None and tree.match_tenant(probe, tenant) == best


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(min_value=0, max_value=20))
def test_eviction_bounds_every_tenant_and_keeps_prefixes(
    inserts: list[tuple[str, str]], limit: int
) -> None:
    tree, seen = PrefixTree(), {}
    for text, tenant in inserts:
        tree.insert(text, tenant)
        seen.setdefault(tenant, []).append(text)
    tree.evict(limit)
    for tenant, strings in seen.items():
        assert tree.size(tenant) <= limit
        held = tree.held_texts(tenant)
        # what is left is real: prefixes of what was inserted, and sized exactly
        assert all(any(s.startswith(h) for s in strings) for h in held)
        assert tree.size(tenant) == len(prefixes(held))


@settings(max_examples=100, deadline=None)
@given(ops)
def test_remove_tenant_leaves_the_others(inserts: list[tuple[str, str]]) -> None:
    tree = PrefixTree()
    for text, tenant in inserts:
        tree.insert(text, tenant)
    before = {t: sorted(tree.held_texts(t)) for t in ("t1", "t2")}
    tree.remove_tenant("t0")
    assert tree.size("t0") == 0 and tree.held_texts("t0") == []
    assert {t: sorted(tree.held_texts(t)) for t in ("t1", "t2")} == before
    assert tree.match("a" * 12, allowed={"t0"}) == (0, None)


def test_eviction_drops_the_least_recently_used_first() -> None:
    tree = PrefixTree()
    tree.insert("aaaa", "w")
    tree.insert("bbbb", "w")
    tree.insert("cccc", "w")
    tree.match("aaaa")  # touched: now newer than bbbb
    assert tree.evict(8) == 4
    assert sorted(tree.held_texts("w")) == ["aaaa", "cccc"]
    tree.evict(2)  # partially trimmed leaves go whole, oldest first
    assert tree.size("w") <= 2


def test_match_respects_allowed_tenants_and_prefers_recent() -> None:
    tree = PrefixTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    assert tree.match("hello world!") == (11, "a")
    assert tree.match("hello world!", allowed={"b"}) == (6, "b")
    tree.insert("hello", "a")
    assert tree.match("hello", allowed={"a", "b"})[1] == "a"  # a used it last


def test_memory_stays_bounded_under_many_distinct_prompts() -> None:
    tree = PrefixTree()
    for i in range(2000):
        tree.insert(f"{i:06d}" + "x" * 50, "w")
        if i % 100 == 99:
            tree.evict(1000)
    assert tree.size("w") <= 1000 + 100 * 56


# --- settings --------------------------------------------------------------------------


def test_policy_options_defaults_are_sglangs() -> None:
    o = PolicyOptions()
    assert (o.cache_threshold, o.balance_abs_threshold, o.balance_rel_threshold) == (0.3, 64, 1.5)
    assert (o.eviction_interval_secs, o.max_tree_size) == (60.0, 2**26)
    assert policy_option(object(), "cache_threshold") == 0.3
    assert policy_option(SimpleNamespace(cache_threshold=0.9), "cache_threshold") == 0.9


def test_policies_are_registered() -> None:
    names = set(get_registry("routing_policy").names())
    assert {"power_of_two", "cache_aware", "kv_aware"} <= names


# --- power_of_two ----------------------------------------------------------------------


def test_power_of_two_picks_the_less_loaded_of_two() -> None:
    ws = workers(2)
    ws[0].in_flight, ws[1].in_flight = 5, 1
    policy = PowerOfTwoPolicy(seed=1)
    assert {policy.select(ws, req("x")) for _ in range(20)} == {1}
    ws[1].load = {"num_reqs": 9, "num_waiting_reqs": 0, "num_tokens": 0}  # reported beats ours
    assert {policy.select(ws, req("x")) for _ in range(20)} == {0}
    assert PowerOfTwoPolicy().select(ws[:1], req("x")) == 0


def test_power_of_two_never_picks_the_most_loaded_of_many() -> None:
    ws = workers(5)
    for i, w in enumerate(ws):
        w.in_flight = i
    policy = PowerOfTwoPolicy(seed=7)
    picks = [policy.select(ws, req()) for _ in range(500)]
    assert 4 not in picks and picks.count(0) > picks.count(3)


def test_load_and_imbalance() -> None:
    (w,) = workers(1, in_flight=3)
    assert worker_load(w) == 3
    w.load = {"num_reqs": 10}
    assert worker_load(w) == 10
    assert not is_imbalanced([10, 0], 64, 1.5)
    assert is_imbalanced([100, 10], 64, 1.5)
    assert not is_imbalanced([100, 90], 5, 1.5)


# --- cache_aware -----------------------------------------------------------------------


def test_cache_aware_keeps_a_prefix_on_one_worker_and_spreads_new_ones() -> None:
    policy, ws = CacheAwarePolicy(), workers(2)
    a, b = "A" * 1000, "B" * 1000
    first = policy.select(ws, req(a + "1"))
    assert policy.select(ws, req(b + "1")) == 1 - first  # the smaller tree
    for i in range(2, 9):
        assert policy.select(ws, req(a + str(i))) == first
        assert policy.select(ws, req(b + str(i))) == 1 - first


def test_cache_aware_threshold_and_imbalance() -> None:
    ws = workers(2)
    policy = CacheAwarePolicy(settings=SimpleNamespace(cache_threshold=0.9))
    assert policy.select(ws, req("shared-prefix-one")) == 0
    # 14/17 of the text matches worker 0, below 0.9: the smaller tree (worker 1) wins
    assert policy.select(ws, req("shared-prefix-two")) == 1
    policy = CacheAwarePolicy(settings=SimpleNamespace(balance_abs_threshold=2))
    assert policy.select(ws, req("P" * 100)) == 0
    ws[0].in_flight = 10  # imbalanced: 10 - 0 > 2 and 10 > 1.5 x 0
    assert policy.select(ws, req("P" * 100)) == 1


def test_cache_aware_only_matches_available_workers_and_forgets() -> None:
    policy, ws = CacheAwarePolicy(), workers(3)
    assert policy.select(ws, req("Z" * 50)) == 0
    assert policy.select(ws[1:], req("Z" * 50)) in (0, 1)  # worker 0 is out of rotation
    policy.forget(ws[0])
    assert policy.tree.size("http://w0:1") == 0


def test_cache_aware_evicts_lazily_without_a_background_task() -> None:
    opts = SimpleNamespace(max_tree_size=100, eviction_interval_secs=1e-9)
    policy, ws = CacheAwarePolicy(settings=opts), workers(1)
    for i in range(50):
        policy.select(ws, req(f"{i:03d}" + "q" * 40))
    assert policy.tree.size("http://w0:1") <= 100 + 43


def test_cache_aware_run_evicts_in_the_background() -> None:
    opts = SimpleNamespace(max_tree_size=10, eviction_interval_secs=0.01)
    policy, ws = CacheAwarePolicy(settings=opts), workers(1)

    async def scenario() -> None:
        task = asyncio.create_task(policy.run(httpx.AsyncClient(), lambda: ws))
        await asyncio.sleep(0)
        policy.select(ws, req("x" * 500))
        await asyncio.sleep(0.05)
        assert policy.tree.size("http://w0:1") <= 10
        task.cancel()

    asyncio.run(scenario())


# --- kv_aware --------------------------------------------------------------------------


class WordTokenizer:
    """Token ids = one id per character: enough to exercise the scoring."""

    def token_ids(self, body: dict[str, Any]) -> list[int] | None:
        text = body.get("text")
        return [ord(c) for c in text] if isinstance(text, str) else None


def kv_policy(**opts: Any) -> KvAwarePolicy:
    return KvAwarePolicy(settings=SimpleNamespace(**opts), tokenizer=WordTokenizer())  # type: ignore[arg-type]


def test_kv_aware_follows_reported_pages_and_weighs_load() -> None:
    policy, ws = kv_policy(kv_load_penalty_tokens=10), workers(2)
    prompt = "p" * 64 + "suffix"

    policy.blocks["http://w1:1"] = WorkerBlocks(16, set(block_hashes([ord(c) for c in prompt], 16)))
    assert policy.select(ws, req(prompt)) == 1  # 64 cached tokens
    ws[1].in_flight = 7  # 64 - 70 < 0 - 0
    assert policy.select(ws, req(prompt)) == 0


def test_kv_aware_pending_pages_keep_a_burst_together_until_they_expire() -> None:
    policy, ws = kv_policy(), workers(2)
    first = policy.select(ws, req("q" * 200 + "a"))
    second = policy.select(ws, req("q" * 200 + "b"))
    assert second == first  # not yet in any snapshot, but routed there a moment ago
    policy._expire(1e12)
    assert policy.pending == {}


def test_kv_aware_falls_back_to_cache_aware_without_token_ids() -> None:
    policy, ws = KvAwarePolicy(), workers(2)
    assert policy.tokenizer is None
    a = policy.select(ws, req("m" * 300 + "1"))
    assert policy.select(ws, req("m" * 300 + "2")) == a
    assert policy.fallback.tree.size(ws[a].url) > 0


def test_kv_aware_poll_reads_kv_cache_blocks_and_forgets_failures() -> None:
    ids = list(range(48))
    hashes = block_hashes(ids, 16)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "w2":
            raise httpx.ReadTimeout("busy", request=request)
        if request.url.host == "w0":
            blocks = [f"{h:016x}" for h in hashes[:2]]
            return httpx.Response(200, json={"page_size": 16, "blocks": blocks})
        return httpx.Response(503)

    policy, ws = kv_policy(), workers(3)
    policy.blocks["http://w2:1"] = WorkerBlocks(16, {hashes[0]})  # a busy worker keeps it

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await asyncio.gather(*(policy.poll(client, w) for w in ws))

    asyncio.run(scenario())
    assert set(policy.blocks) == {"http://w0:1", "http://w2:1"}
    assert policy.cached_tokens("http://w0:1", hashes, 0.0) == 32
    assert policy.cached_tokens("http://w1:1", hashes, 0.0) == 0
    policy.forget(ws[0])
    assert set(policy.blocks) == {"http://w2:1"}
