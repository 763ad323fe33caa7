"""Who owns which KV page, and the prefix cache: a hash chain over full pages (nano-vllm style).

A page is free, held (refcount > 0), or cached-idle (refcount 0 but still indexed by its
hash; reused on a prefix hit, evicted LRU-first when free pages run out). Page 0 is never
handed out: it is the padding page attention gathers point at.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class OutOfPagesError(RuntimeError):
    """Asked for more pages than are free or evictable; the scheduler checks first."""


def page_hash(parent: int, tokens: Sequence[int]) -> int:
    """Chain hash of a full page: equal only when this page and every page before it match."""
    digest = hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=8)
    digest.update(parent.to_bytes(8, "little", signed=False))
    return int.from_bytes(digest.digest(), "little")


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> None:
        if num_pages < 2:
            raise ValueError("the KV pool needs at least 2 pages")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        # A min-heap: lowest page ids first keeps a request's pages in long contiguous runs,
        # which a PD transfer coalesces into few large writes instead of one per page.
        self._free: list[int] = list(range(1, num_pages))
        self._ref = [0] * num_pages
        self._hash_of_page: dict[int, int] = {}
        self._page_of_hash: dict[int, int] = {}
        self._idle_cached: OrderedDict[int, None] = OrderedDict()  # LRU order

    @property
    def capacity(self) -> int:
        """Pages a request could ever use (all but the padding page)."""
        return self.num_pages - 1

    def num_available(self) -> int:
        return len(self._free) + len(self._idle_cached)

    def num_used(self) -> int:
        """Pages not free: held by requests or kept by the prefix cache."""
        return self.capacity - len(self._free)

    def num_cached(self) -> int:
        return len(self._page_of_hash)

    def cached_hashes(self) -> list[int]:
        """The chain hash of every cached page (held or idle): what a KV-aware router
        compares a prompt's own page hashes with."""
        return list(self._page_of_hash)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_available():
            raise OutOfPagesError(f"need {count} pages, {self.num_available()} available")
        pages = []
        for _ in range(count):
            if self._free:
                page = heapq.heappop(self._free)
            else:
                page, _ = self._idle_cached.popitem(last=False)
                del self._page_of_hash[self._hash_of_page.pop(page)]
            self._ref[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            self._ref[page] -= 1
            assert self._ref[page] >= 0, f"page {page} released twice"
            if self._ref[page] == 0:
                if page in self._hash_of_page:
                    self._idle_cached[page] = None
                else:
                    heapq.heappush(self._free, page)

    def match_prefix(self, tokens: Sequence[int], max_pages: int) -> tuple[list[int], list[int]]:
        """Take references on the cached pages that start `tokens`; return (pages, hashes)."""
        pages: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_cache:
            return pages, hashes
        parent = 0
        ps = self.page_size
        for i in range(min(max_pages, len(tokens) // ps)):
            h = page_hash(parent, tokens[i * ps : (i + 1) * ps])
            page = self._page_of_hash.get(h)
            if page is None:
                break
            if self._ref[page] == 0:
                del self._idle_cached[page]
            self._ref[page] += 1
            pages.append(page)
            hashes.append(h)
            parent = h
        return pages, hashes

    def cached_prefix_len(self, tokens: Sequence[int]) -> int:
        """How many leading tokens are cached, without taking references (for scheduling)."""
        if not self.enable_prefix_cache:
            return 0
        parent, n, ps = 0, 0, self.page_size
        for i in range(len(tokens) // ps):
            h = page_hash(parent, tokens[i * ps : (i + 1) * ps])
            if h not in self._page_of_hash:
                break
            parent, n = h, n + ps
        return n

    def publish(self, page: int, parent_hash: int, tokens: Sequence[int]) -> int:
        """Index a full, computed page under its chain hash; return the hash."""
        h = page_hash(parent_hash, tokens)
        if (
            self.enable_prefix_cache
            and h not in self._page_of_hash
            and page not in self._hash_of_page
        ):
            self._page_of_hash[h] = page
            self._hash_of_page[page] = h
        return h

    def flush(self) -> None:
        """Forget every cached prefix; idle cached pages become free."""
        for page in self._idle_cached:
            heapq.heappush(self._free, page)
        self._idle_cached.clear()
        self._page_of_hash.clear()
        self._hash_of_page.clear()
