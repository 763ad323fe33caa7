"""Which data-parallel replica serves a request (`--load-balance-method`).

The frontend owns every request's stream, so it knows each replica's open requests and
their token counts without asking the engines: the balancers here decide from those
counts, instantly and without I/O, on the event loop.

`prefix_aware` goes beyond SGLang's controller: it remembers, per replica, hashes of the
16-token blocks of prompts it sent there (chained, so a block's hash names its whole
prefix) in a bounded LRU, and sends a prompt to the replica that got its longest prefix --
the replica whose radix cache most likely still holds it -- unless that replica is busier
than the least busy one by more than `--dp-balance-abs-threshold` open requests. Without a
usable match it picks the least busy replica, and among those the one holding the fewest
prefixes, so new prefixes spread over the replicas.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

BLOCK_TOKENS = 16
MAX_BLOCKS_PER_REPLICA = 200_000  # ~16 MB of hashes per replica, ~3.2M prompt tokens


@dataclass(frozen=True)
class ReplicaLoad:
    """What a balancer knows of one replica when it decides."""

    alive: bool
    open_requests: int
    open_tokens: int


class LoadBalancer(Protocol):
    def pick(self, loads: Sequence[ReplicaLoad], input_ids: Sequence[int]) -> int:
        """The index of the replica for a request with this prompt (only alive ones)."""
        ...


def _alive(loads: Sequence[ReplicaLoad]) -> list[int]:
    alive = [i for i, load in enumerate(loads) if load.alive]
    if not alive:
        raise RuntimeError("no data-parallel replica is alive")
    return alive


class RoundRobin:
    """Each request to the next alive replica in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, loads: Sequence[ReplicaLoad], input_ids: Sequence[int]) -> int:
        alive = _alive(loads)
        return alive[next(self._counter) % len(alive)]


class ShortestQueue:
    """The alive replica with the fewest open requests (the lowest index on ties)."""

    def pick(self, loads: Sequence[ReplicaLoad], input_ids: Sequence[int]) -> int:
        return min(_alive(loads), key=lambda i: (loads[i].open_requests, i))


class MinimumTokens:
    """The alive replica with the fewest tokens (prompt + max_new_tokens) open."""

    def pick(self, loads: Sequence[ReplicaLoad], input_ids: Sequence[int]) -> int:
        return min(_alive(loads), key=lambda i: (loads[i].open_tokens, i))


def block_hashes(input_ids: Sequence[int], block: int = BLOCK_TOKENS) -> list[bytes]:
    """Chained hashes of the prompt's whole blocks: hash k covers tokens [0, (k+1)*block)."""
    out: list[bytes] = []
    prev = b""
    for start in range(0, len(input_ids) - block + 1, block):
        chunk = ",".join(map(str, input_ids[start : start + block])).encode()
        prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
        out.append(prev)
    return out


class PrefixAware:
    """The replica that most recently got the longest prefix of this prompt."""

    def __init__(
        self,
        num_replicas: int,
        balance_abs_threshold: int = 8,
        max_blocks: int = MAX_BLOCKS_PER_REPLICA,
    ) -> None:
        self._seen: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(num_replicas)]
        self._threshold = balance_abs_threshold
        self._max_blocks = max_blocks

    def matched_blocks(self, replica: int, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the prompt this replica got before."""
        seen = self._seen[replica]
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def pick(self, loads: Sequence[ReplicaLoad], input_ids: Sequence[int]) -> int:
        alive = _alive(loads)
        hashes = block_hashes(input_ids)
        least = min(loads[i].open_requests for i in alive)
        best, best_blocks = -1, 0
        for i in alive:
            if loads[i].open_requests - least > self._threshold:
                continue
            blocks = self.matched_blocks(i, hashes)
            if blocks > best_blocks:
                best, best_blocks = i, blocks
        if best < 0:
            # A prefix no replica has seen: the least busy replica, and among those the one
            # that holds the fewest prefixes, so new prefixes spread over the replicas
            # instead of piling onto one (SGLang's cache_aware "smallest tree" rule).
            best = min(alive, key=lambda i: (loads[i].open_requests, len(self._seen[i]), i))
        self._remember(best, hashes)
        return best

    def _remember(self, replica: int, hashes: Sequence[bytes]) -> None:
        seen = self._seen[replica]
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self._max_blocks:
            seen.popitem(last=False)

    def forget(self, replica: int) -> None:
        """A replica died: its cache is gone with it."""
        self._seen[replica].clear()


def make_balancer(method: str, num_replicas: int, balance_abs_threshold: int = 8) -> LoadBalancer:
    """The balancer `--load-balance-method` names."""
    if method == "round_robin":
        return RoundRobin()
    if method == "shortest_queue":
        return ShortestQueue()
    if method == "minimum_tokens":
        return MinimumTokens()
    if method == "prefix_aware":
        return PrefixAware(num_replicas, balance_abs_threshold)
    raise ValueError(f"unknown load balance method {method!r}")
