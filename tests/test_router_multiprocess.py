"""`pdcore router --router-processes N`: a supervisor and N router processes on one port.

First the shared flow control on its own (two `SharedAdmission`s on the same shared memory
stand for two processes), then real routers with `--router-processes 2` in front of fake
workers: PD requests served by both processes and summed in /metrics, worker registration
seen by every process once answered, the global admission limits, and the supervisor's
handling of SIGTERM and of a router process that dies.

Which process answers a request is the kernel's choice (SO_REUSEPORT hashes each new
connection), so the tests open a new connection per request, send enough of them that
both processes get some (all on one process has a chance of 2^-(n-1)), and check that
they did from the per-process request counts in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdcore.router.admission import Rejected
from pdcore.router.shared_admission import SharedAdmission, SharedSlots, SharedTokenBucket
from pdcore.testing.processes import pid_alive, spawned_children
from tests.conftest import free_port
from tests.server_helpers import wait_until
from tests.test_router_gateway import QUIET_HEALTH, both, burst, metric
from tests.test_router_helpers import FakeWorker, RouterProcess, pd_flags

pytestmark = [pytest.mark.timeout(120)]

TWO = ("--router-processes", "2")


# --- shared flow control, in one process ----------------------------------------------------


def _pair(max_concurrent: int, queue_size: int, timeout: float = 5.0, rate: float | None = None):
    """Two SharedAdmissions on one SharedSlots: two router processes as the counts see them."""
    ctx = multiprocessing.get_context("spawn")
    slots = SharedSlots(ctx, max(1.0, rate) if rate else 0.0)

    def one() -> SharedAdmission:
        bucket = SharedTokenBucket(slots, rate, max(1.0, rate)) if rate else None
        return SharedAdmission(slots, max_concurrent, queue_size, timeout, bucket)

    return one(), one()


def test_a_slot_freed_in_one_process_goes_to_a_waiter_in_the_other() -> None:
    async def main() -> None:
        a, b = _pair(max_concurrent=2, queue_size=2)
        t1 = a.try_admit()
        t2 = b.try_admit()
        assert t1 is not None and t2 is not None and (a.active, b.active) == (2, 2)
        assert b.try_admit() is None  # full: the slow path
        waiter = asyncio.ensure_future(b.admit())  # waits in "process" b
        await asyncio.sleep(0.01)
        assert (a.queued, b.queued) == (1, 1)
        assert a.try_admit() is None  # someone waits: no jumping the queue, even elsewhere
        extra = asyncio.ensure_future(a.admit())
        await asyncio.sleep(0.01)
        with pytest.raises(Rejected) as full:  # two waiting (one per process): the queue is full
            await a.admit()
        assert full.value.status == 429 and full.value.code == "queue_full"
        assert "2 requests running" in str(full.value) and "2 waiting" in str(full.value)
        t0 = time.monotonic()
        t1.release()  # freed in a: a's own waiter or b's, whichever looks first
        t2.release()
        got = await asyncio.wait_for(asyncio.gather(waiter, extra), 1.0)
        assert time.monotonic() - t0 < 0.5
        assert (a.active, a.queued) == (2, 0)
        for ticket in got:
            ticket.release()
            ticket.release()  # idempotent
        assert (a.active, a.queued, b.active, b.queued) == (0, 0, 0, 0)

    asyncio.run(main())


def test_a_slot_freed_in_one_process_reaches_a_waiter_only_the_poller_can_see() -> None:
    """Process a frees a slot while only process b waits: b's poller must find it (a has
    no waiter to hand it to directly)."""

    async def main() -> None:
        a, b = _pair(max_concurrent=1, queue_size=2)
        held = a.try_admit()
        assert held is not None
        waiter = asyncio.ensure_future(b.admit())
        await asyncio.sleep(0.01)
        assert not waiter.done() and b.queued == 1
        t0 = time.monotonic()
        held.release()  # in a, which has no waiters
        ticket = await asyncio.wait_for(waiter, 0.5)
        assert time.monotonic() - t0 < 0.1  # the 1 ms poll, not the queue timeout
        assert (b.active, b.queued) == (1, 0)
        ticket.release()
        assert (a.active, a.queued) == (0, 0)

    asyncio.run(main())


@pytest.mark.parametrize("shared", [False, True], ids=["one-process", "shared"])
def test_a_slot_granted_as_the_client_leaves_is_released(shared: bool) -> None:
    """The waiter gets its slot in the very turn its client disconnects: on Python <= 3.11
    asyncio.wait_for then returns the ticket despite the cancel; `until_disconnected` must
    release it, or the slot stays taken for good."""
    from pdcore.router.admission import Admission
    from pdcore.router.pd import until_disconnected
    from pdcore.web.streaming import ClientDisconnected

    async def main() -> None:
        adm = _pair(1, 5)[0] if shared else Admission(1, 5, 5.0)
        held = adm.try_admit()
        assert held is not None
        watch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request = asyncio.ensure_future(until_disconnected(watch, adm.admit()))
        await asyncio.sleep(0.01)
        held.release()  # grants the waiter...
        watch.set_result(None)  # ...and the client goes away in the same turn
        with pytest.raises(ClientDisconnected):
            await request
        await asyncio.sleep(0.01)
        assert (adm.active, adm.queued) == (0, 0)

    asyncio.run(main())


def test_shared_queue_timeout_and_cancel_leave_no_count_behind() -> None:
    async def main() -> None:
        a, b = _pair(max_concurrent=1, queue_size=5, timeout=0.1)
        held = a.try_admit()
        assert held is not None
        with pytest.raises(Rejected) as late:
            await b.admit()
        assert late.value.status == 408 and late.value.code == "queue_timeout"
        cancelled = asyncio.ensure_future(b.admit())
        await asyncio.sleep(0.02)
        assert b.queued == 1
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        assert (a.active, a.queued) == (1, 0)
        held.release()
        assert (a.active, a.queued) == (0, 0)

    asyncio.run(main())


def test_the_token_bucket_is_shared() -> None:
    async def main() -> None:
        a, b = _pair(max_concurrent=0, queue_size=0, rate=2.0)
        assert await a.admit() and await b.admit()  # a bucket of two tokens for both
        with pytest.raises(Rejected) as limited:
            await b.admit()
        assert limited.value.code == "rate_limited" and limited.value.retry_after is not None
        with pytest.raises(Rejected):
            await a.admit()
        await asyncio.sleep(0.6)  # a token is back after 0.5 s, in either process
        assert await a.admit()

    asyncio.run(main())


# --- real routers with two processes -------------------------------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeWorker]]:
    workers = {name: FakeWorker(name) for name in ("P0", "P1", "D0", "D1")}
    try:
        yield workers
    finally:
        for w in workers.values():
            w.stop()


@pytest.fixture(autouse=True)
def _reset(fakes: dict[str, FakeWorker]) -> Iterator[None]:
    for w in fakes.values():
        w.reset()
    yield
    assert wait_until(lambda: all(w.active == 0 for w in fakes.values()), timeout=10)


class Routers(RouterProcess):
    """A `pdcore router --router-processes 2` process (the supervisor)."""

    def wait_all(self) -> Routers:
        """Until the supervisor says every router process serves; `children`: their pids."""
        self.wait_ready()
        assert wait_until(lambda: "router processes (pids" in self.log(), timeout=30), self.log()
        found = re.search(r"router processes \(pids ([\d, ]+)\)", self.log())
        assert found is not None
        self.children = [int(p) for p in found.group(1).split(", ")]
        assert sorted(self.children) == sorted(spawned_children(self.proc.pid))
        return self


@contextlib.contextmanager
def routers(tmp: Path, *flags: str) -> Iterator[Routers]:
    r = Routers(tmp / "router.log", *TWO, *flags)
    try:
        yield r.wait_all()
    finally:
        assert r.stop() == 0, r.log()
        assert not any(pid_alive(p) for p in getattr(r, "children", [])), r.log()


def per_process(url: str) -> dict[int, float]:
    """Requests each router process answered (pdcore_router_process_requests by pid)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(r'^pdcore_router_process_requests\{pid="(\d+)"\} (\S+)$', text, re.M)
    return {int(pid): float(v) for pid, v in found}


