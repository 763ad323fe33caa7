"""Tensor parallelism: the process group of one model's TP ranks, and how heads divide.

Megatron-style sharding (see llama.py): q/k/v and gate/up are split by output rows (heads,
intermediate channels), o_proj and down by input columns, and the partial results of the
row-parallel projections are summed across ranks with one all-reduce each. When there are
more ranks than KV heads, a KV head is replicated: rank r holds KV head
r * num_kv_heads // tp (as SGLang does), so every rank's query heads find their KV head
locally.

The group is torch.distributed: gloo on CPU, NCCL on CUDA. On CPU the gloo backend is built
directly with a device bound to this node's address (`ProcessGroupGloo.create_device`), so a
multi-node run on 127.0.0.2 / 127.0.0.3 (or on real hosts) never silently uses another
interface; init_process_group ignores options for gloo, hence the direct construction.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from pdcore.model.dist_addr import split_host_port
from pdcore.model.head_split import (  # noqa: F401 (the head arithmetic, re-exported)
    HeadShard,
    check_tp_size,
    local_kv_heads,
    tp_size_problems,
    valid_tp_sizes,
)

logger = logging.getLogger(__name__)


# --- the process group ---------------------------------------------------------------------


@dataclass
class TPGroup:
    """This process's place in the TP group. `size == 1` (the default) means no TP: every
    collective is a no-op and nothing of torch.distributed is touched."""

    rank: int = 0
    size: int = 1
    backend: Any = None  # ProcessGroupGloo, or the default NCCL process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: Any = None  # the rendezvous TCPStore (rank 0 serves it): kept alive with the group
    # Set by the bench: seconds spent in all_reduce since it was last reset.
    allreduce_seconds: float | None = None

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        if self.size == 1:
            return tensor
        started = time.perf_counter() if self.allreduce_seconds is not None else 0.0
        self._all_reduce(tensor, "sum")
        if self.allreduce_seconds is not None:
            self.allreduce_seconds += time.perf_counter() - started
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._all_reduce(tensor, "min")
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast from this group's rank `src` (a rank of this group, not a global one)."""
        if self.size > 1:
            import torch.distributed as dist

            if self.device.type == "cpu":
                opts = dist.BroadcastOptions()
                opts.rootRank = src
                self.backend.broadcast([tensor], opts).wait()
            else:
                dist.broadcast(tensor, dist.get_global_rank(self.backend, src), self.backend)
        return tensor

    def all_to_all(
        self, tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> torch.Tensor:
        """Rows `tensor[sum(send_splits[:r]) : ...]` go to rank r; returns the rows every
        rank sent here, rank by rank (`recv_splits[r]` from rank r). gloo's alltoall_base
        on CPU (empty splits allowed), all_to_all_single on CUDA."""
        out = tensor.new_empty((sum(recv_splits), *tensor.shape[1:]))
        if self.size == 1:
            return out.copy_(tensor)
        import torch.distributed as dist

        tensor = tensor.contiguous()
        if self.device.type == "cpu":
            opts = dist.AllToAllOptions()
            self.backend.alltoall_base(out, tensor, recv_splits, send_splits, opts).wait()
        else:
            dist.all_to_all_single(out, tensor, recv_splits, send_splits, group=self.backend)
        return out

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN
        if self.device.type == "cpu":
            opts = dist.AllreduceOptions()
            opts.reduceOp = reduce_op  # type: ignore[assignment]  # torch's stub is narrower
            self.backend.allreduce([tensor], opts).wait()
        else:
            dist.all_reduce(tensor, reduce_op, self.backend)

    def close(self) -> None:
        """Leave the group (best effort: a peer may already be gone)."""
        if self.size == 1 or self.backend is None:
            return
        import torch.distributed as dist

        try:
            if self.device.type == "cpu":
                self.backend.shutdown()
            elif dist.is_initialized():
                # A subgroup (a pipeline stage's TP group) goes alone; WORLD takes them all.
                world = self.backend is dist.group.WORLD
                dist.destroy_process_group(None if world else self.backend)
        except Exception:  # pragma: no cover - shutting down anyway
            logger.debug("leaving the TP group failed", exc_info=True)
        self.backend = None


def init_tp_group(
    rank: int,
    size: int,
    init_addr: str,
    bind_host: str,
    timeout_s: float,
    device: torch.device,
) -> TPGroup:
    """Join the TP group: rendezvous on a TCPStore at `init_addr` (rank 0 serves it, bound
    to that address only), then gloo (CPU, bound to `bind_host`) or NCCL (CUDA).
    `timeout_s` bounds the rendezvous and every collective: a peer that hangs fails the
    step instead of blocking forever; one that dies fails it at once (closed connection)."""
    if size == 1:
        return TPGroup(device=device)
    import torch.distributed as dist

    host, port = split_host_port(init_addr)
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        # Listen on the rendezvous address only (TCPStore alone would take every interface).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        store = dist.TCPStore(
            host, port, size, True, timeout, wait_for_workers=False, master_listen_fd=sock.detach()
        )
    else:
        store = dist.TCPStore(host, port, size, False, timeout)
    prefixed = dist.PrefixStore("pdcore-tp", store)
    if device.type == "cpu":
        backend: Any = _gloo(prefixed, rank, size, bind_host, timeout)
    else:
        dist.init_process_group(
            "nccl", store=prefixed, rank=rank, world_size=size, timeout=timeout, device_id=device
        )
        backend = dist.group.WORLD
    group = TPGroup(rank=rank, size=size, backend=backend, device=device, store=store)
    logger.info(
        "TP rank %d of %d joined (%s)", rank, size, "gloo" if device.type == "cpu" else "nccl"
    )
    return group


def _gloo(store: Any, rank: int, size: int, bind_host: str, timeout: timedelta) -> Any:
    """A gloo process group on `store`, its device bound to `bind_host`."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    return dist.ProcessGroupGloo(store, rank, size, opts)


def init_subgroups(
    world: TPGroup, groups: list[list[int]], bind_host: str, timeout_s: float
) -> TPGroup:
    """This rank's group among `groups` (disjoint lists of `world` ranks covering it; every
    rank calls this with the same lists), on the world's rendezvous store. Its ranks are
    numbered by their position in their list. Gloo on CPU; NCCL: `new_group` per list, in
    the same order on every rank, as torch requires."""
    mine = next(g for g in groups if world.rank in g)
    if len(mine) == 1:
        return TPGroup(device=world.device)
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    index = groups.index(mine)
    if world.device.type == "cpu":
        store = dist.PrefixStore(f"pdcore-sub{index}", world.store)
        backend: Any = _gloo(store, mine.index(world.rank), len(mine), bind_host, timeout)
    else:
        made = [dist.new_group(g, timeout=timeout) for g in groups]
        backend = made[index]
    return TPGroup(
        rank=mine.index(world.rank),
        size=len(mine),
        backend=backend,
        device=world.device,
        store=world.store,
    )
