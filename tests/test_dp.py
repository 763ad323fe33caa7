"""Data parallelism: the load balancers, the flag rules, and a real `pdcore serve --dp-size 2`
compared with transformers, then one replica killed while the other keeps serving."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from pdcore.server.dp_client import _sum_stats
from pdcore.server.load_balance import (
    BLOCK_TOKENS,
    MinimumTokens,
    PrefixAware,
    ReplicaLoad,
    RoundRobin,
    ShortestQueue,
    block_hashes,
    make_balancer,
)
from tests.parity import assert_matches_hf, run_parity_requests
from tests.server_helpers import ServerProcess, pid_alive, wait_until


def _loads(*specs: tuple[bool, int, int]) -> list[ReplicaLoad]:
    return [ReplicaLoad(alive, reqs, toks) for alive, reqs, toks in specs]


# --- balancers ------------------------------------------------------------------------------


def test_round_robin_skips_dead_replicas() -> None:
    rr = RoundRobin()
    loads = _loads((True, 0, 0), (False, 0, 0), (True, 0, 0))
    assert [rr.pick(loads, []) for _ in range(4)] == [0, 2, 0, 2]
    with pytest.raises(RuntimeError, match="no data-parallel replica"):
        rr.pick(_loads((False, 0, 0)), [])


def test_shortest_queue_and_minimum_tokens_read_different_counts() -> None:
    loads = _loads((True, 3, 100), (True, 5, 40), (False, 0, 0))
    assert ShortestQueue().pick(loads, []) == 0
    assert MinimumTokens().pick(loads, []) == 1


def test_block_hashes_chain_whole_blocks_only() -> None:
    ids = list(range(3 * BLOCK_TOKENS + 5))
    hashes = block_hashes(ids)
    assert len(hashes) == 3
    assert block_hashes(ids[: 2 * BLOCK_TOKENS]) == hashes[:2]  # a prefix's hashes
    other = [7, *ids[1:]]
    assert block_hashes(other)[2] != hashes[2]  # the chain carries the first block


def test_prefix_aware_follows_the_prefix_within_the_balance_threshold() -> None:
    pa = PrefixAware(2, balance_abs_threshold=2)
    prefix_a = list(range(4 * BLOCK_TOKENS))
    prefix_b = list(range(1000, 1000 + 4 * BLOCK_TOKENS))
    idle = _loads((True, 0, 0), (True, 0, 0))
    first_a = pa.pick(idle, [*prefix_a, 1])
    first_b = pa.pick(_loads((True, int(first_a == 0), 0), (True, int(first_a == 1), 0)), prefix_b)
    assert first_b != first_a  # no match: the shorter queue
    for suffix in range(5):
        assert pa.pick(idle, [*prefix_a, 50 + suffix]) == first_a
        assert pa.pick(idle, [*prefix_b, 50 + suffix]) == first_b
    busy = [ReplicaLoad(True, 3 if i == first_a else 0, 0) for i in range(2)]
    assert pa.pick(busy, [*prefix_a, 99]) == first_b  # too busy: balance wins
    pa.forget(first_a)
    assert pa.matched_blocks(first_a, block_hashes(prefix_a)) == 0


def test_prefix_aware_spreads_new_prefixes_over_idle_replicas() -> None:
    pa = PrefixAware(2)
    idle = _loads((True, 0, 0), (True, 0, 0))
    picks = [pa.pick(idle, list(range(p * 1000, p * 1000 + 4 * BLOCK_TOKENS))) for p in range(4)]
    assert sorted(picks) == [0, 0, 1, 1]  # not all onto replica 0 (ties broken by tree size)


def test_prefix_aware_memory_is_bounded() -> None:
    pa = PrefixAware(1, max_blocks=10)
    for start in range(0, 40 * BLOCK_TOKENS, BLOCK_TOKENS):
        pa.pick(_loads((True, 0, 0)), list(range(start, start + 2 * BLOCK_TOKENS)))
    assert len(pa._seen[0]) == 10


def test_make_balancer_refuses_unknown_methods() -> None:
    with pytest.raises(ValueError, match="unknown load balance method"):
        make_balancer("bogus", 2)


def test_replica_stats_add_up() -> None:
    parts = [
        {"num_tokens": 3, "page_size": 16, "transfer": {"nixl": {"bytes_total": 5, "s": [1]}}},
        {"num_tokens": 4, "page_size": 16, "transfer": {"nixl": {"bytes_total": 6, "s": [2]}}},
    ]
    assert _sum_stats(parts) == {
        "num_tokens": 7,
        "page_size": 16,
        "transfer": {"nixl": {"bytes_total": 11, "s": [1, 2]}},
    }


# --- flags ----------------------------------------------------------------------------------


def _serve_error(capsys, *argv: str) -> str:
    from pdcore.settings import parse_serve_args

    with pytest.raises(SystemExit):
        parse_serve_args(list(argv))
    return capsys.readouterr().err


def test_dp_flag_rules(capsys) -> None:
    err = _serve_error(
        capsys, "--dp", "2", "--nnodes", "3", "--tp", "3", "--dist-init-addr", "127.0.0.2:5000"
    )
    assert "--dp-size: data parallelism runs on one node" in err
    err = _serve_error(capsys, "--load-balance-method", "fastest")
    assert "--load-balance-method" in err

    from pdcore.settings import parse_serve_args

    ok = parse_serve_args(["--dp", "2", "--load-balance-method", "prefix_aware"])
    assert (ok.dp_size, ok.load_balance_method) == (2, "prefix_aware")
    assert ok.engine_config().tp_ranks_per_node == 2  # the replicas share the KV budget
    for mode in ("prefill", "decode"):  # PD sides take --dp-size (tests/test_pd_dp.py)
        pd = parse_serve_args(["--dp", "2", "--disaggregation-mode", mode, "--backend", "fake"])
        assert (pd.dp_size, pd.disaggregation_mode) == (2, mode)


# --- a real server --------------------------------------------------------------------------


@pytest.mark.slow
def test_dp2_matches_transformers_and_survives_a_dead_replica(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from pdcore.model.tokenizer import load_tokenizer

    server = ServerProcess(
        tiny_llama_dir, tmp_path / "server.log", "--dp-size", "2", "--cpu-threads", "1"
    )
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/server_info", timeout=10).json()
        assert info["dp_size"] == 2 and len(info["internal_states"]) == 2
        tok = load_tokenizer(str(tiny_llama_dir))
        results = run_parity_requests(server.url, tok)
        assert_matches_hf(results, str(tiny_llama_dir), tok)

        # Both replicas served (round robin) and hold nothing once idle and flushed.
        states = httpx.get(server.url + "/server_info", timeout=10).json()["internal_states"]
        assert [s["dp_rank"] for s in states] == [0, 1]
        assert all(s["num_forward_steps"] > 0 for s in states), states
        assert httpx.post(server.url + "/flush_cache", timeout=10).status_code == 200
        load = httpx.get(server.url + "/get_load", timeout=10).json()
        assert [(e["dp_rank"], e["num_reqs"], e["num_tokens"]) for e in load] == [
            (0, 0, 0),
            (1, 0, 0),
        ]

        # Kill one replica: the other serves every new request; /health says one is gone.
        match = re.search(
            r"data parallel: 2 replicas \(engine pids \[(\d+), (\d+)\]\)", server.log()
        )
        assert match, server.log()
        engines = [int(match.group(1)), int(match.group(2))]
        os.kill(engines[1], signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(engines[1]), 10)
        assert wait_until(
            lambda: httpx.get(server.url + "/health", timeout=10).status_code == 503, 10
        )
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        for _ in range(6):
            r = httpx.post(server.url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
        load = httpx.get(server.url + "/get_load", timeout=10).json()
        assert [e["dp_rank"] for e in load] == [0]
    finally:
        server.stop()
    assert "dp rank 1" in server.log()
