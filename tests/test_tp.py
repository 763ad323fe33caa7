"""Tensor parallelism: the batch wire, the head rules, the sharded forward, and real
`pdcore serve --tp-size N` processes (one node and two "nodes" on 127.0.0.2 / 127.0.0.3)
compared with transformers, plus a TP rank killed under load."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import httpx
import pytest
import torch

from pdcore.engine.tp_sync import TPSyncError, decode_batch, encode_batch
from pdcore.model.config import ModelConfig
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.parallel import HeadShard, check_tp_size, valid_tp_sizes
from pdcore.testing.processes import spawned_children
from tests.conftest import free_port
from tests.openai_parity import check_against_hf as _check_against_hf
from tests.server_helpers import (
    ServerProcess,
    assert_kill_under_load_fails_fast,
    start_two_nodes,
    wait_until,
)

MAX_TOKENS = 8


def _config(heads: int, kv: int, inter: int) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=100,
        hidden_size=heads * 64,
        intermediate_size=inter,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )


# --- the wire -------------------------------------------------------------------------------


def _batch(is_decode: bool, tables: list[list[int]], extend: list[int], seq: list[int]):
    t = sum(extend)
    return ForwardBatch(
        is_decode=is_decode,
        input_ids=torch.arange(100, 100 + t),
        positions=torch.arange(t) * 3,
        out_slots=torch.arange(t) + 17,
        seq_lens=seq,
        extend_lens=extend,
        page_tables=tables,
        logits_indices=torch.tensor([i for i in range(t) if i % 2 == 0], dtype=torch.long),
        page_size=4,
    )


@pytest.mark.parametrize(
    "batch",
    [
        _batch(True, [[1, 2], [3], [4, 5, 6]], [1, 1, 1], [5, 2, 9]),
        _batch(False, [[7, 8, 9], []], [6, 0], [10, 0]),
        _batch(False, [[1]], [1], [1]),
    ],
)
def test_batch_round_trips_through_the_int64_wire(batch: ForwardBatch) -> None:
    payload = encode_batch(batch)
    assert payload.dtype == torch.long and payload.dim() == 1
    back = decode_batch(payload, torch.device("cpu"))
    assert back.is_decode == batch.is_decode and back.page_size == batch.page_size
    for name in ("input_ids", "positions", "out_slots", "logits_indices"):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
    assert back.seq_lens == batch.seq_lens and back.extend_lens == batch.extend_lens
    assert back.page_tables == batch.page_tables


def test_inconsistent_payloads_are_refused() -> None:
    payload = encode_batch(_batch(True, [[1, 2]], [1], [5]))
    with pytest.raises(TPSyncError):
        decode_batch(payload[:3], torch.device("cpu"))
    with pytest.raises(TPSyncError):
        decode_batch(payload[:-1], torch.device("cpu"))
    bad = payload.clone()
    bad[1] = 0  # page size 0
    with pytest.raises(TPSyncError):
        decode_batch(bad, torch.device("cpu"))


# --- head rules -----------------------------------------------------------------------------


def test_head_rules_name_the_counts_and_the_valid_sizes() -> None:
    smollm = _config(9, 3, 1536)
    assert valid_tp_sizes(smollm) == [1, 3]
    check_tp_size(smollm, 3)
    with pytest.raises(ValueError) as info:
        check_tp_size(smollm, 2)
    msg = str(info.value)
    assert "9 query heads" in msg and "3 KV heads" in msg and "Valid tp sizes: 1, 3" in msg


def test_kv_heads_are_replicated_when_ranks_outnumber_them() -> None:
    config = _config(8, 2, 256)
    assert [HeadShard.of(config, 4, r).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    assert {HeadShard.of(config, 4, r).num_kv_heads for r in range(4)} == {1}
    assert [HeadShard.of(config, 2, r).kv_head_start for r in range(2)] == [0, 1]
    assert [HeadShard.of(config, 4, r).head_start for r in range(4)] == [0, 2, 4, 6]


# --- the sharded forward, ranks as threads of one process (real gloo groups) ----------------


def _forward_logits(model_dir: Path, tp: int) -> torch.Tensor:
    """Prefill 5 tokens then decode 1 at `tp` ranks; rank 0's logits of both steps."""
    from pdcore.engine.tp_sync import BatchBroadcaster, BatchReceiver
    from pdcore.model.kv_pool import KVPool
    from pdcore.model.llama import LlamaModel
    from pdcore.model.loader import load_state_dict, resolve_model
    from pdcore.model.parallel import TPGroup, init_tp_group
    from pdcore.plugins import get_registry

    resolved = resolve_model(str(model_dir))
    state = load_state_dict(resolved)
    cfg = resolved.config
    port = free_port()
    steps = [
        _step(False, list(range(11, 16)), [0, 1, 2, 3, 4], [1, 2], [5], [5], [4]),
        _step(True, [42], [5], [1, 2], [6], [1], [0]),
    ]
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            group = (
                init_tp_group(rank, tp, f"127.0.0.1:{port}", "127.0.0.1", 60, torch.device("cpu"))
                if tp > 1
                else TPGroup()
            )
            model = LlamaModel(cfg, state, torch.float32, torch.device("cpu"), 64, group)
            pool = KVPool(
                cfg.num_layers,
                4,
                4,
                model.num_kv_heads,
                cfg.head_dim,
                torch.float32,
                torch.device("cpu"),
            )
            attn = get_registry("attention_backend").create(
                "torch",
                num_heads=model.num_heads,
                num_kv_heads=model.num_kv_heads,
                head_dim=cfg.head_dim,
                device=torch.device("cpu"),
                dtype=torch.float32,
            )
            outs = []
            for batch in steps:
                if tp > 1 and rank == 0:
                    BatchBroadcaster(group).send_batch(batch)
                elif tp > 1:
                    batch = BatchReceiver(group).recv().batch
                outs.append(model.forward(batch, pool, attn))
            results[rank] = outs
            group.close()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(out.numel() == 0 for r in range(1, tp) for out in results[r])  # no LM head
    return torch.cat(results[0])