def answered_by(r: Routers, before: dict[int, float]) -> dict[int, float]:
    """How many requests each router process answered since `before`, the scrapes' own
    requests left out (the counts are read from the metrics, which count those too)."""
    after = per_process(r.url)
    return {pid: after.get(pid, 0) - before.get(pid, 0) for pid in r.children}


def test_pd_requests_are_served_by_both_processes_and_metrics_are_summed(fakes, tmp_path) -> None:
    prom = free_port()
    with routers(tmp_path, *both(fakes, *QUIET_HEALTH, "--prometheus-port", str(prom))) as r:
        before = per_process(r.url)
        answers = [httpx.post(r.url + "/generate", json={"text": f"q{i}"}) for i in range(40)]
        assert [a.status_code for a in answers] == [200] * 40
        assert {a.json()["worker"] for a in answers} == {"D0", "D1"}
        served = answered_by(r, before)
        assert all(n > 0 for n in served.values()), served  # both processes served some
        assert sum(served.values()) >= 40 + 1  # the 40 and the first scrape
        # any process, on either port, shows the sum over both
        for url in [r.url] * 6 + [f"http://127.0.0.1:{prom}"] * 6:
            text = httpx.get(url + "/metrics", timeout=10).text
            assert (
                metric(text, "pdcore_router_requests_total", route="/generate", status="200") == 40
            )
            for role, names in (("decode", ("D0", "D1")), ("prefill", ("P0", "P1"))):
                legs = [
                    metric(text, "pdcore_router_worker_requests_total", role=role, worker=url)
                    for url in (fakes[name].url for name in names)
                ]
                assert sum(legs) == 40 and min(legs) > 0, legs  # round robin in each process
            assert metric(text, "pdcore_router_processes") == 2
            assert metric(text, "pdcore_router_requests_active") == 0
        assert len(fakes["D0"].bodies) + len(fakes["D1"].bodies) == 40


