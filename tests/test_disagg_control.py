"""The PD control plane (bootstrap, handshake, KVPoll, timeouts, heartbeat, abort) over real
transfer backends and real sockets on 127.0.0.1; no model.

Prefill and decode each live in their own process (nixl wants one agent per process), driven
over a multiprocessing pipe: the test says "create rooms", "prealloc", "send", "wait until",
and compares the decode pool's pages with the prefill pool's byte for byte. Timeouts are set
small through env vars (one through its SGLANG_ name) so every fault ends within seconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pdcore.disagg.kv_poll import KVPoll
from tests.conftest import free_port

BACKEND = "nixl"
try:
    import nixl  # noqa: F401
except Exception:
    BACKEND = "fake"

HB = {
    "PDCORE_DISAGGREGATION_TRANSFER_BACKEND": BACKEND,
    "PDCORE_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5",
    "PDCORE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
}
PREFILL_ENV = {
    **HB,
    "PDCORE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "3",
    "SGLANG_DISAGGREGATION_BOOTSTRAP_ENTRY_CLEANUP_INTERVAL": "1",
}
DECODE_ENV = {**HB, "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "2"}
POOL = {"num_layers": 4, "num_pages": 32, "page_size": 16, "kv_heads": 2, "head_dim": 8}
FINAL = ("Failed", "Success")


# --- the peer process -----------------------------------------------------------------------


def _worker(role: str, env: dict[str, str], pool_kw: dict[str, Any], conn: Any) -> None:
    """One side of a PD pair; answers commands until "exit" (or its parent goes away)."""
    os.environ.update(env)
    import torch

    from pdcore.disagg.settings import DisaggSettings
    from pdcore.model.kv_pool import KVPool

    settings = DisaggSettings()
    kw = {**POOL, **pool_kw}
    pool = KVPool(
        kw["num_layers"],
        kw["num_pages"],
        kw["page_size"],
        kw["kv_heads"],
        kw["head_dim"],
        torch.bfloat16,
        torch.device(kw.get("device", "cpu")),
    )
    manager: Any
    if role == "prefill":
        torch.manual_seed(0)
        pool.k.copy_(torch.randn(pool.k.shape))
        pool.v.copy_(torch.randn(pool.v.shape))
        from pdcore.disagg.kv_sender import PrefillKVManager

        manager = PrefillKVManager(settings, pool, "127.0.0.1")
        conn.send({"port": manager.bootstrap_port, "settings": settings.model_dump()})
    else:
        pool.k.zero_()
        pool.v.zero_()
        from pdcore.disagg.kv_receiver import DecodeKVManager

        manager = DecodeKVManager(settings, pool, "127.0.0.1")
        conn.send({"settings": settings.model_dump()})
    handles: dict[int, Any] = {}

    def info(room: int) -> dict[str, Any]:
        h = handles[room]
        return {
            "state": h.poll().name,
            "reason": h.failure_reason,
            "token": getattr(h, "first_token", None),
            "logprob": getattr(h, "first_logprob", None),
        }

    try:
        while True:
            cmd = conn.recv()
            op = cmd["op"]
            try:
                if op == "exit":
                    break
                if op == "create" and role == "prefill":
                    handles.update({r: manager.create_sender(r) for r in cmd["rooms"]})
                elif op == "create":
                    for r in cmd["rooms"]:
                        handles[r] = manager.create_receiver(r, "127.0.0.1", cmd["port"])
                elif op == "prealloc":
                    for r, pages in cmd["pages"].items():
                        handles[r].prealloc(pages)
                elif op == "send":
                    for r, (pages, token, logprob) in cmd["sends"].items():
                        handles[r].send(pages, token, logprob)
                elif op == "abort":
                    for r in cmd["rooms"]:
                        handles[r].abort(cmd["reason"])
                elif op == "wait":  # until every room is in one of `states` (or final)
                    deadline = time.monotonic() + cmd["wait_s"]
                    while True:
                        manager.tick()
                        out = {r: info(r) for r in cmd["rooms"]}
                        ok = {*cmd["states"], *FINAL}
                        if all(v["state"] in ok for v in out.values()):
                            break
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.005)
                    conn.send({"rooms": out})
                    continue
                elif op == "pages":
                    idx = torch.tensor(cmd["pages"], device=pool.k.device)
                    data = [
                        t[:, idx].cpu().contiguous().view(torch.int16) for t in (pool.k, pool.v)
                    ]
                    conn.send({"bytes": b"".join(d.numpy().tobytes() for d in data)})
                    continue
                elif op == "metrics":
                    conn.send(manager.metrics(drain_samples=True))
                    continue
                conn.send({})
            except Exception as exc:  # the test sees it as a failure, with the message
                conn.send({"error": f"{type(exc).__name__}: {exc}"})
    except EOFError:
        pass
    manager.close()


class Peer:
    """A prefill or decode process with its KV pool and manager."""

    def __init__(self, role: str, env: dict[str, str], **pool_kw: Any) -> None:
        self.role = role
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(role, env, pool_kw, child), daemon=True)
        self.proc.start()
        child.close()
        self.info = self._recv(120)

    def _recv(self, timeout: float) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role} peer did not answer within {timeout} s")
        reply = self.conn.recv()
        if "error" in reply:
            raise AssertionError(f"{self.role}: {reply['error']}")
        return reply

    def call(self, op: str, timeout: float = 30, **kw: Any) -> dict[str, Any]:
        self.conn.send({"op": op, **kw})
        return self._recv(timeout)

    def wait(self, rooms: list[int], states: tuple[str, ...] = (), timeout: float = 10) -> Any:
        return self.call("wait", timeout + 30, rooms=rooms, states=states, wait_s=timeout)["rooms"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send({"op": "exit"})
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


@pytest.fixture(scope="module")
def prefill() -> Iterator[Peer]:
    env = {**PREFILL_ENV, "PDCORE_DISAGGREGATION_BOOTSTRAP_PORT": str(free_port())}
    peer = Peer("prefill", env)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def decode() -> Iterator[Peer]:
    peer = Peer("decode", DECODE_ENV)
    yield peer
    peer.stop()


def rooms(n: int) -> list[int]:
    return [random.getrandbits(63) for _ in range(n)]


def start_rooms(prefill: Peer, decode: Peer, rs: list[int]) -> None:
    prefill.call("create", rooms=rs)
    decode.call("create", rooms=rs, port=prefill.info["port"])
    got = decode.wait(rs, ("WaitingForInput",))
    assert {v["state"] for v in got.values()} == {"WaitingForInput"}, got


# --- the lifecycle ----------------------------------------------------------------------------


def test_settings_read_env_and_sglang_names(prefill: Peer, decode: Peer) -> None:
    assert prefill.info["settings"]["disaggregation_bootstrap_timeout"] == 3
    assert prefill.info["settings"]["disaggregation_bootstrap_entry_cleanup_interval"] == 1
    assert decode.info["settings"]["disaggregation_waiting_timeout"] == 2
    assert decode.info["settings"]["disaggregation_queue_size"] == 4


def test_many_rooms_move_kv_byte_for_byte(prefill: Peer, decode: Peer) -> None:
    rs = rooms(8)
    start_rooms(prefill, decode, rs)
    src, dst = list(range(1, 32)), list(range(1, 32))
    random.shuffle(src)
    random.shuffle(dst)
    n = 3
    plan = {r: (src[i * n : (i + 1) * n], dst[i * n : (i + 1) * n]) for i, r in enumerate(rs)}
    decode.call("prealloc", pages={r: d for r, (_, d) in plan.items()})
    assert all(
        v["state"] == "WaitingForInput" for v in prefill.wait(rs, ("WaitingForInput",)).values()
    )
    sends = {r: (s, 1000 + i, -0.5 * i) for i, (r, (s, _)) in enumerate(plan.items())}
    prefill.call("send", sends=sends)
    sent, got = prefill.wait(rs), decode.wait(rs)
    for i, r in enumerate(rs):
        assert sent[r]["state"] == "Success", sent[r]
        assert got[r]["state"] == "Success", got[r]
        assert (got[r]["token"], got[r]["logprob"]) == (1000 + i, -0.5 * i)
        if BACKEND != "fake":  # fake moves no bytes by design
            s, d = plan[r]
            assert decode.call("pages", pages=d)["bytes"] == prefill.call("pages", pages=s)["bytes"]
    m = prefill.call("metrics")["transfer"][BACKEND]
    assert m["transfers_total"] >= 8 and m["bytes_total"] >= 8 * 3 * 2 * 4 * 16 * 2 * 8 * 2
    assert len(m["latency_samples_s"]) >= 8


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available() and BACKEND == "nixl"


@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA and nixl (VRAM pools)")
def test_cuda_pools_move_kv_byte_for_byte() -> None:
    env = {**PREFILL_ENV, "PDCORE_DISAGGREGATION_BOOTSTRAP_PORT": str(free_port())}
    p = Peer("prefill", env, device="cuda:0")
    d = Peer("decode", DECODE_ENV, device="cuda:0")
    try:
        rs = rooms(4)
        start_rooms(p, d, rs)
        d.call("prealloc", pages={r: [20 + i, 1 + i] for i, r in enumerate(rs)})
        p.wait(rs, ("WaitingForInput",))
        p.call("send", sends={r: ([2 + 2 * i, 3 + 2 * i], i, None) for i, r in enumerate(rs)})
        got = d.wait(rs)
        for i, r in enumerate(rs):
            assert got[r]["state"] == "Success" and got[r]["token"] == i, got[r]
            src = p.call("pages", pages=[2 + 2 * i, 3 + 2 * i])["bytes"]
            assert d.call("pages", pages=[20 + i, 1 + i])["bytes"] == src
    finally:
        d.stop()
        p.stop()


def test_prefill_side_arrives_after_decode_pages(prefill: Peer, decode: Peer) -> None:
    """The router sends both legs at once: decode's page list may come first."""
    (r,) = rooms(1)
    decode.call("create", rooms=[r], port=prefill.info["port"])
    assert decode.wait([r], ("WaitingForInput",))[r]["state"] == "WaitingForInput"
    decode.call("prealloc", pages={r: [5]})
    time.sleep(0.2)
    prefill.call("create", rooms=[r])
    assert prefill.wait([r], ("WaitingForInput",))[r]["state"] == "WaitingForInput"
    prefill.call("send", sends={r: ([7], 42, None)})
    got, sent = decode.wait([r])[r], prefill.wait([r])[r]
    assert got["state"] == sent["state"] == "Success" and got["token"] == 42, (got, sent)


