"""Data parallelism (`--dp-size N`): N engine replicas behind one HTTP server.

Each replica is a whole engine -- its own process (plus its TP followers with
`--tp-size`), its own KV pool and prefix cache, its own zmq link (an `EngineClient`). The
frontend is the controller: `submit` hands each request (a /generate batch stays together)
to the replica the load balancer picks, and the request's stream stays on that replica's
link, so aborts and outputs need no lookup. This is SGLang's data-parallel controller
without its extra process: the frontend already sees every request open and close.

A replica that dies fails its own requests at once (its link marks them dead, HTTP 503) and
leaves rotation; the other replicas keep serving, and `/health` turns 503 (a replica is
gone: a supervisor should know) while requests still succeed on the rest.

On a PD prefill (`route_by_room`), a request with a `bootstrap_room` goes to replica
`room % N` instead, whatever the load: decode finds its KV there by the same rule (it asks
the bootstrap server for dp rank `room % N`). A batch whose rooms fall on several replicas
is split, and its outputs merged into one stream. Control ops are answered per replica: `get_load` is SGLang's list of `{dp_rank, num_reqs, ...}`,
`flush_cache` succeeds only when every replica flushed, `metrics` sums the replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

from pdcore.engine.request import RequestOutput
from pdcore.server.engine_client import EngineClient, EngineDeadError, Stream
from pdcore.server.engine_messages import Generate, Ready
from pdcore.server.load_balance import LoadBalancer, PrefixAware, ReplicaLoad, make_balancer

logger = logging.getLogger("pdcore.server")

DEFAULT_NEW_TOKENS = 128  # counted for a request that does not say max_new_tokens


def replica_ipc_dir(ipc_dir: str, dp_rank: int) -> str:
    """Replica `dp_rank`'s own socket folder inside the server's ipc folder."""
    path = os.path.join(ipc_dir, f"dp{dp_rank}")
    os.makedirs(path, exist_ok=True)
    return path


def _request_tokens(job: Generate) -> int:
    new = (job.sampling_params or {}).get("max_new_tokens")
    return len(job.input_ids) + (new if isinstance(new, int) and new > 0 else DEFAULT_NEW_TOKENS)


def _sum_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One engine's stats from several: numbers add up (page_size is shared), transfer
    counters add up per backend, latency samples are pooled."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "transfer" and isinstance(value, dict):
                merged = out.setdefault("transfer", {})
                for backend, t in value.items():
                    into = merged.setdefault(backend, {})
                    for k, v in t.items():
                        if isinstance(v, list):
                            into[k] = [*into.get(k, []), *v]
                        elif isinstance(v, (int, float)) and not isinstance(v, bool):
                            into[k] = into.get(k, 0) + v
                        else:
                            into.setdefault(k, v)
            elif (
                key == "page_size" or not isinstance(value, (int, float)) or isinstance(value, bool)
            ):
                out.setdefault(key, value)
            else:
                out[key] = out.get(key, 0) + value
    return out


class _SplitStream(Stream):
    """One batch served by several replicas: their streams feed this one's queue."""

    def __init__(self, client: DataParallelClient, parts: list[Stream], rids: list[str]) -> None:
        super().__init__(parts[0]._client, rids)
        self._dp, self._parts = client, parts
        for part in parts:  # before any output can arrive (the event loop has not run)
            part.queue = self.queue

    async def next(self) -> tuple[int, RequestOutput]:
        try:
            return await super().next()
        except EngineDeadError:
            raise EngineDeadError(self._dp.dead_reason or "a dp replica is gone") from None

    def close(self) -> None:
        for part in self._parts:
            part.unfinished &= self.unfinished
            part.close()


