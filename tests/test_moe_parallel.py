"""Tensor and expert parallelism for the MoE families (tiny DeepseekV3 with MLA, tiny
Qwen3-MoE): `pdcore serve --tp-size 2 --ep-size 2` -- attention heads split as for Llama
(MLA: q / kv_b / o by head, the latent cache whole on every rank), the routed experts
split over the EP ranks with tokens dispatched and combined by gloo all-to-all, shared
experts and dense MLPs split by channel -- equals transformers' greedy tokens (fp32), and
the flags that cannot work are refused before any weight loads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdcore.settings import parse_serve_args
from tests.openai_parity import check_against_hf
from tests.server_helpers import ServerProcess


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit):
        parse_serve_args(list(argv))
    return capsys.readouterr().err


def test_invalid_moe_flags_are_refused_naming_the_flag(
    deepseek_dir: Path, qwen3_moe_dir: Path, tiny_llama_dir: Path, capsys
) -> None:
    ds = ["--model-path", str(deepseek_dir)]
    err = _refused(capsys, *ds, "--tp-size", "2", "--ep-size", "4")
    assert "--ep-size" in err and "must equal --tp-size 2" in err, err
    err = _refused(capsys, *ds, "--ep", "2")  # the alias; tp 1
    assert "--ep-size 2 must equal --tp-size 1" in err, err
    err = _refused(capsys, "--model-path", str(qwen3_moe_dir), "--tp", "3", "--ep", "3")
    assert "--ep-size: 8 routed experts are not divisible by --ep-size 3" in err, err
    err = _refused(capsys, "--model-path", str(tiny_llama_dir), "--tp", "2", "--ep", "2")
    assert "--ep-size" in err and "LlamaForCausalLM has no routed experts" in err, err
    err = _refused(capsys, *ds, "--moe-a2a-backend", "deepep")
    assert "--moe-a2a-backend: deepep needs DeepEP" in err and "NVSHMEM" in err, err
    assert "missing here" in err and "deep_ep" in err, err
    err = _refused(capsys, *ds, "--tp", "2", "--enable-dp-attention")
    assert "--enable-dp-attention: needs --dp-size > 1" in err, err
    dpa = [*ds, "--tp", "2", "--dp", "2", "--enable-dp-attention"]
    err = _refused(capsys, *dpa)
    assert "--enable-dp-attention" in err and "set --ep-size 2 (got 1)" in err, err
    err = _refused(capsys, *dpa[:-3], "--dp", "1", "--ep", "2", "--enable-dp-attention")
    assert "needs --dp-size > 1" in err, err
    err = _refused(capsys, *dpa, "--ep", "2", "--disaggregation-mode", "prefill")
    assert "--enable-dp-attention: PD" in err and "not built yet" in err, err
    err = _refused(capsys, "--model-path", str(tiny_llama_dir), *dpa[2:], "--ep", "2")
    assert "LlamaForCausalLM has no routed experts" in err, err
    # what works parses
    for argv in (["--tp", "2", "--ep", "2"], ["--tp", "2"], ["--moe-a2a-backend", "none"]):
        settings = parse_serve_args([*ds, *argv])
        assert settings.engine_config().ep_size == settings.ep_size
    settings = parse_serve_args([*dpa, "--ep", "2"])
    assert settings.attention_tp_size == 1 and settings.engine_procs_per_node == 2
    assert settings.engine_config().enable_dp_attention


@pytest.fixture(
    scope="module",
    params=[
        ("DeepseekV3ForCausalLM", "2"),
        ("Qwen3MoeForCausalLM", "2"),
        ("DeepseekV3ForCausalLM", "1"),
        ("DeepseekV3ForCausalLM", "dp-attention"),
        ("Qwen3MoeForCausalLM", "dp-attention"),
    ],
    ids=[
        "deepseek-tp2-ep2",
        "qwen3moe-tp2-ep2",
        "deepseek-tp2-ep1",
        "deepseek-tp2-dp2-ep2-dpattn",
        "qwen3moe-tp2-dp2-ep2-dpattn",
    ],
)
def tp_server(
    request: pytest.FixtureRequest,
    deepseek_dir: Path,
    qwen3_moe_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str, Path, ServerProcess]]:
    arch, ep = request.param
    folder = deepseek_dir if arch.startswith("Deepseek") else qwen3_moe_dir
    log = tmp_path_factory.mktemp("server") / "server.log"
    flags: tuple[str, ...] = ("--tp-size", "2", "--ep-size", ep, "--cpu-threads", "1")
    if ep == "dp-attention":  # each dp rank attends over its own batch; experts over both
        flags = ("--tp-size", "2", "--dp-size", "2", "--ep-size", "2", "--enable-dp-attention")
        flags += ("--cpu-threads", "1")
    server = ServerProcess(folder, log, *flags)
    try:
        server.wait_ready(600)
        yield arch, ep, folder, server
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_tp_ep_greedy_equals_transformers(tp_server) -> None:
    arch, ep, folder, server = tp_server
    info = httpx.get(server.url + "/server_info", timeout=10).json()
    assert info["architecture"] == arch
    if ep == "dp-attention":
        assert (info["tp_size"], info["dp_size"], info["ep_size"]) == (2, 2, 2)
        assert info["enable_dp_attention"] and info["attention_tp_size"] == 1
    else:
        assert (info["tp_size"], info["dp_size"], info["ep_size"]) == (2, 1, int(ep))
    check_against_hf(server.url, str(folder))
    loads = httpx.get(server.url + "/get_load", timeout=10).json()
    if ep == "dp-attention":  # two dp ranks, each its own scheduler, both were used
        assert [load["dp_rank"] for load in loads] == [0, 1], loads
        assert all(load["num_reqs"] == 0 for load in loads), loads
        before = _states(server)
        assert all(s["num_forward_steps"] > 0 for s in before), before
        # One request: its dp rank runs 4 passes (prefill + 3 decodes); the other rank has
        # no batch, so it must run an idle pass for each (its experts serve the tokens).
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}
        assert httpx.post(server.url + "/generate", json=body, timeout=60).status_code == 200
        after = _states(server)
        ran = [a["num_forward_steps"] - b["num_forward_steps"] for a, b in zip(after, before)]
        idle = [a["num_idle_passes"] - b["num_idle_passes"] for a, b in zip(after, before)]
        busy = ran.index(max(ran))
        assert ran[busy] == 4 and ran[1 - busy] == 0, ran
        assert idle[1 - busy] == 4 and idle[busy] == 0, idle
    else:
        load = loads[0]
        assert load["num_reqs"] == 0 and [r["tp_rank"] for r in load["ranks"]] == [0, 1]


def _states(server: ServerProcess) -> list[dict]:
    return httpx.get(server.url + "/server_info", timeout=10).json()["internal_states"]


def _ep_rank(rank: int, port: int, out: str) -> None:
    import torch

    from pdcore.model.moe import Experts
    from pdcore.model.parallel import init_tp_group

    tp = init_tp_group(rank, 2, f"127.0.0.1:{port}", "127.0.0.1", 60, torch.device("cpu"))
    torch.manual_seed(0)
    state = {}
    for e in range(8):
        for name, shape in (("gate", (16, 8)), ("up", (16, 8)), ("down", (8, 16))):
            state[f"x.{e}.{name}_proj.weight"] = torch.randn(shape)
    x, ids = torch.randn(7, 8), torch.randint(0, 8, (7, 2))
    weights = torch.rand(7, 2)

    def same(t: torch.Tensor) -> torch.Tensor:
        return t

    whole = Experts.from_state(state, "x.", 8, same)
    ep = Experts.from_state(state, "x.", 8, same, tp, ep=True)
    by_channel = Experts.from_state(state, "x.", 8, same, tp, ep=False)
    assert ep.first == 4 * rank and len(ep.experts) == 4 and ep.ep is tp
    assert by_channel.experts[0].down.weight.shape == (8, 8)  # half of every expert
    want = whole(x, ids, weights)
    got_ep = tp.all_reduce(ep(x, ids, weights))
    got_channel = tp.all_reduce(by_channel(x, ids, weights))
    torch.save({"want": want, "ep": got_ep, "channel": got_channel}, f"{out}/{rank}.pt")
    tp.close()


def test_expert_parallel_all_to_all_equals_one_rank(tmp_path: Path) -> None:
    """Two real gloo ranks: tokens dispatched to their experts' ranks and combined back
    equal the experts run on one rank; so do the experts split by channel."""
    import torch
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(_ep_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(r["ep"], r["want"], rtol=0, atol=0)  # the same sums
        torch.testing.assert_close(r["channel"], r["want"])
