"""PD for the tiny DeepseekV3 (MLA): router -> prefill -> nixl or mooncake -> decode, all
real processes. Greedy tokens equal transformers' (fp32), both sides hold 0 KV tokens
after /flush_cache, and the bytes a request moves are its latent cache -- (kv_lora_rank +
qk_rope_head_dim) x layers x tokens x 4 bytes -- not per-head K and V. A handshake between
an MLA prefill and a per-head-K/V decode is refused, naming both sides."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from pdcore.disagg.kv_runs import KVLayout, TransferError, kv_page_runs
from pdcore.disagg.messages import KVSpec
from pdcore.model.kv_pool import KVPool, MLAKVPool
from pdcore.plugins import get_registry
from tests.conftest import free_port
from tests.openai_parity import check_against_hf
from tests.server_helpers import ManagedProcess, ServerProcess, wait_until
from tests.test_pd_e2e import ENV, PDDeployment
from tests.test_router_helpers import RouterProcess, pd_flags

# the tiny model (tests/tiny_models.py): 3 layers, kv_lora_rank 32, qk_rope_head_dim 16
LAYERS, LATENT, ROPE = 3, 32, 16
PAGE = 4  # small pages: a request's pages hold few tokens past its prompt


def _available(name: str) -> bool:
    return any(i.name == name and i.available for i in get_registry("transfer_backend").describe())


# --- the spec and the runs ------------------------------------------------------------------


def test_spec_carries_the_layout_and_a_mismatch_names_both_sides() -> None:
    cpu = torch.device("cpu")
    mla = KVSpec.from_pool("nixl", MLAKVPool(LAYERS, 4, PAGE, LATENT, ROPE, torch.float32, cpu))
    assert (mla.kv_layout, mla.kv_lora_rank, mla.rope_dim) == ("mla", LATENT, ROPE)
    assert (mla.kv_heads, mla.head_dim) == (1, LATENT + ROPE)
    assert mla.mismatch(mla.to_wire()) is None
    mha = KVSpec.from_pool("nixl", KVPool(LAYERS, 4, PAGE, 1, LATENT + ROPE, torch.float32, cpu))
    assert mha.kv_layout == "mha" and mha.kv_lora_rank == 0
    why = mla.mismatch(mha.to_wire())
    assert why is not None and "KV layout: prefill 'mla', decode 'mha'" in why, why
    assert "MLA kv_lora_rank: prefill 32, decode 0" in why, why
    other = MLAKVPool(LAYERS, 4, PAGE, 16, 32, torch.float32, cpu)  # same entry, other split
    why = mla.mismatch(KVSpec.from_pool("nixl", other).to_wire())
    assert why is not None and "MLA rope dim: prefill 16, decode 32" in why, why
    # a peer from before the field existed is "mha"
    old = {k: v for k, v in mha.to_wire().items() if k not in ("kv_layout", "rope_dim")}
    assert "KV layout: prefill 'mla', decode 'mha'" in (mla.mismatch(old) or "")


def test_mla_runs_move_one_latent_buffer() -> None:
    cpu = torch.device("cpu")
    src = MLAKVPool(LAYERS, 6, PAGE, LATENT, ROPE, torch.float32, cpu)
    dst = MLAKVPool(LAYERS, 6, PAGE, LATENT, ROPE, torch.float32, cpu)
    src.k.normal_()
    dst.k.zero_()
    a, b = KVLayout.from_pool(src), KVLayout.from_pool(dst)
    assert a.v_addr == 0 and len(a.regions()) == 1
    runs = kv_page_runs(a, b, [1, 2], [4, 5])
    assert int(runs[:, 2].sum()) == LAYERS * 2 * PAGE * (LATENT + ROPE) * 4
    import ctypes

    for s, d, n in runs.tolist():
        ctypes.memmove(d, s, n)
    assert torch.equal(dst.k[:, 4:6], src.k[:, 1:3]) and not dst.k[:, :4].any()
    mha = KVPool(LAYERS, 6, PAGE, 1, LATENT + ROPE, torch.float32, cpu)
    with pytest.raises(TransferError, match=r"local one latent buffer \(mla\), remote K and V"):
        kv_page_runs(a, KVLayout.from_pool(mha), [1], [1])


# --- real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["nixl", "mooncake"])
def mla_pd(
    request: pytest.FixtureRequest, deepseek_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, PDDeployment]]:
    backend = request.param
    if not _available(backend):
        pytest.skip(f"the {backend} transfer backend is not available")
    flags = ("--page-size", str(PAGE), "--cpu-threads", "1")
    d = PDDeployment(
        deepseek_dir, tmp_path_factory.mktemp(f"pd-mla-{backend}"), backend, common_args=flags
    )
    try:
        yield backend, d.start()
    finally:
        d.stop()


def _counter(url: str, name: str, backend: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf'^{name}{{backend="{backend}"}} (\S+)$', text, re.M)
    assert match, f"no {name} for {backend} in /metrics:\n{text}"
    return float(match.group(1))


def _flushed(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert wait_until(lambda: client.get("/get_load").json()[0]["num_reqs"] == 0, 30)
        assert wait_until(lambda: client.post("/flush_cache").status_code == 200, 10)
        assert client.get("/get_load").json()[0]["num_tokens"] == 0


@pytest.mark.slow
def test_mla_pd_equals_transformers_and_moves_the_latent_cache(
    mla_pd: tuple[str, PDDeployment], deepseek_dir: Path
) -> None:
    backend, d = mla_pd
    assert d.router is not None
    check_against_hf(d.router.url, str(deepseek_dir))
    _flushed(d.prefill.url)
    _flushed(d.decode.url)
    # One more request, alone: the bytes both sides count for it are its whole pages of
    # latent cache, one buffer per layer (per-head K/V would be 2 x 4 heads x (16+16|16)).
    sent = _counter(d.prefill.url, "pdcore_kv_transfer_bytes", backend)
    got = _counter(d.decode.url, "pdcore_kv_transfer_bytes", backend)
    prompt = list(range(100, 111))  # 11 tokens: 3 pages of 4
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 2}}
    r = httpx.post(d.router.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    pages = -(-len(prompt) // PAGE)
    latent_bytes = (LATENT + ROPE) * LAYERS * pages * PAGE * 4
    assert wait_until(
        lambda: _counter(d.prefill.url, "pdcore_kv_transfer_bytes", backend) > sent, 10
    )
    assert _counter(d.prefill.url, "pdcore_kv_transfer_bytes", backend) - sent == latent_bytes
    assert wait_until(lambda: _counter(d.decode.url, "pdcore_kv_transfer_bytes", backend) > got, 10)
    assert _counter(d.decode.url, "pdcore_kv_transfer_bytes", backend) - got == latent_bytes
    _flushed(d.prefill.url)
    _flushed(d.decode.url)


class _Pair:
    """A prefill and a decode `pdcore serve` over nixl (each its own model and flags) and
    a `pdcore router` in front; every process stopped on exit."""

    def __init__(self, tmp: Path, prefill: tuple, decode: tuple) -> None:
        self.tmp, self.boot = tmp, free_port()
        common = ("--backend", "nixl", "--cpu-threads", "1", "--disaggregation-mode")
        self.procs: list[ManagedProcess] = [
            ServerProcess(
                prefill[0],
                tmp / "prefill.log",
                *common,
                "prefill",
                "--disaggregation-bootstrap-port",
                str(self.boot),
                *prefill[1:],
                env=ENV,
            ),
            ServerProcess(decode[0], tmp / "decode.log", *common, "decode", *decode[1:], env=ENV),
        ]
        self.prefill, self.decode = self.procs[0], self.procs[1]

    def __enter__(self) -> RouterProcess:
        try:
            for proc in self.procs:
                proc.wait_ready(600)  # generous: these machines are often shared
            flags = pd_flags([(self.prefill.url, self.boot)], [self.decode.url])
            router = RouterProcess(self.tmp / "router.log", *flags, env={"PDCORE_PLUGINS": ""})
            self.procs.append(router)
            return router.wait_ready()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.mark.slow
@pytest.mark.skipif(not _available("nixl"), reason="the nixl transfer backend is not installed")
def test_mla_prefill_refuses_a_per_head_kv_decode(
    deepseek_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A DeepseekV3 prefill and a Llama decode (same tokenizer): the handshake refuses, and
    the client's error names the layout of both sides."""
    pair = _Pair(tmp_path, (deepseek_dir,), (tiny_llama_dir,))
    with pair as router:
        r = httpx.post(router.url + "/generate", json={"text": "hello"}, timeout=120)
        assert r.status_code >= 500
        message = r.json()["error"]["message"]
        assert "KV layout: prefill 'mla', decode 'mha'" in message, message
        _flushed(pair.prefill.url)
        _flushed(pair.decode.url)


