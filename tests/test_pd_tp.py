"""PD with tensor parallelism on each side, and different tp sizes on prefill and decode.

Unit level: the head plan (who sends which KV heads to whom) and the head-sliced runs, the
runs applied byte for byte between real KV pools. Process level (slow): `pdcore router` in
front of a prefill and a decode `pdcore serve` of different tp sizes, over nixl and
mooncake, greedy tokens equal to transformers', every rank empty after /flush_cache; and one
TP rank of a decode killed under load.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pdcore.disagg.kv_runs import KVLayout
from pdcore.disagg.messages import KVSpec
from pdcore.disagg.tp_plan import HeadSlice, RankHeads, head_runs, transfer_plan
from pdcore.model.kv_pool import KVPool
from pdcore.plugins import get_registry
from tests.conftest import free_port
from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model
from tests.server_helpers import ServerProcess, pid_alive, wait_until
from tests.test_router_helpers import RouterProcess, pd_flags

MAX_TOKENS = 6
START_TIMEOUT = 600.0
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}


def _heads(tp: int, kv: int) -> list[RankHeads]:
    """As pdcore.model.parallel.HeadShard places them."""
    if kv >= tp:
        return [RankHeads(r, r * (kv // tp), kv // tp) for r in range(tp)]
    return [RankHeads(r, r * kv // tp, 1) for r in range(tp)]


# --- the plan ------------------------------------------------------------------------------


def test_plan_prefill_tp2_to_decode_tp1_takes_half_from_each() -> None:
    assert transfer_plan(_heads(2, 2), _heads(1, 2)) == [
        HeadSlice(0, 0, 0, 1),
        HeadSlice(1, 0, 1, 1),
    ]


def test_plan_prefill_tp1_to_decode_tp2_slices_one_rank() -> None:
    assert transfer_plan(_heads(1, 2), _heads(2, 2)) == [
        HeadSlice(0, 0, 0, 1),
        HeadSlice(0, 1, 1, 1),
    ]


def test_plan_sends_a_replicated_head_once() -> None:
    # prefill tp 4 over 2 KV heads: ranks 0,1 hold head 0, ranks 2,3 head 1
    plan = transfer_plan(_heads(4, 2), _heads(1, 2))
    assert plan == [HeadSlice(0, 0, 0, 1), HeadSlice(2, 0, 1, 1)]
    # decode replicas each need their own copy, shared out among prefill replicas
    plan = transfer_plan(_heads(4, 2), _heads(4, 2))
    assert [(p.prefill_rank, p.decode_rank, p.head_start) for p in plan] == [
        (0, 0, 0),
        (1, 1, 0),
        (2, 2, 1),
        (3, 3, 1),
    ]


def test_plan_tp3_to_tp1_and_unbridgeable_heads() -> None:
    assert [p.prefill_rank for p in transfer_plan(_heads(3, 3), _heads(1, 3))] == [0, 1, 2]
    with pytest.raises(ValueError, match="no prefill rank holds KV head 2"):
        transfer_plan(_heads(1, 2), _heads(1, 3))


def test_spec_mismatch_names_both_sides_but_bridges_tp() -> None:
    pool = KVPool(2, 4, 4, 1, 8, torch.float32, torch.device("cpu"))
    wide = KVPool(2, 4, 4, 2, 8, torch.float32, torch.device("cpu"))
    p = KVSpec.from_pool("nixl", pool, tp_rank=1, tp_size=2, kv_head_start=1, total_kv_heads=2)
    assert p.mismatch(KVSpec.from_pool("nixl", wide).to_wire()) is None  # tp 2 vs tp 1
    other = KVPool(3, 4, 4, 2, 16, torch.bfloat16, torch.device("cpu"))
    why = p.mismatch(KVSpec.from_pool("nixl", other).to_wire())
    assert why is not None
    for part in ("layers: prefill 2, decode 3", "head dim: prefill 8, decode 16"):
        assert part in why
    assert "KV dtype: prefill 'float32', decode 'bfloat16'" in why


# --- the runs, applied between real pools ---------------------------------------------------


def _apply(runs) -> None:
    for src, dst, n in runs.tolist():
        ctypes.memmove(dst, src, n)


@pytest.mark.parametrize(
    ("ptp", "dtp", "kv"), [(2, 1, 2), (1, 2, 2), (4, 1, 2), (3, 1, 3), (1, 4, 2)]
)
def test_head_runs_move_exactly_each_ranks_heads(ptp: int, dtp: int, kv: int) -> None:
    layers, pages, ps, hd = 2, 6, 4, 8
    full_k = torch.randn(layers, pages, ps, kv, hd)
    full_v = torch.randn(layers, pages, ps, kv, hd)
    src_pages, dst_pages = [1, 2, 4], [5, 3, 1]

    def pools(tp: int, fill: bool) -> list[tuple[KVPool, RankHeads]]:
        out = []
        for h in _heads(tp, kv):
            pool = KVPool(layers, pages, ps, h.count, hd, torch.float32, torch.device("cpu"))
            if fill:
                pool.k.copy_(full_k[..., h.start : h.end, :])
                pool.v.copy_(full_v[..., h.start : h.end, :])
            else:
                pool.k.zero_()
                pool.v.zero_()
            out.append((pool, h))
        return out

    prefill, decode = pools(ptp, True), pools(dtp, False)
    for part in transfer_plan([h for _, h in prefill], [h for _, h in decode]):
        (sp, sh), (dp, dh) = prefill[part.prefill_rank], decode[part.decode_rank]
        _apply(
            head_runs(
                KVLayout.from_pool(sp),
                KVLayout.from_pool(dp),
                sh,
                dh,
                part,
                ps,
                src_pages,
                dst_pages,
            )
        )
    for pool, h in decode:
        for s, d in zip(src_pages, dst_pages):
            assert torch.equal(pool.k[:, d], full_k[:, s, :, h.start : h.end])
            assert torch.equal(pool.v[:, d], full_v[:, s, :, h.start : h.end])
        untouched = [p for p in range(pages) if p not in dst_pages]
        assert not pool.k[:, untouched].any() and not pool.v[:, untouched].any()


# --- real processes -------------------------------------------------------------------------


def _available(name: str) -> bool:
    return any(i.name == name and i.available for i in get_registry("transfer_backend").describe())


class PDTP:
    """Prefill instances of tp sizes `ptps` and decode instances of tp sizes `dtps` (all
    started at once), and a `pdcore router` per (prefill, decode) pair in `pairs`."""

    def __init__(
        self,
        model: Path | None,
        tmp: Path,
        backend: str,
        ptps: tuple[int, ...],
        dtps: tuple[int, ...],
        pairs: tuple[tuple[int, int], ...],
        env: dict[str, str] | None = None,
    ) -> None:
        env = {**ENV, **(env or {})}
        common = ["--backend", backend, "--cpu-threads", "1"]
        self.pairs, self.tmp = pairs, tmp
        self.boot = {tp: free_port() for tp in ptps}
        self.prefill = {
            tp: ServerProcess(
                model,
                tmp / f"prefill-tp{tp}.log",
                *common,
                "--tp-size",
                str(tp),
                "--disaggregation-mode",
                "prefill",
                "--disaggregation-bootstrap-port",
                str(self.boot[tp]),
                env=env,
            )
            for tp in ptps
        }
        self.decode = {
            tp: ServerProcess(
                model,
                tmp / f"decode-tp{tp}.log",
                *common,
                "--tp-size",
                str(tp),
                "--disaggregation-mode",
                "decode",
                env=env,
            )
            for tp in dtps
        }
        self.routers: dict[tuple[int, int], RouterProcess] = {}

    def start(self) -> PDTP:
        for server in [*self.prefill.values(), *self.decode.values()]:
            server.wait_ready(START_TIMEOUT)  # four servers start at once on 2 cores
        for ptp, dtp in self.pairs:
            p, d = self.prefill[ptp], self.decode[dtp]
            flags = pd_flags([(p.url, self.boot[ptp])], [d.url])
            log = self.tmp / f"router-p{ptp}-d{dtp}.log"
            self.routers[ptp, dtp] = RouterProcess(log, *flags, env={"PDCORE_PLUGINS": ""})
        for router in self.routers.values():
            router.wait_ready()
        return self

    def stop(self) -> None:
        for proc in [*self.routers.values(), *self.decode.values(), *self.prefill.values()]:
            proc.stop()


def _greedy_through(url: str, model_path: str | None) -> None:
    """8 concurrent prompts through the openai client equal transformers' greedy text."""
    from pdcore.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def complete(prompt: str) -> str:
        kwargs = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        return client.completions.create(**kwargs).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(complete, PROMPTS))
    ids = [tok.encode(p) for p in PROMPTS]
    want = hf_greedy(load_hf_model(model_path), ids, MAX_TOKENS, [tok.eos_token_id])
    assert sum(map(len, want)) > 3 * len(PROMPTS)  # not a vacuous pass
    for i, ref in enumerate(want):
        assert got[i] == tok.decode(ref, skip_special_tokens=True), f"prompt {i}"


