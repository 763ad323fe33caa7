"""PD with data parallelism: a prefill with `--dp-size 2` sends each request to replica
`room % 2` and answers decode's bootstrap query for that dp rank; decodes of dp size 1 and
2 pick their replicas by load and find the KV on the prefill replica holding the room.

Unit level: the bootstrap server answering per dp rank (signed), and the DP client routing a
batch by room. Process level (slow, one deployment): `pdcore router` in front of prefill
dp 2 -> decode dp 1 and prefill dp 2 -> decode dp 2, greedy tokens equal transformers', both
prefill replicas served, every replica of both sides empty after /flush_cache; then one
prefill replica killed: the other's rooms are still served, the dead one's fail in bounded
time.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pdcore.disagg.auth import ControlAuth
from pdcore.disagg.bootstrap import (
    BootstrapError,
    BootstrapRefused,
    BootstrapServer,
    fetch_route,
    replica_routes,
)
from pdcore.plugins import get_registry
from pdcore.server.dp_client import DataParallelClient
from pdcore.server.engine_client import Stream
from pdcore.server.engine_messages import Generate
from pdcore.server.load_balance import RoundRobin
from tests.conftest import free_port
from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model
from tests.parity import assert_matches_hf, run_parity_requests
from tests.server_helpers import ServerProcess, wait_until
from tests.test_router_helpers import RouterProcess, pd_flags

MAX_TOKENS = 6
START_TIMEOUT = 600.0
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}


# --- the bootstrap server per dp rank -------------------------------------------------------


def test_bootstrap_server_answers_each_dp_rank_with_its_replicas_route() -> None:
    auth = ControlAuth("s3cret-token-for-tests")

    def replica(n: int) -> BootstrapServer:
        def route(dp_rank: int | None) -> dict[str, Any] | None:
            return None if dp_rank else {"endpoint": f"tcp://127.0.0.1:{n}", "instance": n}

        return BootstrapServer("127.0.0.1", 0, route, auth)

    replicas = [replica(7000), replica(7001)]
    ports = [r.port for r in replicas]
    front = BootstrapServer("127.0.0.1", 0, replica_routes("127.0.0.1", ports, 5.0, auth), auth)
    try:
        first = fetch_route("127.0.0.1", front.port, 5.0, auth)  # no dp rank: rank 0's
        assert (first["instance"], first["dp_rank"], first["dp_size"]) == (7000, 0, 2)
        second = fetch_route("127.0.0.1", front.port, 5.0, auth, dp_rank=1)
        assert (second["endpoint"], second["dp_rank"], second["dp_size"]) == (
            "tcp://127.0.0.1:7001",
            1,
            2,
        )
        with pytest.raises(BootstrapError, match="404: this prefill has no dp rank 2"):
            fetch_route("127.0.0.1", front.port, 5.0, auth, dp_rank=2)
        with pytest.raises(BootstrapRefused):  # the dp rank is signed like the rest
            fetch_route("127.0.0.1", front.port, 5.0, ControlAuth("another-token"), dp_rank=1)
        replicas[1].close()  # a dead replica: 503 naming it, not a stale route
        with pytest.raises(BootstrapError, match="503: prefill dp rank 1 does not answer"):
            fetch_route("127.0.0.1", front.port, 5.0, auth, dp_rank=1)
    finally:
        front.close()
        replicas[0].close()


# --- the DP client on a prefill: replica room % N --------------------------------------------


class _Replica:
    """Enough of an EngineClient for DataParallelClient.submit."""

    alive, dead_reason, label = True, None, "fake"

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.released: list[set[str]] = []

    def live_rids(self) -> list[str]:
        return []

    def submit(self, jobs: list[Generate]) -> Stream:
        self.jobs += [job.rid for job in jobs]
        return Stream(self, [job.rid for job in jobs])  # type: ignore[arg-type]

    def _release(self, stream: Stream) -> None:
        self.released.append(set(stream.unfinished))


def _job(rid: str, room: int | None) -> Generate:
    boot = None if room is None else {"host": "127.0.0.1", "port": None, "room": room}
    return Generate(rid, [1, 2, 3], {"max_new_tokens": 2}, False, boot)


def test_prefill_dp_client_routes_by_room_and_splits_batches() -> None:
    replicas = [_Replica(), _Replica()]
    client = DataParallelClient(replicas, RoundRobin(), route_by_room=True)  # type: ignore[arg-type]
    for room in (7, 9, 11):  # whatever the balancer would say
        client.submit([_job(f"r{room}", room)])
    assert (replicas[0].jobs, replicas[1].jobs) == ([], ["r7", "r9", "r11"])
    stream = client.submit([_job("a", 4), _job("b", 5), _job("c", 6)])
    assert replicas[0].jobs == ["a", "c"] and replicas[1].jobs[-1] == "b"
    assert stream.index == {"a": 0, "b": 1, "c": 2}
    stream.unfinished.discard("a")
    stream.close()  # each part aborts only what is unfinished
    assert replicas[0].released == [{"c"}] and replicas[1].released == [{"b"}]
    # unified-style requests (no room) still follow the balancer
    plain = DataParallelClient(replicas, RoundRobin(), route_by_room=True)  # type: ignore[arg-type]
    plain.submit([_job("x", None)])
    plain.submit([_job("y", None)])
    assert replicas[0].jobs[-1] == "x" and replicas[1].jobs[-1] == "y"


# --- real processes -------------------------------------------------------------------------


def _available(name: str) -> bool:
    return any(i.name == name and i.available for i in get_registry("transfer_backend").describe())


class PDDP:
    """A prefill `--dp-size 2`, decodes of dp 1 and 2, and a router per decode."""

    def __init__(self, model: Path, tmp: Path) -> None:
        common = ["--backend", "nixl", "--cpu-threads", "1"]
        self.boot = free_port()
        self.prefill = ServerProcess(
            model,
            tmp / "prefill-dp2.log",
            *common,
            "--dp-size",
            "2",
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(self.boot),
            env=ENV,
        )
        self.decode = {
            dp: ServerProcess(
                model,
                tmp / f"decode-dp{dp}.log",
                *common,
                "--dp-size",
                str(dp),
                "--disaggregation-mode",
                "decode",
                env=ENV,
            )
            for dp in (1, 2)
        }
        self.tmp = tmp
        self.routers: dict[int, RouterProcess] = {}

    def start(self) -> PDDP:
        for server in [self.prefill, *self.decode.values()]:
            server.wait_ready(START_TIMEOUT)
        for dp, decode in self.decode.items():
            flags = pd_flags([(self.prefill.url, self.boot)], [decode.url])
            log = self.tmp / f"router-d{dp}.log"
            self.routers[dp] = RouterProcess(log, *flags, env={"PDCORE_PLUGINS": ""})
        for router in self.routers.values():
            router.wait_ready()
        return self

    def stop(self) -> None:
        for proc in [*self.routers.values(), *self.decode.values(), self.prefill]:
            proc.stop()


@pytest.fixture(scope="module")
def pd_dp(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDDP]:
    if not _available("nixl"):
        pytest.skip("the nixl transfer backend is not available")
    pd = PDDP(tiny_llama_dir, tmp_path_factory.mktemp("pd-dp"))
    try:
        yield pd.start()
    finally:
        pd.stop()


def _steps(url: str) -> list[int]:
    states = httpx.get(url + "/server_info", timeout=30).json()["internal_states"]
    return [s["num_forward_steps"] for s in states]


def _flushed(url: str, dp: int) -> None:
    """After /flush_cache every dp replica holds 0 KV tokens and no transfer."""
    with httpx.Client(base_url=url, timeout=30) as client:
        assert wait_until(
            lambda: all(e["num_reqs"] == 0 for e in client.get("/get_load").json()), 30
        )
        assert wait_until(lambda: client.post("/flush_cache").status_code == 200, 10)
        load = client.get("/get_load").json()
        assert [e["dp_rank"] for e in load] == list(range(dp)), load
        for entry in load:
            assert entry["num_tokens"] == 0, load
            assert all(r["num_tokens"] == 0 and r["kv_transfers"] == 0 for r in entry["ranks"])


@pytest.mark.slow
def test_prefill_dp2_to_decode_dp1_equals_transformers(pd_dp: PDDP, tiny_llama_dir: Path) -> None:
    """48 requests (8 prompts; /generate, completions, chat; streamed and not), each with a
    random room: both prefill replicas serve, and decode finds every room's KV."""
    from pdcore.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    results = run_parity_requests(pd_dp.routers[1].url, tok)
    assert_matches_hf(results, str(tiny_llama_dir), tok)
    steps = _steps(pd_dp.prefill.url)
    assert len(steps) == 2 and all(n > 0 for n in steps), steps  # 2^-47 odds to fail by chance
    _flushed(pd_dp.prefill.url, 2)
    _flushed(pd_dp.decode[1].url, 1)


