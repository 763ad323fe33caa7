"""The router's fault-handling and flow-control parts on their own, with a driven clock:
circuit breaker, retry backoff, token bucket, the admission queue, the worker pool, the
worker flags (both of SGLang's forms), and the text a policy routes on."""

from __future__ import annotations

import asyncio
import random

import pytest

from pdcore.router.admission import Admission, Rejected, TokenBucket
from pdcore.router.health import sum_load
from pdcore.router.pd import route_text
from pdcore.router.resilience import Backoff, BreakerState, CircuitBreaker, is_worker_fault
from pdcore.router.settings import PrefillWorker, RouterSettings, parse_router_args
from pdcore.router.workers import WorkerExists, WorkerPool

P, D = "http://127.0.0.1:30000", "http://127.0.0.1:30001"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- circuit breaker -------------------------------------------------------------------


def test_breaker_opens_after_threshold_then_half_opens_and_closes() -> None:
    clock, changes = Clock(), []
    cb = CircuitBreaker(
        3,
        2,
        timeout_s=10,
        window_s=60,
        clock=clock,
        on_change=lambda a, b: changes.append((a.value, b.value)),
    )
    for _ in range(2):
        cb.record_failure()
    assert cb.state is BreakerState.CLOSED and cb.allows()
    cb.record_success()  # a success breaks the streak
    for _ in range(2):
        cb.record_failure()
    assert cb.allows()
    cb.record_failure()
    assert cb.state is BreakerState.OPEN and not cb.allows()
    clock.now += 9.9
    assert not cb.allows()
    clock.now += 0.2
    assert cb.state is BreakerState.HALF_OPEN and cb.allows()
    cb.record_success()
    assert cb.state is BreakerState.HALF_OPEN
    cb.record_success()
    assert cb.state is BreakerState.CLOSED
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_breaker_half_open_failure_reopens_and_old_streaks_expire() -> None:
    clock = Clock()
    cb = CircuitBreaker(2, 1, timeout_s=5, window_s=30, clock=clock)
    cb.record_failure()
    clock.now += 31  # the first failure is outside the window: the streak restarts
    cb.record_failure()
    assert cb.state is BreakerState.CLOSED and cb.consecutive_failures == 1
    cb.record_failure()
    assert cb.state is BreakerState.OPEN
    clock.now += 5
    assert cb.state is BreakerState.HALF_OPEN
    cb.record_failure()
    assert cb.state is BreakerState.OPEN and not cb.allows()
    cb.reset()
    assert cb.state is BreakerState.CLOSED and cb.consecutive_failures == 0


def test_disabled_breaker_counts_but_never_opens() -> None:
    cb = CircuitBreaker(1, 1, 5, 30, enabled=False, clock=Clock())
    for _ in range(5):
        cb.record_failure()
    assert cb.allows() and cb.consecutive_failures == 5


@pytest.mark.parametrize(
    "reason, status, fault",
    [
        ("connect", None, True),
        ("timeout", None, True),
        ("closed", None, True),
        ("error_event", None, True),
        ("status", 500, True),
        ("status", 503, True),
        ("status", 408, True),
        ("status", 429, True),
        ("status", 400, False),
        ("status", 404, False),
    ],
)
def test_which_failures_are_the_workers(reason, status, fault) -> None:
    assert is_worker_fault(reason, status) is fault


# --- backoff -----------------------------------------------------------------------------


def test_backoff_schedule_is_exponential_capped_and_jittered() -> None:
    b = Backoff(initial_s=0.05, max_s=0.5, multiplier=2.0, jitter=0.0)
    assert [b.delay(n) for n in range(1, 7)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = Backoff(0.1, 10, 1.5, jitter=0.2, rng=random.Random(7))
    delays = [jittered.delay(3) for _ in range(200)]
    base = 0.1 * 1.5**2
    assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
    assert max(delays) - min(delays) > base * 0.2  # really spread


# --- token bucket and admission ------------------------------------------------------------


def test_token_bucket_refills_at_rate_up_to_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=2.0, clock=clock)
    assert bucket.try_acquire() and bucket.try_acquire()
    assert not bucket.try_acquire()
    assert bucket.seconds_until() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.try_acquire() and not bucket.try_acquire()
    clock.now += 100  # never more than capacity
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]


def test_admission_fifo_queue_full_and_timeout() -> None:
    async def main() -> None:
        rejected: list[str] = []
        adm = Admission(2, queue_size=2, queue_timeout_s=0.3, on_reject=rejected.append)
        t1, t2 = await adm.admit(), await adm.admit()
        order: list[int] = []

        async def wait(i: int) -> None:
            ticket = await adm.admit()
            order.append(i)
            await asyncio.sleep(0.01)
            ticket.release()

        waiters = [asyncio.create_task(wait(i)) for i in range(2)]
        await asyncio.sleep(0.01)
        assert (adm.active, adm.queued) == (2, 2)
        with pytest.raises(Rejected) as full:
            await adm.admit()
        assert full.value.status == 429 and full.value.code == "queue_full"
        t1.release()
        t1.release()  # idempotent
        t2.release()
        await asyncio.gather(*waiters)
        assert order == [0, 1]  # first come, first served
        assert (adm.active, adm.queued) == (0, 0)
        # a request that waits longer than the queue timeout gets 408
        hold = [await adm.admit(), await adm.admit()]
        with pytest.raises(Rejected) as late:
            await adm.admit()
        assert late.value.status == 408 and late.value.code == "queue_timeout"
        assert adm.queued == 0
        for t in hold:
            t.release()
        assert adm.active == 0
        assert rejected == ["queue_full", "queue_timeout"]
        body = full.value.response()
        assert body.status_code == 429 and b'"type":"rate_limit_error"' in body.body

    asyncio.run(main())