def _flushed(url: str, tp: int) -> None:
    """After /flush_cache every TP rank holds 0 KV tokens and no transfer."""
    with httpx.Client(base_url=url, timeout=30) as client:
        assert wait_until(lambda: client.get("/get_load").json()[0]["num_reqs"] == 0, 30)
        assert wait_until(lambda: client.post("/flush_cache").status_code == 200, 10)
        load = client.get("/get_load").json()[0]
        assert load["tp_size"] == tp and load["num_tokens"] == 0
        assert [r["tp_rank"] for r in load["ranks"]] == list(range(tp))
        assert all(r["num_tokens"] == 0 and r["kv_transfers"] == 0 for r in load["ranks"]), load
        assert client.get("/server_info").json()["tp_size"] == tp


# Small heartbeats so the kill test's prefill notices a dead decode rank quickly.
FAST_FAULTS = {
    "PDCORE_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5",
    "PDCORE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
    "PDCORE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "10",
    "PDCORE_DISAGGREGATION_WAITING_TIMEOUT": "10",
}
PAIRS = ((2, 1), (1, 2))


@pytest.fixture(scope="module", params=["nixl", "mooncake"])
def tiny_pd(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PDTP]:
    """Per backend: prefills at tp 2 and 1, decodes at tp 1 and 2, a router per pair."""
    backend = request.param
    if not _available(backend):
        pytest.skip(f"the {backend} transfer backend is not available")
    tmp = tmp_path_factory.mktemp(f"pdtp-{backend}")
    pd = PDTP(tiny_llama_dir, tmp, backend, (2, 1), (1, 2), PAIRS, FAST_FAULTS)
    try:
        yield pd.start()
    finally:
        pd.stop()


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS, ids=["p2-d1", "p1-d2"])
def test_pd_across_tp_sizes_equals_transformers(
    tiny_pd: PDTP, pair: tuple[int, int], tiny_llama_dir: Path
) -> None:
    ptp, dtp = pair
    _greedy_through(tiny_pd.routers[pair].url, str(tiny_llama_dir))
    _flushed(tiny_pd.prefill[ptp].url, ptp)
    _flushed(tiny_pd.decode[dtp].url, dtp)


