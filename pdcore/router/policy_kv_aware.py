"""kv_aware: route by the prefix pages the workers really hold, not by a guess from text.

Every `--kv-poll-interval-secs` the policy reads each worker's `GET /kv_cache_blocks`: the
chain hash of every page in its prefix cache (`pdcore serve` answers it). For a request it
computes the prompt's token ids (`policy_tokens.PromptTokenizer`) and their page hashes the
way the server does, and scores each worker

    score = cached prompt tokens - --kv-load-penalty-tokens x load

where cached tokens are the prompt's leading pages found on that worker and load is
`policy_load.worker_load`. The best score wins; a tie goes to the lower load, then to the
worker caching fewer pages (room for a new prefix). When the load is imbalanced (SGLang's
two thresholds) the least loaded worker wins outright, as in cache_aware.

Between two polls a worker's snapshot is stale: a prefix just sent to it is not there yet.
So the pages of each routed prompt are also remembered for that worker, as pending, until
a snapshot shows them or the pending TTL passes (30 s, or 10 poll intervals if longer):
the next request with the same prefix follows the first one instead of racing it.

What it knows that cache_aware cannot: pages a worker evicted (no longer counted), pages it
got another way (another router, direct clients, a router restart), and the real page
boundaries. When it cannot compute token ids -- no tokenizer found yet, or a chat template
that fails -- it routes that request like cache_aware (a prefix tree of the text).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdcore.router.policies import RouteRequest, Worker
from pdcore.router.policy_cache_aware import CacheAwarePolicy
from pdcore.router.policy_load import is_imbalanced, least_loaded, worker_key, worker_load
from pdcore.router.policy_settings import policy_option
from pdcore.router.policy_tokens import PromptTokenizer, block_hashes

logger = logging.getLogger("pdcore.router")

DEFAULT_PAGE_SIZE = 16  # pdcore serve's --page-size default, until a worker reports its own
POLL_TIMEOUT_S = 5.0
MIN_PENDING_TTL_S = 30.0  # a prefill can queue for seconds before its pages exist


@dataclass
class WorkerBlocks:
    """One worker's last /kv_cache_blocks answer."""

    page_size: int
    hashes: set[int] = field(default_factory=set)


