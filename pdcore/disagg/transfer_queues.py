"""Prefill's sending pool: SGLang's transfer queues on pdcore's transfer contract.

SGLANG_DISAGGREGATION_QUEUE_SIZE queues, each drained in order by its own thread; a decode
peer is pinned to one queue (new peers go round-robin), so several peers are served in
parallel while one slow peer holds up only its own queue -- and with one queue every send
waits for the one before it. SGLANG_DISAGGREGATION_THREAD_POOL_SIZE workers are shared out
among the queues: a queue with W of them cuts each send's runs into up to W slices written
at once as separate batches (as SGLang's per-queue executor splits a chunk), then sends the
room's notification on its own, after every slice is in place.

A queue's thread drives its sends itself (submit, then poll until done), so a write moves
even while the engine loop is busy in a forward pass; the caller hears the outcome through
`on_done`. Every backend call is made under the manager's lock (backends are not
thread-safe), never while sleeping.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np

from pdcore.disagg.transfer import (
    DONE,
    BatchState,
    BatchStatus,
    RunArray,
    TransferBackend,
    TransferError,
    as_runs,
    failed,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.001
"""Sleep between polls of a queue's in-flight batches (lock released meanwhile): 1 ms adds at
most 1 ms to a transfer's completion, while 0.2 ms woke a busy queue 5,000 times a second,
competing with forward passes on small CPUs."""

_PART = "part"


def pack_part(room: int) -> bytes:
    """The notification of a slice of a room's KV (all but the room's last message):
    receivers skip it; the room's own notification follows once every slice is in place."""
    return msgpack.packb({_PART: True, "room": room})


def is_part(payload: bytes) -> bool:
    try:
        msg = msgpack.unpackb(payload, raw=False)
    except Exception:
        return False
    return isinstance(msg, dict) and msg.get(_PART) is True


@dataclass
class SendJob:
    peer_id: str
    room: int
    runs: RunArray
    notification: bytes
    on_done: Callable[[BatchState], None]
    """Called on the queue's thread, without the lock, with DONE or failed(reason)."""
    cancelled: Callable[[], bool]
    """True once the room no longer wants the send (aborted, timed out)."""


class TransferQueues:
    """See the module docstring. `lock` guards every call into `backend`."""

    def __init__(
        self,
        backend: TransferBackend,
        lock: threading.RLock,
        queue_size: int,
        thread_pool_size: int,
        name: str = "pd-send",
    ) -> None:
        if queue_size < 1 or thread_pool_size < 1:
            raise ValueError("queue_size and thread_pool_size must be at least 1")
        self.backend = backend
        self.lock = lock
        self.queue_size = queue_size
        # THREAD_POOL_SIZE workers shared out among the queues (at least one each).
        self.slices_per_send = max(1, thread_pool_size // queue_size)
        self._queues: list[queue.SimpleQueue[SendJob | None]] = [
            queue.SimpleQueue() for _ in range(queue_size)
        ]
        self._peer_queue: dict[str, int] = {}
        self._next = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"{name}-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def queue_of(self, peer_id: str) -> int:
        """The queue a peer's sends go through: fixed once chosen, new peers round-robin."""
        with self.lock:
            index = self._peer_queue.get(peer_id)
            if index is None:
                index = self._peer_queue[peer_id] = self._next % self.queue_size
                self._next += 1
            return index

    def forget(self, peer_id: str) -> None:
        with self.lock:
            self._peer_queue.pop(peer_id, None)

    def put(self, job: SendJob) -> None:
        if self._closed:
            raise TransferError("the transfer queues are closed")
        self._queues[self.queue_of(job.peer_id)].put(job)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads once their current send ends (queued sends are dropped: their
        rooms were failed by the caller)."""
        if self._closed:
            return
        self._closed = True
        for q in self._queues:
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- a queue's thread -------------------------------------------------------------------

    def _run(self, q: queue.SimpleQueue[SendJob | None]) -> None:
        while True:
            job = q.get()
            if job is None or self._closed:
                return
            if job.cancelled():
                continue
            try:
                state = self._send(job)
            except Exception as exc:  # never let one send kill the queue
                logger.exception("PD send of room %d failed", job.room)
                state = failed(f"{type(exc).__name__}: {exc}")
            try:
                job.on_done(state)
            except Exception:
                logger.exception("PD send of room %d: completion callback failed", job.room)

    def _slices(self, runs: RunArray) -> list[RunArray]:
        n = min(self.slices_per_send, len(runs))
        if n <= 1:
            return [runs]
        # Equal bytes per slice, cut at run boundaries.
        ends = np.cumsum(runs[:, 2].astype(np.float64))
        cuts = np.searchsorted(ends, ends[-1] * np.arange(1, n) / n, side="right")
        return [s for s in np.split(runs, cuts) if len(s)]

    def _send(self, job: SendJob) -> BatchState:
        runs = as_runs(job.runs)
        slices = self._slices(runs)
        if len(slices) == 1:
            return self._write([(slices[0], job.notification)], job)
        state = self._write([(s, pack_part(job.room)) for s in slices], job)
        if state.status is not BatchStatus.DONE:
            return state
        empty = np.zeros((0, 3), dtype=np.uint64)
        return self._write([(empty, job.notification)], job)

    def _write(self, parts: list[tuple[RunArray, bytes]], job: SendJob) -> BatchState:
        """Submit every part at once, poll them all to the end; the first failure wins."""
        batches: list[int] = []
        try:
            with self.lock:
                for runs, note in parts:
                    batches.append(self.backend.submit(job.peer_id, runs, note))
            pending = list(batches)
            while pending:
                if job.cancelled() or self._closed:
                    return failed("cancelled")
                still = []
                with self.lock:
                    for b in pending:
                        st = self.backend.poll(b)
                        if st.status is BatchStatus.FAILED:
                            return st
                        if st.status is BatchStatus.PENDING:
                            still.append(b)
                pending = still
                if pending:
                    time.sleep(POLL_INTERVAL_S)
            return DONE
        except TransferError as exc:
            return failed(str(exc))
        finally:
            with self.lock:
                for b in batches:
                    self.backend.release(b)