def _followers(server: ServerProcess) -> list[int]:
    match = re.search(r"local followers \[([\d, ]*)\]", server.log())
    assert match, server.log()
    return [int(p) for p in match.group(1).split(",") if p.strip()]


@pytest.mark.slow
def test_killing_a_decode_tp_rank_fails_clients_and_frees_prefill(tiny_pd: PDTP) -> None:
    """Runs last on each backend's deployment (it ends decode tp 2): a decode follower rank
    SIGKILLed while requests decode and others are still arriving."""
    router, prefill, decode = tiny_pd.routers[1, 2], tiny_pd.prefill[1], tiny_pd.decode[2]
    (follower,) = _followers(decode)
    results: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def call(tokens: int) -> None:
        body = {"text": "x", "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}
        try:
            r = httpx.post(router.url + "/generate", json=body, timeout=60)
            results.append((time.monotonic(), r.status_code))
        except httpx.HTTPError as exc:
            results.append((time.monotonic(), type(exc).__name__))

    def keep_arriving() -> None:
        while not stop.wait(0.2):
            call(4)

    long = [threading.Thread(target=call, args=(900,)) for _ in range(3)]
    arriving = threading.Thread(target=keep_arriving)
    for t in [*long, arriving]:
        t.start()
    assert wait_until(lambda: httpx.get(decode.url + "/get_load").json()[0]["num_reqs"] >= 3, 30)
    before = len(results)
    killed = time.monotonic()
    os.kill(follower, signal.SIGKILL)
    for t in long:
        t.join(30)
    stop.set()
    arriving.join(30)
    assert not any(t.is_alive() for t in [*long, arriving]), "a client hangs"
    after = results[before:]
    failed = [(at, st) for at, st in after if st != 200]
    assert len(failed) >= 3, after  # the three long requests, at least
    assert all(at - killed < 15 for at, _ in failed), (killed, after)
    assert wait_until(lambda: decode.proc.poll() is not None, 15), decode.log()
    assert decode.proc.returncode != 0 and not pid_alive(follower)
    # prefill lets go of everything: no request, no page, no transfer on any rank
    _flushed(prefill.url, 1)
    assert httpx.get(prefill.url + "/health", timeout=10).status_code == 200


@pytest.mark.slow
@pytest.mark.skipif(not _available("nixl"), reason="the nixl transfer backend is not installed")
def test_default_model_prefill_tp3_to_decode_tp1(tmp_path: Path) -> None:
    pd = PDTP(None, tmp_path, "nixl", (3,), (1,), ((3, 1),))
    try:
        pd.start()
        _greedy_through(pd.routers[3, 1].url, None)
        _flushed(pd.prefill[3].url, 3)
        _flushed(pd.decode[1].url, 1)
    finally:
        pd.stop()