class KvAwarePolicy:
    """Score workers by the prompt tokens their prefix cache really holds, minus load."""

    def __init__(
        self, role: str = "", settings: Any = None, tokenizer: PromptTokenizer | None = None
    ) -> None:
        self.role = role
        self.poll_interval = float(policy_option(settings, "kv_poll_interval_secs"))
        self.penalty = float(policy_option(settings, "kv_load_penalty_tokens"))
        self.balance_abs = int(policy_option(settings, "balance_abs_threshold"))
        self.balance_rel = float(policy_option(settings, "balance_rel_threshold"))
        self.pending_ttl = max(MIN_PENDING_TTL_S, 10 * self.poll_interval)
        api_key = getattr(settings, "api_key", None)  # the workers may want the router's key
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        path = policy_option(settings, "kv_tokenizer")
        if tokenizer is None and path:
            try:
                tokenizer = PromptTokenizer.load(path)
            except Exception as exc:
                raise ValueError(f"--kv-tokenizer {path}: cannot load a tokenizer: {exc}") from exc
        self.tokenizer = tokenizer
        self._looked_for_tokenizer = tokenizer is not None
        self.blocks: dict[str, WorkerBlocks] = {}
        self.pending: dict[str, dict[int, float]] = {}  # worker -> page hash -> routed at
        self.fallback = CacheAwarePolicy(role, settings)

    # ----- the hot path --------------------------------------------------------------------
    def select(self, workers: Sequence[Worker], request: RouteRequest) -> int:
        ids = self.tokenizer.token_ids(request.body) if self.tokenizer is not None else None
        if ids is None:
            return self.fallback.select(workers, request)
        keys = [worker_key(w) for w in workers]
        loads = [worker_load(w) for w in workers]
        now = time.monotonic()
        by_page_size: dict[int, list[int]] = {}
        for key in keys:
            ps = self._page_size(key)
            if ps not in by_page_size:
                by_page_size[ps] = block_hashes(ids, ps)
        if is_imbalanced(loads, self.balance_abs, self.balance_rel):
            choice = least_loaded(loads)
        else:
            scores = [
                self.cached_tokens(k, by_page_size[self._page_size(k)], now) - self.penalty * load
                for k, load in zip(keys, loads, strict=True)
            ]
            sizes = [self._num_pages(k) for k in keys]
            choice = max(range(len(keys)), key=lambda i: (scores[i], -loads[i], -sizes[i], -i))
        chosen = keys[choice]
        pending = self.pending.setdefault(chosen, {})
        for h in by_page_size[self._page_size(chosen)]:
            pending[h] = now
        return choice

    def cached_tokens(self, key: str, hashes: Sequence[int], now: float) -> int:
        """Leading prompt tokens worker `key` holds (reported, or routed there lately)."""
        known = self.blocks.get(key)
        held = known.hashes if known is not None else set()
        pending = self.pending.get(key, {})
        pages = 0
        for h in hashes:
            if h in held or now - pending.get(h, -1e18) < self.pending_ttl:
                pages += 1
            else:
                break
        return pages * self._page_size(key)

    def _page_size(self, key: str) -> int:
        known = self.blocks.get(key)
        return known.page_size if known is not None else DEFAULT_PAGE_SIZE

    def _num_pages(self, key: str) -> int:
        known = self.blocks.get(key)
        return (len(known.hashes) if known is not None else 0) + len(self.pending.get(key, ()))

    def forget(self, worker: Worker) -> None:
        key = worker_key(worker)
        self.blocks.pop(key, None)
        self.pending.pop(key, None)
        self.fallback.forget(worker)

    # ----- the background task -------------------------------------------------------------
    async def run(self, client: httpx.AsyncClient, workers: Callable[[], Sequence[Worker]]) -> None:
        """Poll every worker's cached pages, forever; find the tokenizer on the way."""
        fallback = asyncio.create_task(self.fallback.run(client, workers))
        try:
            while True:
                current = list(workers())
                if not self._looked_for_tokenizer and current:
                    await self._find_tokenizer(client, current)
                await asyncio.gather(*(self.poll(client, w) for w in current))
                self._expire(time.monotonic())
                await asyncio.sleep(self.poll_interval)
        finally:
            fallback.cancel()

    async def poll(self, client: httpx.AsyncClient, worker: Worker) -> None:
        """Refresh one worker's snapshot: one that cannot be reached holds nothing; one too
        busy to answer in time keeps its last."""
        key = worker_key(worker)
        try:
            r = await client.get(
                worker.url + "/kv_cache_blocks", headers=self.headers, timeout=POLL_TIMEOUT_S
            )
            r.raise_for_status()
            data = r.json()
            snapshot = WorkerBlocks(
                int(data["page_size"]), {int(h, 16) for h in data.get("blocks", ())}
            )
        except httpx.TimeoutException:
            return  # busy (a long prefill): its cache is still there, keep the last snapshot
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            if key in self.blocks:
                logger.info("kv_aware: %s: no cached pages known (%r)", worker.url, exc)
            self.blocks.pop(key, None)  # gone or restarted: it holds nothing we know of
            return
        self.blocks[key] = snapshot
        pending = self.pending.get(key)
        if pending:  # what the snapshot shows is no longer a guess
            for h in snapshot.hashes.intersection(pending):
                del pending[h]

    def _expire(self, now: float) -> None:
        for pending in self.pending.values():
            stale = [h for h, t in pending.items() if now - t >= self.pending_ttl]
            for h in stale:
                del pending[h]
        self.pending = {k: p for k, p in self.pending.items() if p}

    async def _find_tokenizer(self, client: httpx.AsyncClient, workers: Sequence[Worker]) -> None:
        """The tokenizer of the model a worker serves, when its folder is readable here."""
        self._looked_for_tokenizer = True
        for worker in workers:
            for path, field_name in (
                ("/server_info", "model_folder"),
                ("/get_model_info", "tokenizer_path"),
            ):
                try:
                    r = await client.get(
                        worker.url + path, headers=self.headers, timeout=POLL_TIMEOUT_S
                    )
                    folder = r.json().get(field_name) if r.status_code == 200 else None
                except (httpx.HTTPError, ValueError, AttributeError):
                    folder = None
                if isinstance(folder, str) and (Path(folder) / "tokenizer.json").is_file():
                    try:
                        self.tokenizer = await asyncio.to_thread(PromptTokenizer.load, folder)
                    except Exception as exc:
                        logger.warning("kv_aware: cannot load the tokenizer in %s: %s", folder, exc)
                        continue
                    logger.info("kv_aware (%s): tokenizer from %s", self.role, folder)
                    return
        logger.warning(
            "kv_aware (%s): no tokenizer readable from the workers' model folders; routing "
            "like cache_aware (give --kv-tokenizer PATH)",
            self.role,
        )