def _ids(url: str) -> dict[str, tuple[str, bool]]:
    """url -> (id, healthy) of the decode workers, as the process answering sees them."""
    listed = httpx.get(url + "/workers", timeout=10).json()["workers"]
    return {w["url"]: (w["id"], w["healthy"]) for w in listed if w["role"] == "decode"}


def test_worker_changes_reach_every_process_before_the_answer(fakes, tmp_path) -> None:
    flags = pd_flags([(fakes["P0"].url, 9001)], [fakes["D0"].url], *QUIET_HEALTH)
    d1 = fakes["D1"].url
    # Every process probes a new worker once before it is in rotation there; a slow probe
    # makes a process that got the change late (after the answer) show it unhealthy.
    fakes["D1"].health_delay = 0.3
    with routers(tmp_path, *flags) as r:
        before = per_process(r.url)
        for round_ in range(6):
            added = httpx.post(r.url + "/workers", json={"url": d1, "role": "decode"})
            assert added.status_code == 201, added.text
            wid = added.json()["id"]
            assert wid == f"decode-{round_ + 1}" and added.json()["healthy"]  # ids never reused
            for _ in range(6):  # new connections, on both processes: each has it already
                assert _ids(r.url) == {fakes["D0"].url: ("decode-0", True), d1: (wid, True)}
            dup = httpx.post(r.url + "/workers", json={"url": d1, "role": "decode"})
            assert dup.status_code == 409 and dup.json()["error"]["code"] == "worker_exists"
            gone = httpx.delete(f"{r.url}/workers/{wid}")
            assert gone.status_code == 200 and gone.json()["id"] == wid
            for _ in range(6):
                assert _ids(r.url) == {fakes["D0"].url: ("decode-0", True)}
            assert httpx.delete(f"{r.url}/workers/{wid}").status_code == 404
        # SGLang's query-string forms, then PD requests on both processes use the new worker
        q = httpx.post(f"{r.url}/add_worker?url={fakes['P1'].url}&role=prefill&bootstrap_port=9002")
        assert q.status_code == 201 and q.json()["id"] == "prefill-1"
        httpx.post(r.url + "/workers", json={"url": d1, "role": "decode"})
        for _ in range(6):
            listed = httpx.get(r.url + "/list_workers").json()
            assert listed == {
                "prefill": [fakes["P0"].url, fakes["P1"].url],
                "decode": [fakes["D0"].url, d1],
            }
        workers = [
            httpx.post(r.url + "/generate", json={"text": "x"}).json()["worker"] for _ in range(12)
        ]
        assert set(workers) == {"D0", "D1"}
        assert httpx.post(f"{r.url}/remove_worker?url={fakes['P1'].url}").status_code == 200
        for _ in range(6):
            assert httpx.get(r.url + "/list_workers").json()["prefill"] == [fakes["P0"].url]
        served = answered_by(r, before)
        assert all(n > 0 for n in served.values()), served


