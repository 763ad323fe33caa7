"""The decode instance's request lifecycle, in one place (the reference's four queues).

1. Prealloc queue: a KVReceiver per request handshakes with the prefill instance named by
   bootstrap_host/port; once it is ready and pages are free, the prompt's pages are
   allocated here and their addresses sent to prefill, which writes straight into them.
2. Transfer queue: the receiver is polled (non-blocking) until the KV and the first token
   (sampled on prefill) have arrived.
3. Waiting queue -> 4. running batch: the request joins the scheduler's running batch as a
   prebuilt sequence — no prefill forward here — exactly where unified mode would stand
   after its prefill, so outputs equal unified mode's.
Failures (prefill dead per heartbeat, waiting timeout, abort) end the request clearly and
free its pages.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from pdcore.disagg.kv_poll import KVPoll, overloaded, pd_failure
from pdcore.disagg.kv_receiver import DecodeKVManager, KVReceiver
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.tp_plan import tp_place
from pdcore.engine.pipeline import BootstrapInfo, Pipeline, PipelineHost
from pdcore.engine.request import Request, RequestError
from pdcore.engine.scheduler import pages_for

# After a request in the transfer queue fails or is aborted, prefill may still be writing
# into its pages (a write cannot be recalled); they are reused only after this grace period,
# so a late write can never land in another request's KV.
ABORT_QUARANTINE_S = 1.0


class DecodePipeline(Pipeline):
    mode = "decode"

    def __init__(self, host: PipelineHost, settings: DisaggSettings, bind_host: str) -> None:
        """`bind_host`: the address this side's transfer endpoint advertises (--host)."""
        super().__init__(host)
        self.manager = DecodeKVManager(settings, host.kv_pool, bind_host, *tp_place(host))
        self.prealloc_queue: OrderedDict[Request, KVReceiver] = OrderedDict()
        self.transfer_queue: dict[Request, KVReceiver] = {}
        self.quarantine: list[tuple[float, list[int]]] = []
        # How late past its deadline (seconds) a quarantined entry was released, at most,
        # since start (/metrics; the chaos harness checks that quarantine stays bounded).
        self.quarantine_max_overdue = 0.0
        self.prealloc_timeout = settings.disaggregation_prealloc_timeout

    def add(self, req: Request, bootstrap: BootstrapInfo | None) -> None:
        if bootstrap is None or bootstrap.room is None or not bootstrap.host:
            raise RequestError(
                "this server runs with --disaggregation-mode decode: requests need "
                "bootstrap_host and bootstrap_room (send them through a PD router)"
            )
        receiver = self.manager.create_receiver(bootstrap.room, bootstrap.host, bootstrap.port)
        self.prealloc_queue[req] = receiver

    def advance(self) -> None:
        self.manager.tick()
        self._release_quarantine()
        self._expire_prealloc()
        self._advance_prealloc()
        for req, receiver in list(self.transfer_queue.items()):
            state = receiver.poll()
            if state == KVPoll.Success:
                del self.transfer_queue[req]
                assert receiver.first_token is not None  # Success means it arrived
                self.host.start_decoding(req, receiver.first_token, receiver.first_logprob)
            elif state == KVPoll.Failed:
                del self.transfer_queue[req]
                self._hold_pages(req)
                self._fail(req, receiver)

    def _hold_pages(self, req: Request) -> None:
        self.quarantine.append((time.monotonic() + ABORT_QUARANTINE_S, req.pages))
        req.pages = []

    def _release_quarantine(self) -> None:
        now = time.monotonic()
        while self.quarantine and self.quarantine[0][0] <= now:
            deadline, pages = self.quarantine.pop(0)
            self.quarantine_max_overdue = max(self.quarantine_max_overdue, now - deadline)
            self.host.release_pages(pages)

    def _advance_prealloc(self) -> None:
        for req, receiver in list(self.prealloc_queue.items()):
            state = receiver.poll()
            if state == KVPoll.Failed:
                del self.prealloc_queue[req]
                self._fail(req, receiver)
                continue
            if state != KVPoll.WaitingForInput:
                continue
            need = pages_for(len(req.prompt_ids), self.host.page_size)
            pages = self.host.reserve_pages(need, in_flight=len(self.transfer_queue))
            if pages is None:
                break  # first come, first served: later requests wait behind this one
            req.pages = pages
            del self.prealloc_queue[req]
            self.transfer_queue[req] = receiver
            receiver.prealloc(list(req.pages))

    def _expire_prealloc(self) -> None:
        """Admission control: a request waits for free pages at most
        --disaggregation-prealloc-timeout, then gets 503 (and prefill is told to drop the
        room) -- it never waits for ever behind a full pool (SGLang #30033). The queue is in
        arrival order, so the sweep stops at the first request still within its time."""
        now = time.monotonic()
        for req, receiver in list(self.prealloc_queue.items()):
            if now - req.arrival_time <= self.prealloc_timeout:
                break
            del self.prealloc_queue[req]
            reason = (
                f"no free KV cache pages on this decode instance within "
                f"{self.prealloc_timeout:g} s (--disaggregation-prealloc-timeout); retry later"
            )
            receiver.abort(reason)
            self.host.finish_request(req, overloaded(f"decode: {reason}"))

    def _fail(self, req: Request, receiver: KVReceiver) -> None:
        reason = receiver.failure_reason or "KV transfer from the prefill instance failed"
        self.host.finish_request(req, pd_failure(f"decode: {reason}"))

    def abort(self, req: Request, message: str) -> bool:
        receiver = self.prealloc_queue.pop(req, None)
        if receiver is None:
            receiver = self.transfer_queue.pop(req, None)
            if receiver is None:
                return False
            self._hold_pages(req)  # prefill may be writing into them right now
        receiver.abort(message)
        self.host.drop(req)
        return True

    def num_queued(self) -> int:
        # Quarantined pages count as work: /flush_cache waits for them, /get_load shows them.
        return len(self.prealloc_queue) + len(self.transfer_queue) + len(self.quarantine)

    def queue_sizes(self) -> dict[str, float]:
        overdue = self.quarantine_max_overdue
        if self.quarantine:  # entries are in deadline order: the first is the most overdue
            overdue = max(overdue, time.monotonic() - self.quarantine[0][0])
        return {
            "num_prealloc_queue_reqs": len(self.prealloc_queue),
            "num_transfer_queue_reqs": len(self.transfer_queue),
            "num_quarantined_pages": sum(len(pages) for _, pages in self.quarantine),
            "quarantine_max_overdue_seconds": round(overdue, 3),
        }

    def metrics(self, drain_samples: bool = False) -> dict[str, Any]:
        return self.manager.metrics(drain_samples)

    def transfers_by_rank(self) -> dict[int, int]:
        return self.manager.transfers_by_rank()

    def close(self) -> None:
        self.manager.close()
