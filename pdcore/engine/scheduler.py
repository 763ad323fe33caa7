"""Continuous batching: which requests run in the next forward pass, and with how many tokens.

A step is either one extend batch (new prompts and prompt chunks, at most
chunked_prefill_size tokens) or one decode batch (every request that is ready to decode).
When both kinds of work exist the two alternate, so a long prompt delays each decode step
by at most one chunk; that interference is exactly what PD disaggregation removes.
When pages run out, the newest decoding requests are preempted and later recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdcore.engine.page_allocator import PageAllocator
from pdcore.engine.request import Request, Status
from pdcore.engine.schedule_policies import SchedulePolicy


@dataclass
class ScheduledBatch:
    reqs: list[Request]
    is_decode: bool
    extend_lens: list[int]


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens (the last one may be partly filled)."""
    return (tokens + page_size - 1) // page_size


def is_decode_ready(req: Request) -> bool:
    """All tokens but the newest sampled one have KV: the next step feeds that token."""
    return bool(req.output_ids) and req.num_computed == req.seq_len - 1


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        policy: SchedulePolicy,
        max_running_requests: int,
        chunked_prefill_size: int,
    ) -> None:
        self.allocator = allocator
        self.policy = policy
        self.max_running = max_running_requests
        self.chunk_size = chunked_prefill_size
        self.page_size = allocator.page_size
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._last_was_extend = False
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        decode_ready = [r for r in self.running if is_decode_ready(r)]
        wants_extend = bool(self.waiting) or len(decode_ready) < len(self.running)
        if wants_extend and not (self._last_was_extend and decode_ready):
            batch = self._schedule_extend(reserve=len(decode_ready))
            if batch is not None:
                self._last_was_extend = True
                return batch
        self._last_was_extend = False
        if decode_ready:
            return self._schedule_decode(decode_ready)
        while wants_extend:
            batch = self._schedule_extend(reserve=0)
            if batch is not None or len(self.running) < 2:
                return batch
            # Partial prefills hold every page and none can go on: free the newest.
            self.preempt(max(self.running, key=lambda r: r.arrival_time))
        return None

    def _schedule_extend(self, reserve: int) -> ScheduledBatch | None:
        budget = self.chunk_size
        reqs: list[Request] = []
        lens: list[int] = []
        partial = [r for r in self.running if not is_decode_ready(r)]
        candidates = partial + self.policy.order(self.waiting, self._cached_prefix_len)
        for req in candidates:
            if budget <= 0:
                break
            admitting = req.status is Status.WAITING
            if admitting:
                if len(self.running) >= self.max_running:
                    break
                self._match_prefix(req)
            n = self._fit_chunk(req, min(req.seq_len - req.num_computed, budget), reserve)
            if n <= 0:
                if admitting:
                    self._drop_pages(req)
                break
            self.allocator_grow(req, req.num_computed + n)
            if admitting:
                self.waiting.remove(req)
                self.running.append(req)
                req.status = Status.RUNNING
            reqs.append(req)
            lens.append(n)
            budget -= n
        return ScheduledBatch(reqs, False, lens) if reqs else None

    def _schedule_decode(self, ready: list[Request]) -> ScheduledBatch:
        ready = sorted(ready, key=lambda r: r.arrival_time)
        while True:
            need = sum(pages_for(r.num_computed + 1, self.page_size) - len(r.pages) for r in ready)
            victims = [r for r in self.running if r is not ready[0]]
            if need <= self.allocator.num_available() or not victims:
                break
            victim = max(victims, key=lambda r: r.arrival_time)
            if victim in ready:
                ready.remove(victim)
            self.preempt(victim)
        for req in ready:
            self.allocator_grow(req, req.num_computed + 1)
        return ScheduledBatch(ready, True, [1] * len(ready))

    def _cached_prefix_len(self, req: Request) -> int:
        return self.allocator.cached_prefix_len(req.all_ids)

    def _fit_chunk(self, req: Request, n: int, reserve: int) -> int:
        """Shrink a chunk to the pages available (keeping `reserve` for decoding requests)."""
        available = self.allocator.num_available() - reserve
        max_tokens = (len(req.pages) + max(available, 0)) * self.page_size - req.num_computed
        return min(n, max_tokens)

    def allocator_grow(self, req: Request, tokens: int) -> None:
        extra = pages_for(tokens, self.page_size) - len(req.pages)
        if extra > 0:
            req.pages.extend(self.allocator.allocate(extra))

    def _match_prefix(self, req: Request) -> None:
        # Leave the last token uncomputed: its logits are what the first sample needs.
        max_pages = (req.seq_len - 1) // self.page_size
        pages, hashes = self.allocator.match_prefix(req.all_ids, max_pages)
        req.pages, req.page_hashes = pages, hashes
        req.num_computed = len(pages) * self.page_size
        if not req.output_ids:
            req.cached_tokens = req.num_computed

    def _drop_pages(self, req: Request) -> None:
        self.allocator.release(req.pages)
        req.pages, req.page_hashes, req.num_computed = [], [], 0

    def adopt_running(self, req: Request) -> None:
        """Take in a request whose KV is already in its pages (decode mode's prebuilt batch)."""
        req.status = Status.RUNNING
        self.running.append(req)

    def detach(self, req: Request) -> None:
        """Stop scheduling a request but keep its pages (prefill mode: KV being sent)."""
        self.running.remove(req)

    def preempt(self, req: Request) -> None:
        """Free a running request's pages; it is recomputed (prompt + output so far) later."""
        self.num_preemptions += 1
        self._drop_pages(req)
        self.running.remove(req)
        req.status = Status.WAITING
        self.waiting.insert(0, req)

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out and free its pages."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._drop_pages(req)
        req.status = Status.FINISHED