def test_the_admission_burst_is_global(fakes, tmp_path) -> None:
    for w in fakes.values():
        w.delay = 2.0  # slow: the burst arrives while the first four run
    flags = both(fakes, "--max-concurrent-requests", "4", "--queue-size", "4", *QUIET_HEALTH)
    with routers(tmp_path, *flags) as r:
        before = per_process(r.url)
        answers = burst(r.url, 20)  # 20 connections: spread over both processes
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * 8 + [429] * 12, statuses
        for a in answers:
            if a.status_code == 429:
                err = a.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
                assert "--max-concurrent-requests 4" in err["message"]
                assert a.headers["retry-after"] == "1"
        served = answered_by(r, before)
        assert all(n > 0 for n in served.values()), served
        assert len(fakes["D0"].bodies) + len(fakes["D1"].bodies) == 8
        # nothing leaks: both processes' counts are back to 0
        assert wait_until(lambda: all(w.active == 0 for w in fakes.values()), timeout=10)
        for _ in range(6):
            text = httpx.get(r.url + "/metrics").text
            assert metric(text, "pdcore_router_rejected_requests_total", reason="queue_full") == 12
            assert metric(text, "pdcore_router_requests_active") == 0
            assert metric(text, "pdcore_router_queue_depth") == 0
            load = httpx.get(r.url + "/get_load", timeout=10).json()
            assert all(w["router_in_flight"] == 0 for role in load.values() for w in role), load


def test_one_slot_and_one_token_bucket_across_processes(fakes, tmp_path) -> None:
    """--max-concurrent-requests 1: never two requests on the workers at once, though the
    requests arrive on both processes; every waiter gets its turn wherever the slot frees."""
    fakes["D0"].delay = fakes["D1"].delay = 0.3
    flags = both(fakes, "--max-concurrent-requests", "1", *QUIET_HEALTH)
    with routers(tmp_path, *flags) as r:
        before = per_process(r.url)
        with ThreadPoolExecutor(8) as pool:
            calls = [
                pool.submit(httpx.post, r.url + "/generate", json={"text": str(i)}, timeout=30)
                for i in range(8)
            ]
            assert [c.result().status_code for c in calls] == [200] * 8
        served = answered_by(r, before)
        assert all(n > 0 for n in served.values()), served
        arrivals = sorted(fakes["D0"].arrivals + fakes["D1"].arrivals)
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert len(arrivals) == 8 and min(gaps) > 0.25, gaps  # one at a time
    with routers(tmp_path, *both(fakes, "--rate-limit", "1", *QUIET_HEALTH)) as r:
        before = per_process(r.url)
        answers = burst(r.url, 8)  # one bucket of one token for both processes
        assert sorted(a.status_code for a in answers) == [200] + [429] * 7
        served = answered_by(r, before)
        assert all(n > 0 for n in served.values()), served


def test_sigterm_stops_every_process_and_a_dead_one_stops_the_supervisor(fakes, tmp_path) -> None:
    r = Routers(tmp_path / "a.log", *TWO, *both(fakes, *QUIET_HEALTH))
    try:
        r.wait_all()
        assert len(r.children) == 2 and all(pid_alive(p) for p in r.children)
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(30) == 0, r.log()
        assert not any(pid_alive(p) for p in r.children), r.log()
        assert "stopping 2 router processes" in r.log()
    finally:
        r.stop()
    r = Routers(tmp_path / "b.log", *TWO, *both(fakes, *QUIET_HEALTH))
    try:
        r.wait_all()
        victim, other = r.children
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        code = r.proc.wait(30)
        assert code == 1, r.log()
        assert time.monotonic() - t0 < 15
        assert f"router process 0 (pid {victim}) was killed by SIGKILL" in r.log() or (
            f"router process 1 (pid {victim}) was killed by SIGKILL" in r.log()
        ), r.log()
        assert wait_until(lambda: not pid_alive(other), timeout=10), r.log()
    finally:
        r.stop()


def test_a_router_process_stops_when_the_supervisor_is_killed(fakes, tmp_path) -> None:
    r = Routers(tmp_path / "router.log", *TWO, *both(fakes, *QUIET_HEALTH))
    metrics_dir = None
    try:
        r.wait_all()
        environ = Path(f"/proc/{r.children[0]}/environ").read_bytes().split(b"\0")
        metrics_dir = next(
            e.split(b"=", 1)[1].decode()
            for e in environ
            if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
        )
        r.proc.kill()  # no chance to stop them: they notice their link closing
        r.proc.wait(10)
        assert wait_until(lambda: not any(pid_alive(p) for p in r.children), timeout=20), r.log()
        assert "the router supervisor is gone: stopping" in r.log()
    finally:
        r.stop()
        for pid in r.children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if metrics_dir is not None:  # a killed supervisor leaves its folder behind
            shutil.rmtree(metrics_dir, ignore_errors=True)