def test_admission_cancelled_waiter_leaves_no_slot_behind() -> None:
    async def main() -> None:
        adm = Admission(1, queue_size=4, queue_timeout_s=10)
        first = await adm.admit()
        waiter = asyncio.create_task(adm.admit())
        await asyncio.sleep(0.01)
        waiter.cancel()  # the client went away while queued
        await asyncio.gather(waiter, return_exceptions=True)
        first.release()
        assert (adm.active, adm.queued) == (0, 0)
        unlimited = Admission(0, 0, 1)
        tickets = [await unlimited.admit() for _ in range(50)]
        assert unlimited.active == 0 and len(tickets) == 50

    asyncio.run(main())


def test_rate_limit_rejects_with_retry_after() -> None:
    async def main() -> None:
        clock = Clock()
        adm = Admission(-1, 0, 1, bucket=TokenBucket(1.0, 1.0, clock=clock))
        await adm.admit()
        with pytest.raises(Rejected) as exc:
            await adm.admit()
        assert exc.value.status == 429 and exc.value.code == "rate_limited"
        assert exc.value.response().headers["retry-after"] == "1"
        clock.now += 1
        await adm.admit()

    asyncio.run(main())


# --- workers -------------------------------------------------------------------------------


def _settings(**kw) -> RouterSettings:
    return RouterSettings(pd_disaggregation=True, prefill=[P], decode=[D], **kw)


def test_pool_availability_follows_health_and_breaker() -> None:
    s = _settings(health_failure_threshold=2, health_success_threshold=2, cb_failure_threshold=1)
    pool = WorkerPool(s)
    p = pool.add(P, "prefill", 8998)
    d0, d1 = pool.add(D, "decode"), pool.add("http://h:1", "decode")
    assert [p.worker.worker_id, d0.worker.worker_id, d1.worker.worker_id] == [
        "prefill-0",
        "decode-0",
        "decode-1",
    ]
    with pytest.raises(WorkerExists):
        pool.add(D, "decode")
    assert pool.record_health(d0, False, "down") is None  # one failure is not enough
    assert pool.record_health(d0, False, "down") is False
    assert pool.available("decode") == [d1.worker]
    pool.record_result(d1.worker, False)  # breaker threshold 1: open
    assert pool.available("decode") == [] and d1.detail()["circuit_breaker"] == "open"
    assert pool.record_health(d0, True) is None
    assert pool.record_health(d0, True) is True
    assert pool.available("decode") == [d0.worker]
    pool.remove(d0)
    assert pool.member(d0.worker) is None and pool.workers("decode") == [d1.worker]
    pool.record_result(d0.worker, False)  # a removed worker's late result is dropped
    assert pool.add(D, "decode").worker.worker_id == "decode-2"  # ids are never reused


def test_sum_load_over_dp_ranks() -> None:
    assert sum_load([{"num_reqs": 1, "num_tokens": 10}, {"num_reqs": 2, "num_tokens": 5}]) == {
        "num_reqs": 3,
        "num_waiting_reqs": 0,
        "num_tokens": 15,
    }
    assert sum_load({"num_reqs": 4})["num_reqs"] == 4
    assert sum_load("nonsense") is None


# --- worker flags --------------------------------------------------------------------------


def test_reference_multi_url_prefill_and_decode_lines() -> None:
    # The reference's `--prefill URL1 URL2 [PORT] --decode URL3 URL4`, mixed with repeats.
    s = parse_router_args(
        ["--pd-disaggregation", "--prefill", "http://a:1", "http://b:2", "8998"]
        + ["--prefill", "http://c:3", "none", "http://d:4", "7000"]
        + ["--decode", "http://e:5", "http://f:6", "--decode", "http://g:7"]
    )
    assert s.prefill == [
        PrefillWorker(url="http://a:1"),
        PrefillWorker(url="http://b:2", bootstrap_port=8998),
        PrefillWorker(url="http://c:3"),
        PrefillWorker(url="http://d:4", bootstrap_port=7000),
    ]
    assert s.decode == ["http://e:5", "http://f:6", "http://g:7"]


@pytest.mark.parametrize(
    "prefill, fragment",
    [
        (["http://a:1", "1", "2"], "unexpected '2' after http://a:1"),
        (["http://a:1", "http://a:1"], "listed twice"),
    ],
)
def test_bad_prefill_lines(prefill, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        RouterSettings(pd_disaggregation=True, prefill=[prefill], decode=[D])


def test_sglang_flag_spellings() -> None:
    s = parse_router_args(
        ["--pd-disaggregation", "--prefill", P, "--decode", D, "--rate-limit", "5"]
        + ["--log-level", "warn", "--disable-retries", "--prefill-policy", "random"]
    )
    assert s.rate_limit_tokens_per_second == 5 and s.log_level == "warn"
    assert s.max_attempts == 1
    assert (s.role_policy("prefill"), s.role_policy("decode")) == ("random", "round_robin")


# --- what a policy routes on ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body, text",
    [
        ({"text": "hello"}, "hello"),
        ({"text": ["first", "second"]}, "first"),
        ({"prompt": "p"}, "p"),
        ({"prompt": [1, 2, 3]}, "1 2 3"),
        ({"input_ids": [[4, 5], [6]]}, "4 5"),
        (
            {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]},
            "a\nb",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "x"),
        ({"sampling_params": {}}, ""),
    ],
)
def test_route_text(body, text) -> None:
    assert route_text(body) == text