def _step(decode, ids, positions, table, seq_lens, extend, logits_rows) -> ForwardBatch:
    slots = [table[p // 4] * 4 + p % 4 for p in positions]
    return ForwardBatch(
        is_decode=decode,
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        out_slots=torch.tensor(slots),
        seq_lens=seq_lens,
        extend_lens=extend,
        page_tables=[table],
        logits_indices=torch.tensor(logits_rows),
        page_size=4,
    )


@pytest.mark.parametrize("tp", [2, 4])  # 4 ranks > 2 KV heads: replicated KV heads
def test_sharded_forward_equals_one_rank(tiny_llama_dir: Path, tp: int) -> None:
    torch.set_num_threads(1)
    reference = _forward_logits(tiny_llama_dir, 1)
    sharded = _forward_logits(tiny_llama_dir, tp)
    torch.testing.assert_close(sharded, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(sharded.argmax(-1), reference.argmax(-1))


# --- flags ----------------------------------------------------------------------------------


def _serve_error(capsys, *argv: str) -> str:
    from pdcore.settings import parse_serve_args

    with pytest.raises(SystemExit) as info:
        parse_serve_args(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err


def test_default_model_refuses_tp2_before_loading(capsys) -> None:
    err = _serve_error(capsys, "--tp-size", "2")
    assert err.startswith("pdcore serve: error: --tp-size:")
    assert "9 query heads" in err and "3 KV heads" in err and "Valid tp sizes: 1, 3" in err


def test_tp_flag_combinations_are_checked(capsys, tiny_llama_dir: Path) -> None:
    model = ["--model-path", str(tiny_llama_dir)]
    assert "--tp-size" in _serve_error(capsys, *model, "--tp", "3", "--nnodes", "2")
    assert "--node-rank" in _serve_error(
        capsys, *model, "--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"
    )
    assert "--dist-init-addr" in _serve_error(capsys, *model, "--tp", "2", "--nnodes", "2")
    assert "--dist-init-addr" in _serve_error(
        capsys, *model, "--tp", "2", "--dist-init-addr", "nohostport"
    )
    from pdcore.settings import parse_serve_args

    pd = parse_serve_args([*model, "--tp", "2", "--disaggregation-mode", "prefill"])
    assert pd.tp_size == 2  # PD with TP (tests/test_pd_tp.py)

    ok = parse_serve_args([*model, "--tp", "2", "--trust-remote-code"])
    assert ok.tp_size == 2 and ok.engine_config().tp_size == 2


# --- real servers ---------------------------------------------------------------------------


def _followers(server: ServerProcess) -> list[int]:
    match = re.search(r"local followers \[([\d, ]*)\]", server.log())
    assert match, server.log()
    return [int(p) for p in match.group(1).split(",") if p.strip()]


@pytest.mark.slow
def test_tiny_llama_tp2_matches_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_llama_dir, tmp_path / "server.log", "--tp-size", "2")
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/server_info", timeout=10).json()
        assert (info["tp_size"], info["nnodes"], info["kv_heads_per_rank"]) == (2, 1, 1)
        _check_against_hf(server.url, str(tiny_llama_dir))
        assert httpx.get(server.url + "/get_load", timeout=10).json()[0]["num_reqs"] == 0
    finally:
        assert server.stop() == 0, server.log()
    assert "TP rank 1: stop from rank 0" in server.log()


@pytest.mark.slow
def test_default_model_tp3_matches_transformers(tmp_path: Path) -> None:
    server = ServerProcess(None, tmp_path / "server.log", "--tp-size", "3")
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/server_info", timeout=10).json()["tp_size"] == 3
        _check_against_hf(server.url, None)
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_two_nodes_on_two_loopback_addresses(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Node 0 on 127.0.0.2 (HTTP + rank 0), node 1 on 127.0.0.3 (rank 1): same tokens as
    transformers; then node 1's rank is killed and both nodes exit non-zero, no hang."""
    node0, node1 = start_two_nodes(tiny_llama_dir, tmp_path, "--tp-size", "2")
    try:
        node0.wait_ready()
        info = httpx.get(node0.url + "/server_info", timeout=10).json()
        assert (info["tp_size"], info["nnodes"]) == (2, 2)
        _check_against_hf(node0.url, str(tiny_llama_dir))
        (rank1,) = spawned_children(node1.proc.pid)
        os.kill(rank1, signal.SIGKILL)
        assert wait_until(lambda: node0.proc.poll() is not None, 20), node0.log()
        assert wait_until(lambda: node1.proc.poll() is not None, 20), node1.log()
        assert node0.proc.returncode not in (0, None) and node1.proc.returncode not in (0, None)
    finally:
        node0.stop()
        node1.stop()


@pytest.mark.slow
def test_killing_a_tp_rank_fails_requests_and_exits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_llama_dir, tmp_path / "server.log", "--tp-size", "2")
    try:
        server.wait_ready()
        (follower,) = _followers(server)
        assert_kill_under_load_fails_fast(server, follower)
    finally:
        server.stop()
    assert "TP rank 1" in server.log()