@pytest.mark.slow
def test_prefill_dp2_to_decode_dp2_equals_transformers(pd_dp: PDDP, tiny_llama_dir: Path) -> None:
    """8 concurrent prompts through the openai client; both decode replicas (round robin)
    look the prefill up and register with the dp ranks that hold their rooms."""
    from pdcore.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    client = openai.OpenAI(
        base_url=pd_dp.routers[2].url + "/v1", api_key="unused", max_retries=0, timeout=300
    )

    def complete(prompt: str) -> str:
        kwargs = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        return client.completions.create(**kwargs).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(complete, PROMPTS))
    ids = [tok.encode(p) for p in PROMPTS]
    want = hf_greedy(load_hf_model(str(tiny_llama_dir)), ids, MAX_TOKENS, [tok.eos_token_id])
    assert sum(map(len, want)) > 3 * len(PROMPTS)  # not a vacuous pass
    assert got == [tok.decode(ref, skip_special_tokens=True) for ref in want]
    assert all(n > 0 for n in _steps(pd_dp.decode[2].url))
    _flushed(pd_dp.prefill.url, 2)
    _flushed(pd_dp.decode[2].url, 2)


def _pd_generate(pd: PDDP, room: int) -> tuple[int, int, float]:
    """One request sent as the router sends it: to prefill and decode at once, with
    `room`; (prefill status, decode status, decode's seconds)."""
    body = {
        "text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": pd.boot,
        "bootstrap_room": room,
    }

    def post(url: str) -> tuple[int, float]:
        t0 = time.monotonic()
        return httpx.post(url + "/generate", json=body, timeout=60).status_code, (
            time.monotonic() - t0
        )

    with ThreadPoolExecutor(2) as pool:
        prefill = pool.submit(post, pd.prefill.url)
        decode = pool.submit(post, pd.decode[1].url)
        return prefill.result()[0], *decode.result()


@pytest.mark.slow
def test_a_dead_prefill_replica_fails_only_its_rooms(pd_dp: PDDP) -> None:
    """Runs last (it ends prefill dp rank 1): rooms of dp rank 0 are still served end to
    end; rooms of dp rank 1 fail on both sides, in bounded time."""
    match = re.search(
        r"data parallel: 2 replicas \(engine pids \[(\d+), (\d+)\]\)", pd_dp.prefill.log()
    )
    assert match, pd_dp.prefill.log()
    os.kill(int(match.group(2)), signal.SIGKILL)
    assert wait_until(lambda: httpx.get(pd_dp.prefill.url + "/health").status_code == 503, 10)
    for room in (10, 12):
        assert _pd_generate(pd_dp, room)[:2] == (200, 200)
    prefill, decode, seconds = _pd_generate(pd_dp, 11)
    assert prefill == 503 and decode != 200
    assert seconds < 30  # decode's lookup of dp rank 1 gives up (heartbeat interval x failures)
    _flushed(pd_dp.decode[1].url, 1)