def test_mla_latent_is_sent_once_per_decode_rank() -> None:
    """With TP every rank holds the whole latent cache (one replicated KV "head"): each
    decode rank gets it from one prefill rank, whatever the prefill tp size."""
    from pdcore.disagg.tp_plan import RankHeads, transfer_plan

    def ranks(tp: int) -> list[RankHeads]:
        return [RankHeads(r, 0, 1) for r in range(tp)]

    assert [(p.prefill_rank, p.decode_rank) for p in transfer_plan(ranks(2), ranks(1))] == [(0, 0)]
    plan = transfer_plan(ranks(2), ranks(2))
    assert [(p.prefill_rank, p.decode_rank) for p in plan] == [(0, 0), (1, 1)]
    assert [(p.prefill_rank, p.decode_rank) for p in transfer_plan(ranks(1), ranks(2))] == [
        (0, 0),
        (0, 1),
    ]


@pytest.mark.slow
@pytest.mark.skipif(not _available("nixl"), reason="the nixl transfer backend is not installed")
def test_mla_pd_prefill_tp2_ep2_to_decode_tp1(deepseek_dir: Path, tmp_path: Path) -> None:
    """Prefill at --tp-size 2 --ep-size 2, decode at tp 1: greedy tokens equal
    transformers', and a request moves its latent cache once (one decode rank), not once
    per prefill rank."""
    page = ("--page-size", str(PAGE))
    pair = _Pair(tmp_path, (deepseek_dir, *page, "--tp", "2", "--ep", "2"), (deepseek_dir, *page))
    with pair as router:
        check_against_hf(router.url, str(deepseek_dir))
        url = pair.prefill.url
        sent = _counter(url, "pdcore_kv_transfer_bytes", "nixl")
        prompt = list(range(100, 111))
        body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 2}}
        assert httpx.post(router.url + "/generate", json=body, timeout=120).status_code == 200
        latent_bytes = (LATENT + ROPE) * LAYERS * -(-len(prompt) // PAGE) * PAGE * 4
        assert wait_until(lambda: _counter(url, "pdcore_kv_transfer_bytes", "nixl") > sent, 10)
        assert _counter(url, "pdcore_kv_transfer_bytes", "nixl") - sent == latent_bytes
        _flushed(pair.prefill.url)
        _flushed(pair.decode.url)