def test_bootstrap_server_health_and_route(prefill: Peer) -> None:
    import json
    import urllib.request

    base = f"http://127.0.0.1:{prefill.info['port']}"
    with urllib.request.urlopen(base + "/health", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(base + "/route", timeout=5) as resp:
        route = json.load(resp)
    assert route["endpoint"].startswith("tcp://127.0.0.1:")
    assert route["spec"]["page_size"] == 16 and route["spec"]["dtype"] == "bfloat16"


def test_wildcard_endpoint_is_reached_at_the_bootstrap_host() -> None:
    from pdcore.disagg.bootstrap import reachable_endpoint as _reachable

    assert _reachable("tcp://0.0.0.0:5000", "10.0.0.7") == "tcp://10.0.0.7:5000"
    assert _reachable("tcp://10.0.0.8:5000", "10.0.0.7") == "tcp://10.0.0.8:5000"
    assert _reachable("tcp://[::]:5000", "fe80::1") == "tcp://[fe80::1]:5000"


# --- faults -----------------------------------------------------------------------------------


def test_page_size_mismatch_refused_on_both_sides(prefill: Peer) -> None:
    other = Peer("decode", DECODE_ENV, page_size=32)
    try:
        (r,) = rooms(1)
        prefill.call("create", rooms=[r])
        other.call("create", rooms=[r], port=prefill.info["port"])
        got = other.wait([r])[r]
        sent = prefill.wait([r], timeout=5)[r]
    finally:
        other.stop()
    for side in (got, sent):
        assert side["state"] == "Failed", side
        assert "page size: prefill 16, decode 32" in side["reason"], side


def test_bootstrap_host_pointing_nowhere_fails_fast(decode: Peer) -> None:
    (r,) = rooms(1)
    t0 = time.monotonic()
    decode.call("create", rooms=[r], port=free_port())
    got = decode.wait([r])[r]
    assert got["state"] == "Failed" and "bootstrap server at 127.0.0.1:" in got["reason"], got
    assert time.monotonic() - t0 < 3  # heartbeat 0.5 s x 2, not a long timeout


def test_abort_from_decode_fails_prefill(prefill: Peer, decode: Peer) -> None:
    rs = rooms(2)
    start_rooms(prefill, decode, rs)
    decode.call("prealloc", pages={rs[0]: [1]})  # one with pages sent, one without
    decode.call("abort", rooms=rs, reason="client went away")
    sent = prefill.wait(rs, timeout=5)
    for r in rs:
        assert sent[r]["state"] == "Failed" and "client went away" in sent[r]["reason"], sent[r]


def test_abort_from_prefill_fails_decode(prefill: Peer, decode: Peer) -> None:
    rs = rooms(2)
    start_rooms(prefill, decode, rs)
    decode.call("prealloc", pages={rs[0]: [2]})
    prefill.wait([rs[0]], ("WaitingForInput",))
    prefill.call("abort", rooms=rs, reason="router cancelled")
    decode.call("prealloc", pages={rs[1]: [3]})  # pages after the abort: refused at once
    got = decode.wait(rs, timeout=5)
    for r in rs:
        assert got[r]["state"] == "Failed" and "router cancelled" in got[r]["reason"], got[r]


def test_bootstrap_timeout(prefill: Peer) -> None:
    (r,) = rooms(1)
    prefill.call("create", rooms=[r])
    sent = prefill.wait([r], timeout=10)[r]
    assert sent["state"] == "Failed" and "bootstrap timeout" in sent["reason"], sent


def test_waiting_timeout(prefill: Peer, decode: Peer) -> None:
    (r,) = rooms(1)
    decode.call("create", rooms=[r], port=prefill.info["port"])
    decode.wait([r], ("WaitingForInput",))
    decode.call("prealloc", pages={r: [4]})  # prefill never gets this request
    got = decode.wait([r], timeout=10)[r]
    assert got["state"] == "Failed" and "waiting timeout" in got["reason"], got


def test_prefill_killed_fails_decode_within_heartbeats(decode: Peer) -> None:
    env = {**PREFILL_ENV, "PDCORE_DISAGGREGATION_BOOTSTRAP_PORT": str(free_port())}
    doomed = Peer("prefill", env)
    try:
        rs = rooms(3)
        start_rooms(doomed, decode, rs)
        decode.call("prealloc", pages={rs[0]: [6]})
        doomed.kill()
        t0 = time.monotonic()
        got = decode.wait(rs, timeout=10)
        took = time.monotonic() - t0
    finally:
        doomed.stop()
    for r in rs:
        assert got[r]["state"] == "Failed" and "heartbeat" in got[r]["reason"], got[r]
    assert took < 0.5 * 2 + 1.0, took  # interval x max failures, plus one interval
    reborn = Peer("prefill", env)  # same bootstrap port: decode looks it up afresh
    try:
        (r,) = rooms(1)
        start_rooms(reborn, decode, [r])
        decode.call("prealloc", pages={r: [6]})
        reborn.wait([r], ("WaitingForInput",))
        reborn.call("send", sends={r: ([6], 5, None)})
        assert decode.wait([r])[r]["state"] == "Success"
    finally:
        reborn.stop()


def test_decode_killed_fails_prefill(prefill: Peer) -> None:
    doomed = Peer("decode", DECODE_ENV)
    try:
        rs = rooms(2)
        start_rooms(prefill, doomed, rs)
        doomed.call("prealloc", pages={r: [8 + i] for i, r in enumerate(rs)})
        prefill.wait(rs, ("WaitingForInput",))
        doomed.kill()
        t0 = time.monotonic()
        prefill.call("send", sends={rs[0]: ([9], 1, None)})  # the other never gets sent
        sent = prefill.wait(rs, timeout=10)
        took = time.monotonic() - t0
    finally:
        doomed.stop()
    for r in rs:
        assert sent[r]["state"] == "Failed", sent[r]
    assert took < 3 + 0.5, took  # at the latest the bootstrap timeout


def test_kvpoll_numbering_matches_sglang() -> None:
    assert [s.value for s in KVPoll] == [0, 1, 2, 3, 4]
    assert KVPoll.Failed.finished and KVPoll.Success.finished
    assert not KVPoll.Transferring.finished


def test_fake_backend_in_one_process() -> None:
    """pd_fake needs no second process: both managers here, the whole lifecycle, quickly."""
    import torch

    from pdcore.disagg.kv_receiver import DecodeKVManager
    from pdcore.disagg.kv_sender import PrefillKVManager
    from pdcore.disagg.settings import DisaggSettings
    from pdcore.model.kv_pool import KVPool

    settings = DisaggSettings(
        disaggregation_transfer_backend="fake", disaggregation_bootstrap_port=free_port()
    )
    pools = [KVPool(4, 32, 16, 2, 8, torch.bfloat16, torch.device("cpu")) for _ in ("p", "d")]
    p = PrefillKVManager(settings, pools[0], "127.0.0.1")
    d = DecodeKVManager(settings, pools[1], "127.0.0.1")
    try:
        rs = rooms(4)
        senders = [p.create_sender(r) for r in rs]
        receivers = [d.create_receiver(r, "127.0.0.1", p.bootstrap_port) for r in rs]

        def until(handles: list[Any], state: KVPoll) -> None:
            deadline = time.monotonic() + 10
            while {h.poll() for h in handles} != {state} and time.monotonic() < deadline:
                p.tick()
                d.tick()
                time.sleep(0.005)
            assert [h.poll() for h in handles] == [state] * len(handles), [
                (h.poll(), h.failure_reason) for h in handles
            ]

        until(receivers, KVPoll.WaitingForInput)
        for i, rcv in enumerate(receivers):
            rcv.prealloc([1 + i])
        until(senders, KVPoll.WaitingForInput)
        for i, snd in enumerate(senders):
            snd.send([2 + i], 7 + i, None)
        until(senders, KVPoll.Success)
        until(receivers, KVPoll.Success)
        assert [r.first_token for r in receivers] == [7, 8, 9, 10]
        assert d.metrics()["transfer"]["fake"]["transfers_total"] == 4
    finally:
        d.close()
        p.close()