class DataParallelClient:
    """The frontend's view of all replicas; the same surface as one `EngineClient`.
    `route_by_room`: a PD prefill's (see the module docstring)."""

    def __init__(
        self,
        replicas: Sequence[EngineClient],
        balancer: LoadBalancer,
        route_by_room: bool = False,
    ) -> None:
        if not replicas:
            raise ValueError("at least one replica is needed")
        self.replicas = list(replicas)
        self._balancer = balancer
        self._by_room = route_by_room
        self._tokens: dict[str, int] = {}
        self._forgotten: set[int] = set()

    # -- the EngineClient surface the routes use -------------------------------------------

    @property
    def alive(self) -> bool:
        """Some replica can still serve."""
        return any(r.alive for r in self.replicas)

    @property
    def dead_reason(self) -> str | None:
        reasons = [r.dead_reason or r.label for r in self.replicas if not r.alive]
        return "; ".join(reasons) or None

    def loads(self) -> list[ReplicaLoad]:
        """Each replica's open requests and tokens, as the balancer sees them."""
        out = []
        for i, replica in enumerate(self.replicas):
            rids = replica.live_rids()
            if not replica.alive and i not in self._forgotten:
                self._forgotten.add(i)
                if isinstance(self._balancer, PrefixAware):
                    self._balancer.forget(i)
            tokens = sum(self._tokens.get(rid, 0) for rid in rids)
            out.append(ReplicaLoad(replica.alive, len(rids), tokens))
        return out

    def submit(self, jobs: list[Generate]) -> Stream:
        """Send a batch to one replica (503 when none is alive)."""
        if len(self.replicas) == 1:  # no --dp-size: nothing to balance or count
            return self.replicas[0].submit(jobs)
        loads = self.loads()
        if not any(load.alive for load in loads):
            raise EngineDeadError(self.dead_reason or "no data-parallel replica is alive")
        groups = self._by_room_groups(jobs) if self._by_room else None
        if groups is None:
            dp_rank = self._balancer.pick(loads, jobs[0].input_ids if jobs else [])
            stream = self.replicas[dp_rank].submit(jobs)
        else:
            stream = self._submit_split(groups, jobs)
        if len(self._tokens) > 4 * (sum(load.open_requests for load in loads) + 64):
            live = {rid for r in self.replicas for rid in r.live_rids()}
            self._tokens = {rid: n for rid, n in self._tokens.items() if rid in live}
        for job in jobs:
            self._tokens[job.rid] = _request_tokens(job)
        return stream

    def _by_room_groups(self, jobs: list[Generate]) -> dict[int, list[Generate]] | None:
        """The jobs per replica `room % N`; None when no job has a room (the engine then
        refuses them: a prefill serves only PD requests)."""
        rooms = [(job.bootstrap or {}).get("room") for job in jobs]
        if all(room is None for room in rooms):
            return None
        groups: dict[int, list[Generate]] = {}
        for job, room in zip(jobs, rooms, strict=True):
            dp_rank = room % len(self.replicas) if isinstance(room, int) else 0
            if not self.replicas[dp_rank].alive:
                raise EngineDeadError(
                    f"prefill dp rank {dp_rank}, which serves bootstrap room {room}, is gone "
                    f"({self.replicas[dp_rank].dead_reason})"
                )
            groups.setdefault(dp_rank, []).append(job)
        return groups

    def _submit_split(self, groups: dict[int, list[Generate]], jobs: list[Generate]) -> Stream:
        if len(groups) == 1:
            [(dp_rank, group)] = groups.items()
            return self.replicas[dp_rank].submit(group)
        parts: list[Stream] = []
        try:
            for dp_rank, group in groups.items():
                parts.append(self.replicas[dp_rank].submit(group))
        except BaseException:
            for part in parts:
                part.close()
            raise
        return _SplitStream(self, parts, [job.rid for job in jobs])

    def abort(self, rid: str) -> None:
        """Abort `rid` on the replica that holds it (on every alive one when none does)."""
        holders = [r for r in self.replicas if rid in r.live_rids()]
        targets = holders or [r for r in self.replicas if r.alive]
        if not targets:
            raise EngineDeadError(self.dead_reason or "no data-parallel replica is alive")
        for replica in targets:
            with contextlib.suppress(EngineDeadError):
                replica.abort(rid)

    def live_rids(self) -> list[str]:
        return [rid for r in self.replicas for rid in r.live_rids()]

    async def control(self, op: str, timeout: float = 10.0) -> Any:
        """A control op on every replica, combined (see the module docstring)."""
        if len(self.replicas) == 1 and op != "get_load" and op != "stats":
            return await self.replicas[0].control(op, timeout)
        if op == "ping":
            dead = self.dead_reason
            if dead:
                raise EngineDeadError(dead)
            await asyncio.gather(*(r.control(op, timeout) for r in self.replicas))
            return "pong"
        alive = [(i, r) for i, r in enumerate(self.replicas) if r.alive]
        if not alive:
            raise EngineDeadError(self.dead_reason or "no data-parallel replica is alive")
        if op == "server_info":
            return await alive[0][1].control(op, timeout)
        results = await asyncio.gather(*(r.control(op, timeout) for _, r in alive))
        if op == "get_load":
            return [{"dp_rank": i, **load} for (i, _), load in zip(alive, results, strict=True)]
        if op == "stats":
            return [{"dp_rank": i, **s} for (i, _), s in zip(alive, results, strict=True)]
        if op == "flush_cache":
            return all(bool(r) for r in results) and len(alive) == len(self.replicas)
        if op == "metrics":
            return _sum_stats([r for r in results if isinstance(r, dict)])
        return results[0]

    async def wait_dead(self) -> None:
        """Return once every replica is gone."""
        await asyncio.gather(*(r.wait_dead() for r in self.replicas))

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


async def wait_replicas_ready(
    clients: Sequence[EngineClient],
    engines: Sequence[BaseProcess],
    followers: Sequence[Sequence[BaseProcess]],
) -> Ready:
    """Wait until every replica's engine said ready; the first failure raises."""
    readies = await asyncio.gather(
        *(c.wait_ready(p, f) for c, p, f in zip(clients, engines, followers, strict=True))
    )
    return readies[0]


def make_dp_client(
    clients: Sequence[EngineClient],
    method: str,
    balance_abs_threshold: int,
    route_by_room: bool = False,
) -> DataParallelClient:
    balancer = make_balancer(method, len(clients), balance_abs_threshold)
    return DataParallelClient(clients, balancer, route_by_room)
