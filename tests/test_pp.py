"""Pipeline parallelism: the layer split, the flag rules, the stages' logits against one
process (pp 2..4, and pp x tp grids), and real `pdcore serve --pp-size 2` servers (one layer
per stage of the tiny random Llama; with `--tp-size 2` as well) compared with transformers,
plus a stage killed under load."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest

from pdcore.model.pipeline_split import split_layers
from tests.openai_parity import check_against_hf
from tests.server_helpers import (
    ServerProcess,
    assert_kill_under_load_fails_fast,
    start_two_nodes,
    wait_until,
)


def test_layers_split_contiguously_and_evenly() -> None:
    assert split_layers(2, 2) == [range(0, 1), range(1, 2)]
    assert split_layers(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert split_layers(7, 1) == [range(0, 7)]
    for layers in range(1, 40):
        for pp in range(1, layers + 1):
            parts = split_layers(layers, pp)
            assert [i for r in parts for i in r] == list(range(layers))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        split_layers(2, 3)


def test_micro_batches_cut_by_sequence_and_keep_the_logits_order() -> None:
    import torch

    from pdcore.model.forward_batch import ForwardBatch
    from pdcore.model.pipeline_split import micro_batches

    # 5 sequences of 2, 1, 3, 1, 2 new tokens; the 3rd is a prompt chunk (no logits row)
    extend = [2, 1, 3, 1, 2]
    batch = ForwardBatch(
        is_decode=False,
        input_ids=torch.arange(100, 109),
        positions=torch.arange(9),
        out_slots=torch.arange(9) + 40,
        seq_lens=[4, 1, 9, 2, 2],
        extend_lens=extend,
        page_tables=[[1], [2], [3, 4, 5], [6], [7]],
        logits_indices=torch.tensor([1, 2, 6, 8]),
        page_size=4,
    )
    parts = micro_batches(batch, 2)
    assert [p.extend_lens for p in parts] == [[2, 1, 3], [1, 2]]
    assert [p.logits_indices.tolist() for p in parts] == [[1, 2], [0, 2]]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert torch.equal(torch.cat([p.out_slots for p in parts]), batch.out_slots)
    assert [t for p in parts for t in p.page_tables] == batch.page_tables
    assert [len(p.extend_lens) for p in micro_batches(batch, 4)] == [2, 1, 1, 1]
    assert micro_batches(batch, 1) == [batch]
    assert len(micro_batches(batch, 9)) == 5  # at most one sequence each


@pytest.fixture(scope="module")
def llama5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama of 5 layers (uneven splits: 3+2, 2+2+1, 2+1+1+1), untied LM head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama5")
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    LlamaForCausalLM(config).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


def _pipeline_logits(model_dir: Path, pp: int, steps: list, tp: int = 1) -> list:
    """Run `steps` through `pp` stages of `tp` TP ranks each (threads of this process, real
    gloo groups, the engine's PipelineRunner and StageWorkers); world rank 0's logits of
    each step."""
    import torch

    from pdcore.engine.config import EngineConfig
    from pdcore.engine.pp_stage import StageWorker, load_stage
    from pdcore.engine.tp_worker import load_rank
    from pdcore.model.pipeline_split import init_pipeline_grid
    from tests.conftest import free_port

    settings = EngineConfig(
        model_path=str(model_dir), dtype="float32", max_total_tokens=64, page_size=4, tp_size=tp
    )
    if pp == 1:
        runner = load_rank(settings).runner
        return [runner.run(batch) for batch in steps]
    port, cpu = free_port(), torch.device("cpu")
    results: list = []
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            grid = init_pipeline_grid(rank, pp, tp, f"127.0.0.1:{port}", "127.0.0.1", 60, cpu)
            if rank > 0:
                StageWorker(settings, grid).run()
                grid.close()
                return
            runner = load_stage(settings, grid).runner
            results.extend(runner.run(batch) for batch in steps)
            assert runner.broadcaster is not None
            runner.broadcaster.stop()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(pp * tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


def _steps() -> list:
    """3 sequences prefilled (one of them a first chunk without logits), then decoded."""
    import torch

    from pdcore.model.forward_batch import ForwardBatch

    tables = [[1, 2], [3, 4], [5, 6]]

    def step(decode: bool, spans: list[range], rows: list[int]) -> ForwardBatch:
        ids, pos, slots = [], [], []
        for table, span in zip(tables, spans):
            for p in span:
                ids.append(10 + 7 * p % 200)
                pos.append(p)
                slots.append(table[p // 4] * 4 + p % 4)
        return ForwardBatch(
            is_decode=decode,
            input_ids=torch.tensor(ids),
            positions=torch.tensor(pos),
            out_slots=torch.tensor(slots),
            seq_lens=[s.stop for s in spans],
            extend_lens=[len(s) for s in spans],
            page_tables=tables,
            logits_indices=torch.tensor(rows),
            page_size=4,
        )

    return [
        step(False, [range(0, 5), range(0, 3), range(0, 4)], [4, 7]),  # 3rd: a chunk
        step(False, [range(5, 6), range(3, 4), range(4, 6)], [0, 1, 3]),
        step(True, [range(6, 7), range(4, 5), range(6, 7)], [0, 1, 2]),
    ]


@pytest.mark.parametrize(
    ("pp", "tp"),
    [(2, 1), (3, 1), (4, 1), (2, 2), (3, 2)],
    ids=["pp2", "pp3", "pp4", "pp2-tp2", "pp3-tp2"],
)
def test_pipeline_stages_compute_what_one_process_computes(
    llama5_dir: Path, pp: int, tp: int
) -> None:
    """The logits of one process, at every split of the 5 layers (3+2, 2+2+1, 2+1+1+1),
    with every micro-batch cut the stages make; with tp 2 each stage is a TP group of 2
    (its all-reduces on its own gloo group, activations between same-TP-rank peers)."""
    import torch

    steps = _steps()
    want = _pipeline_logits(llama5_dir, 1, steps)
    got = _pipeline_logits(llama5_dir, pp, steps, tp)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _serve_error(capsys, *argv: str) -> str:
    from pdcore.settings import parse_serve_args

    with pytest.raises(SystemExit) as info:
        parse_serve_args(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_pp_flag_rules(capsys, tiny_llama_dir: Path, monkeypatch) -> None:
    from pdcore.plugins import get_registry
    from pdcore.settings import parse_serve_args

    model = ["--model-path", str(tiny_llama_dir)]
    err = _serve_error(capsys, *model, "--pp", "2", "--dp-size", "2")
    assert err.startswith("pdcore serve: error: --pp-size:") and "--dp-size" in err, err
    # the grid's pp x tp ranks must divide over the nodes (the stages split over them)
    err = _serve_error(capsys, *model, "--pp", "2", "--nnodes", "3", "--dist-init-addr", "h:1")
    assert "--pp-size: 2 stages x 1 TP ranks cannot be spread evenly over --nnodes 3" in err
    two = parse_serve_args([*model, "--pp", "2", "--nnodes", "2", "--dist-init-addr", "h:1"])
    assert two.grid_ranks_per_node == 1 and two.engine_procs_per_node == 1
    err = _serve_error(capsys, *model, "--pp-size", "3")
    assert "larger than the model's 2 layers" in err, err
    # the tp size of a pipeline is checked against the model as without PP (4 heads, 2 KV)
    err = _serve_error(capsys, *model, "--pp-size", "2", "--tp-size", "3")
    assert err.startswith("pdcore serve: error: --tp-size: tp size 3 does not fit"), err
    ok = parse_serve_args([*model, "--pp-size", "2"])
    assert ok.pp_size == 2 and ok.engine_config().pp_size == 2
    grid = parse_serve_args([*model, "--pp-size", "2", "--tp-size", "2"])
    assert (grid.pp_size, grid.tp_size, grid.engine_procs_per_node) == (2, 2, 4)
    backend = next(i.name for i in get_registry("transfer_backend").describe() if i.available)
    for mode in ("prefill", "decode"):
        pd = parse_serve_args(
            [*model, "--pp", "2", "--disaggregation-mode", mode, "--backend", backend]
        )
        assert (pd.pp_size, pd.disaggregation_mode) == (2, mode)
    monkeypatch.setenv("PDCORE_PP_SIZE", "2")
    assert parse_serve_args(model).pp_size == 2


def _stages(server: ServerProcess) -> list[int]:
    match = re.search(r"stage processes \[([\d, ]*)\]", server.log())
    assert match, server.log()
    return [int(p) for p in match.group(1).split(",") if p.strip()]


@pytest.mark.slow
def test_tiny_llama_pp2_matches_transformers_and_a_dead_stage_fails(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """One server: greedy parity (8 concurrent prompts, openai client, stream and not,
    /generate ids), then stage 1 SIGKILLed under load: every client gets an error, the
    server exits non-zero."""
    server = ServerProcess(tiny_llama_dir, tmp_path / "server.log", "--pp-size", "2")
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/server_info", timeout=10).json()
        assert (info["pp_size"], info["tp_size"]) == (2, 1)
        check_against_hf(server.url, str(tiny_llama_dir))
        assert httpx.get(server.url + "/get_load", timeout=10).json()[0]["num_reqs"] == 0
        log = server.log()
        assert "pipeline stage 0 of 2: layers 0..0, embedding" in log
        assert "pipeline stage 1 of 2: layers 1..1, final norm + LM head" in log

        (stage1,) = _stages(server)
        assert_kill_under_load_fails_fast(server, stage1)
    finally:
        server.stop()


@pytest.mark.slow
def test_tiny_llama_pp2_tp2_matches_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`--pp-size 2 --tp-size 2`: 4 processes (2 stages of 2 TP ranks, one layer and one KV
    head per rank); greedy parity, stream and not; a clean stop of every rank."""
    server = ServerProcess(
        tiny_llama_dir,
        tmp_path / "server.log",
        *("--pp-size", "2", "--tp-size", "2", "--cpu-threads", "1"),
    )
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/server_info", timeout=10).json()
        assert (info["pp_size"], info["tp_size"], info["kv_heads_per_rank"]) == (2, 2, 1)
        check_against_hf(server.url, str(tiny_llama_dir))
        load = httpx.get(server.url + "/get_load", timeout=10).json()[0]
        assert load["num_reqs"] == 0 and (load["pp_size"], load["tp_size"]) == (2, 2)
        assert [(r["pp_rank"], r["tp_rank"]) for r in load["ranks"]] == [
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
        ]
        assert len(_stages(server)) == 3
    finally:
        assert server.stop() == 0, server.log()
    log = server.log()
    assert "pipeline stage 0 of 2, TP rank 0 of 2: layers 0..0, embedding," in log
    assert "pipeline stage 0 of 2, TP rank 1 of 2: layers 0..0, embedding," in log
    assert "pipeline stage 1 of 2, TP rank 0 of 2: layers 1..1, final norm + LM head" in log
    assert re.search(r"stage 1 of 2, TP rank 1 of 2: layers 1\.\.1, \d+ KV pages", log)  # no head
    assert log.count("pipeline stage 1: stop from stage 0") == 2
    assert log.count("pipeline stage 0: stop from stage 0") == 1  # stage 0's TP rank 1


@pytest.mark.slow
def test_pp2_over_two_nodes_on_two_loopback_addresses(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`--pp-size 2 --nnodes 2`: stage 0 (and HTTP) on node 0 at 127.0.0.2, stage 1 on node
    1 at 127.0.0.3, activations between them over gloo; greedy parity; a clean stop of both."""
    node0, node1 = start_two_nodes(tiny_llama_dir, tmp_path, "--pp-size", "2")
    try:
        node0.wait_ready()
        info = httpx.get(node0.url + "/server_info", timeout=10).json()
        assert (info["pp_size"], info["nnodes"]) == (2, 2)
        check_against_hf(node0.url, str(tiny_llama_dir))
    finally:
        assert node0.stop() == 0, node0.log()
        assert wait_until(lambda: node1.proc.poll() is not None, 30), node1.log()
        node1.stop()
    assert node1.proc.returncode == 0, node1.log()
    assert "pipeline stage 1 of 2" in node1.log() and "layers 1..1" in node1.log()


@pytest.mark.slow
def test_default_model_pp2_matches_transformers(tmp_path: Path) -> None:
    server = ServerProcess(None, tmp_path / "server.log", "--pp-size", "2")
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/server_info", timeout=10).json()["pp_size"] == 2
        check_against_hf(server.url, None)
    finally:
        assert server.stop() == 0, server.log()
    assert "pipeline stage 1: stop from stage 0" in server.log()
