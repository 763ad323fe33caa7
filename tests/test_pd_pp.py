"""PD with pipeline parallelism: each prefill stage sends the KV of its own layers, and a
decode rank takes every layer it holds from whichever prefill stage holds it.

Unit level: the layer-and-head plan across pp and tp sizes, and its runs applied byte for
byte between real KV pools laid out as each rank of each grid holds them. Process level
(slow): `pdcore router` in front of a prefill `--pp-size 2` and decodes `--pp-size 1` and
`--pp-size 2` over nixl, greedy tokens equal to transformers', every rank of every side
empty after /flush_cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from pdcore.disagg.kv_runs import KVLayout
from pdcore.disagg.messages import KVSpec
from pdcore.disagg.tp_plan import HeadSlice, RankHeads, head_runs, transfer_plan
from pdcore.model.kv_pool import KVPool
from pdcore.model.pipeline_split import split_layers
from pdcore.plugins import get_registry
from tests.conftest import free_port
from tests.openai_parity import check_against_hf
from tests.server_helpers import ServerProcess, wait_until
from tests.test_router_helpers import RouterProcess, pd_flags

START_TIMEOUT = 600.0
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}


def _grid(pp: int, tp: int, layers: int, kv: int) -> list[RankHeads]:
    """Every rank of a pp x tp instance (rank = stage * tp + tp_rank), as
    pdcore.model.parallel.HeadShard and pipeline_split.split_layers place them."""
    out = []
    for stage, span in enumerate(split_layers(layers, pp)):
        for r in range(tp):
            start, count = (r * (kv // tp), kv // tp) if kv >= tp else (r * kv // tp, 1)
            out.append(RankHeads(stage * tp + r, start, count, span.start, len(span)))
    return out


# --- the plan ------------------------------------------------------------------------------


def test_plan_prefill_pp2_to_decode_pp1_takes_each_layer_from_its_stage() -> None:
    assert transfer_plan(_grid(2, 1, 2, 2), _grid(1, 1, 2, 2)) == [
        HeadSlice(0, 0, 0, 2, 0, 1),
        HeadSlice(1, 0, 0, 2, 1, 1),
    ]


def test_plan_prefill_pp1_to_decode_pp2_slices_one_rank_by_layer() -> None:
    assert transfer_plan(_grid(1, 1, 2, 2), _grid(2, 1, 2, 2)) == [
        HeadSlice(0, 0, 0, 2, 0, 1),
        HeadSlice(0, 1, 0, 2, 1, 1),
    ]


def test_plan_uneven_stages_and_tp_on_both_sides() -> None:
    # 5 layers: prefill stages 0..2 | 3..4, decode stages 0..1 | 2..3 | 4
    plan = transfer_plan(_grid(2, 1, 5, 2), _grid(3, 1, 5, 2))
    assert [(p.prefill_rank, p.decode_rank, p.layer_start, p.num_layers) for p in plan] == [
        (0, 0, 0, 2),
        (0, 1, 2, 1),
        (1, 1, 3, 1),
        (1, 2, 4, 1),
    ]
    # prefill pp 2 x tp 2 -> decode tp 1: one slice per (stage, KV head)
    plan = transfer_plan(_grid(2, 2, 2, 2), _grid(1, 1, 2, 2))
    assert [(p.prefill_rank, p.head_start, p.layer_start) for p in plan] == [
        (0, 0, 0),
        (1, 1, 0),
        (2, 0, 1),
        (3, 1, 1),
    ]


def test_plan_refuses_a_layer_no_prefill_rank_holds() -> None:
    with pytest.raises(ValueError, match="no prefill rank holds layer 2"):
        transfer_plan(_grid(2, 1, 2, 2), _grid(1, 1, 3, 2))


def test_spec_bridges_pp_sizes_but_not_models() -> None:
    cpu = torch.device("cpu")
    stage = KVPool(1, 4, 4, 2, 8, torch.float32, cpu)  # stage 1 of 2: layer 1 only
    whole = KVPool(2, 4, 4, 2, 8, torch.float32, cpu)
    p = KVSpec.from_pool("nixl", stage, pp_rank=1, pp_size=2, layer_start=1, total_layers=2)
    assert p.mismatch(KVSpec.from_pool("nixl", whole).to_wire()) is None
    deeper = KVPool(3, 4, 4, 2, 8, torch.float32, cpu)
    why = p.mismatch(KVSpec.from_pool("nixl", deeper).to_wire())
    assert why is not None and "layers: prefill 2, decode 3" in why
    # a peer that predates the pipeline fields: its num_layers is the model's
    assert p.mismatch({k: v for k, v in KVSpec.from_pool("nixl", whole).to_wire().items()
                       if k not in ("total_layers", "layer_start", "pp_rank", "pp_size")}) is None  # fmt: skip
    assert RankHeads.from_spec(p.to_wire()) == RankHeads(1, 0, 2, 1, 1)


# --- the runs, applied between real pools ---------------------------------------------------


def _apply(runs) -> None:
    for src, dst, n in runs.tolist():
        ctypes.memmove(dst, src, n)


@pytest.mark.parametrize(
    ("prefill", "decode", "layers"),
    [
        ((2, 1), (1, 1), 2),
        ((1, 1), (2, 1), 2),
        ((2, 2), (1, 1), 2),
        ((2, 1), (3, 2), 5),
        ((3, 1), (2, 2), 5),
        ((2, 2), (2, 1), 3),
    ],
    ids=["p-pp2-d-pp1", "p-pp1-d-pp2", "p-pp2tp2-d-1", "p-pp2-d-pp3tp2", "p-pp3-d-pp2tp2", "p-pp2tp2-d-pp2"],
)  # fmt: skip
def test_runs_move_exactly_each_ranks_layers_and_heads(
    prefill: tuple[int, int], decode: tuple[int, int], layers: int
) -> None:
    kv, pages, ps, hd = 2, 6, 4, 8
    full_k = torch.randn(layers, pages, ps, kv, hd)
    full_v = torch.randn(layers, pages, ps, kv, hd)
    src_pages, dst_pages = [1, 2, 4], [5, 3, 1]

    def pools(shape: tuple[int, int], fill: bool) -> dict[int, tuple[KVPool, RankHeads]]:
        out = {}
        for h in _grid(*shape, layers, kv):
            pool = KVPool(h.layers, pages, ps, h.count, hd, torch.float32, torch.device("cpu"))
            lo, hi = h.layer_start, h.layer_start + h.layers
            if fill:
                pool.k.copy_(full_k[lo:hi, ..., h.start : h.end, :])
                pool.v.copy_(full_v[lo:hi, ..., h.start : h.end, :])
            else:
                pool.k.zero_()
                pool.v.zero_()
            out[h.rank] = (pool, h)
        return out

    src, dst = pools(prefill, True), pools(decode, False)
    plan = transfer_plan([h for _, h in src.values()], [h for _, h in dst.values()])
    for part in plan:
        (sp, sh), (dp, dh) = src[part.prefill_rank], dst[part.decode_rank]
        layout = KVLayout.from_pool
        _apply(head_runs(layout(sp), layout(dp), sh, dh, part, ps, src_pages, dst_pages))
    for pool, h in dst.values():
        lo, hi = h.layer_start, h.layer_start + h.layers
        for s, d in zip(src_pages, dst_pages):
            assert torch.equal(pool.k[:, d], full_k[lo:hi, s, :, h.start : h.end])
            assert torch.equal(pool.v[:, d], full_v[lo:hi, s, :, h.start : h.end])
        untouched = [p for p in range(pages) if p not in dst_pages]
        assert not pool.k[:, untouched].any() and not pool.v[:, untouched].any()


# --- real processes -------------------------------------------------------------------------


def _available(name: str) -> bool:
    return any(i.name == name and i.available for i in get_registry("transfer_backend").describe())


class PDPP:
    """A prefill at `--pp-size 2`, decodes at each of `decode_pps`, a router per decode."""

    def __init__(self, model: Path, tmp: Path, decode_pps: tuple[int, ...]) -> None:
        common = ["--backend", "nixl", "--cpu-threads", "1"]
        self.tmp, self.boot = tmp, free_port()
        self.prefill = ServerProcess(
            model,
            tmp / "prefill-pp2.log",
            *common,
            *("--pp-size", "2", "--disaggregation-mode", "prefill"),
            *("--disaggregation-bootstrap-port", str(self.boot)),
            env=ENV,
        )
        self.decode = {
            pp: ServerProcess(
                model,
                tmp / f"decode-pp{pp}.log",
                *common,
                *("--pp-size", str(pp), "--disaggregation-mode", "decode"),
                env=ENV,
            )
            for pp in decode_pps
        }
        self.routers: dict[int, RouterProcess] = {}

    def start(self) -> PDPP:
        for server in [self.prefill, *self.decode.values()]:
            server.wait_ready(START_TIMEOUT)  # all start at once on 2 cores
        for pp, d in self.decode.items():
            flags = pd_flags([(self.prefill.url, self.boot)], [d.url])
            log = self.tmp / f"router-d{pp}.log"
            self.routers[pp] = RouterProcess(log, *flags, env={"PDCORE_PLUGINS": ""})
        for router in self.routers.values():
            router.wait_ready()
        return self

    def stop(self) -> None:
        """SIGTERM to all at once (each server's shutdown takes seconds on 2 cores), then
        reap each; `stop` kills whatever is still running after 20 s."""
        procs = [*self.routers.values(), *self.decode.values(), self.prefill]
        for proc in procs:
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(20)
            proc.stop()


@pytest.fixture(scope="module")
def pd_pp(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDPP]:
    if not _available("nixl"):
        pytest.skip("the nixl transfer backend is not available")
    pd = PDPP(tiny_llama_dir, tmp_path_factory.mktemp("pdpp"), (1, 2))
    try:
        yield pd.start()
    finally:
        pd.stop()


def _flushed(url: str, pp: int) -> None:
    """After /flush_cache every rank (every stage) holds 0 KV tokens and no transfer."""
    with httpx.Client(base_url=url, timeout=30) as client:
        assert wait_until(lambda: client.get("/get_load").json()[0]["num_reqs"] == 0, 30)
        assert wait_until(lambda: client.post("/flush_cache").status_code == 200, 10)
        load = client.get("/get_load").json()[0]
        assert (load["pp_size"], load["tp_size"], load["num_tokens"]) == (pp, 1, 0)
        assert [r["pp_rank"] for r in load["ranks"]] == list(range(pp))
        assert all(r["num_tokens"] == 0 and r["kv_transfers"] == 0 for r in load["ranks"]), load
        assert client.get("/server_info").json()["pp_size"] == pp


@pytest.mark.slow
@pytest.mark.parametrize("decode_pp", [1, 2], ids=["p-pp2-d-pp1", "p-pp2-d-pp2"])
def test_pd_with_prefill_pp2_equals_transformers(
    pd_pp: PDPP, decode_pp: int, tiny_llama_dir: Path
) -> None:
    """8 concurrent prompts through the router (openai client, stream and not, /generate
    ids) equal transformers' greedy tokens: decode's layer 1 can only have come from
    prefill's stage 1. Then both sides hold nothing on any rank."""
    check_against_hf(pd_pp.routers[decode_pp].url, str(tiny_llama_dir))
    _flushed(pd_pp.prefill.url, 2)
    _flushed(pd_pp.decode[decode_pp].url, decode_pp)
    log = pd_pp.prefill.log()
    assert "pipeline stage 1 of 2: layers 1..1, final norm + LM head" in log
