"""cache_aware: SGLang router's default policy -- send a prompt where its prefix went before.

For each request, with the available workers of one role:

1. If the load is imbalanced (`policy_load.is_imbalanced` over the router's in-flight
   counts, `--balance-abs-threshold` and `--balance-rel-threshold`), the least loaded
   worker: a hot prefix must not pile every request onto one worker.
2. Else the prompt text is matched against the prefix tree (`prefix_tree.PrefixTree`) of
   the text each worker was sent. If the longest match covers at least `--cache-threshold`
   of the prompt, the worker holding it; otherwise the worker with the smallest tree (the
   most room, the least to lose), which spreads new prefixes out.

Either way the prompt is then added to the chosen worker's tree. Every
`--eviction-interval-secs` each worker's tree is trimmed to `--max-tree-size` characters,
least recently used first -- in the background task when the router runs it, else at the
next request. The tree is the router's guess at the workers' caches; it cannot know what a
worker evicted or what reached it another way (`kv_aware` asks the workers instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from pdcore.router.policies import RouteRequest, Worker
from pdcore.router.policy_load import is_imbalanced, least_loaded, worker_key, worker_load
from pdcore.router.policy_settings import policy_option
from pdcore.router.prefix_tree import PrefixTree

logger = logging.getLogger("pdcore.router")


class CacheAwarePolicy:
    """Prefix-tree affinity with SGLang's thresholds, balanced by load."""

    def __init__(self, role: str = "", settings: Any = None) -> None:
        self.role = role
        self.cache_threshold = float(policy_option(settings, "cache_threshold"))
        self.balance_abs = int(policy_option(settings, "balance_abs_threshold"))
        self.balance_rel = float(policy_option(settings, "balance_rel_threshold"))
        self.eviction_interval = float(policy_option(settings, "eviction_interval_secs"))
        self.max_tree_size = int(policy_option(settings, "max_tree_size"))
        self.tree = PrefixTree()
        self._last_eviction = time.monotonic()
        self._evicting_in_background = False

    def select(self, workers: Sequence[Worker], request: RouteRequest) -> int:
        if not self._evicting_in_background:
            self._maybe_evict()
        keys = [worker_key(w) for w in workers]
        loads = [worker_load(w) for w in workers]
        sizes = [self.tree.size(k) for k in keys]
        text = request.text
        if not text or is_imbalanced(loads, self.balance_abs, self.balance_rel):
            choice = least_loaded(loads, sizes)
        else:
            matched, tenant = self.tree.match(text, allowed=set(keys))
            if tenant is not None and matched / len(text) >= self.cache_threshold:
                choice = keys.index(tenant)
            else:
                choice = min(range(len(keys)), key=lambda i: (sizes[i], loads[i], i))
        self.tree.insert(text, keys[choice])
        return choice

    def forget(self, worker: Worker) -> None:
        self.tree.remove_tenant(worker_key(worker))

    def _maybe_evict(self) -> None:
        now = time.monotonic()
        if now - self._last_eviction >= self.eviction_interval:
            self._last_eviction = now
            dropped = self.tree.evict(self.max_tree_size)
            if dropped:
                logger.debug("%s cache_aware: evicted %d characters", self.role, dropped)

    async def run(self, client: httpx.AsyncClient, workers: Callable[[], Sequence[Worker]]) -> None:
        """Evict on schedule, so no request pays for it."""
        self._evicting_in_background = True
        try:
            while True:
                await asyncio.sleep(self.eviction_interval)
                self._last_eviction = 0.0
                self._maybe_evict()
        finally:
            self._evicting_in_background = False
