"""Pipeline parallelism: which layers each stage holds, the grid of stages x TP ranks, and
moving activations between stages.

A model of L layers over P stages: stage s holds a contiguous range, the first L % P stages
one layer more (as even as possible); stage 0 also embeds, the last stage also applies the
final norm and the LM head. Between stages only the hidden state travels: in the Llama
forward the residual stream *is* the hidden state (each layer adds to it; the normed copy
is recomputed from it at the next layer), so one [T, hidden] tensor carries everything a
stage needs.

With --tp-size T as well, each stage is a TP group of T ranks: P x T processes, global rank
g = stage * T + tp_rank (`PipelineGrid`). Three kinds of traffic, each on its own group:
the world group (all P x T ranks) carries rank 0's batch broadcast (pdcore.engine.tp_sync)
and the activations, point to point (`isend` / `irecv` below; gloo on CPU, NCCL on CUDA);
each stage's TP group (`init_subgroups`) carries the all-reduces inside its layers. After a
stage's last all-reduce every TP rank of it holds the same full hidden state, so TP rank r
of stage s sends its copy to TP rank r of stage s+1: no gather, no broadcast inside the
next stage, and the T pairs move in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pdcore.model.config import ModelConfig
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.parallel import TPGroup, init_subgroups, init_tp_group
from pdcore.model.pipeline_layers import pp_size_problem, split_layers  # noqa: F401


def stage_config(config: ModelConfig, layers: range) -> ModelConfig:
    """The config a stage's KV pool is sized and built with: only its layers."""
    from dataclasses import replace

    return replace(config, num_layers=len(layers))


def micro_batches(batch: ForwardBatch, parts: int) -> list[ForwardBatch]:
    """`batch` cut into up to `parts` micro-batches of consecutive sequences (as equal in
    sequence count as possible), each a complete ForwardBatch whose logits rows, in order,
    are the original batch's. Every stage cuts a batch the same way, so the micro-batches
    need not be sent. One part (no cut) when the batch has fewer sequences, or a sequence
    without new tokens."""
    s = batch.num_seqs
    parts = min(parts, s)
    if parts <= 1 or min(batch.extend_lens) <= 0:
        return [batch]
    rows = batch.logits_indices.tolist()
    out, seq, tok = [], 0, 0
    base, extra = divmod(s, parts)
    for k in range(parts):
        n = base + (1 if k < extra else 0)
        t = sum(batch.extend_lens[seq : seq + n])
        mine = [r - tok for r in rows if tok <= r < tok + t]
        out.append(
            ForwardBatch(
                is_decode=batch.is_decode,
                input_ids=batch.input_ids[tok : tok + t],
                positions=batch.positions[tok : tok + t],
                out_slots=batch.out_slots[tok : tok + t],
                seq_lens=batch.seq_lens[seq : seq + n],
                extend_lens=batch.extend_lens[seq : seq + n],
                page_tables=batch.page_tables[seq : seq + n],
                logits_indices=torch.tensor(mine, dtype=torch.long, device=batch.input_ids.device),
                page_size=batch.page_size,
            )
        )
        seq, tok = seq + n, tok + t
    return out


@dataclass
class PipelineGrid:
    """This process's place in a pipeline of `pp_size` stages of `tp_size` TP ranks each.
    `world`: every rank of the grid (rank = stage * tp_size + tp_rank); `tp`: this stage's
    TP group (size 1 without TP). World rank 0 is the engine (stage 0, TP rank 0)."""

    world: TPGroup
    pp_size: int
    tp_size: int = 1
    tp: TPGroup = field(default_factory=TPGroup)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def stage(self) -> int:
        return self.world.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.world.rank % self.tp_size

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp_size - 1

    def peer(self, stage: int, tp_rank: int | None = None) -> int:
        """World rank of `tp_rank` (default: this rank's) of `stage`."""
        return stage * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)

    @property
    def device(self) -> torch.device:
        return self.world.device

    def close(self) -> None:
        """Leave both groups (best effort)."""
        try:
            self.tp.close()
        finally:
            self.world.close()


def init_pipeline_grid(
    rank: int,
    pp_size: int,
    tp_size: int,
    init_addr: str,
    bind_host: str,
    timeout_s: float,
    device: torch.device,
) -> PipelineGrid:
    """Join the grid as world rank `rank`: the world group (rendezvous at `init_addr`, world
    rank 0 serves it), then this stage's TP group on the same store."""
    world = init_tp_group(rank, pp_size * tp_size, init_addr, bind_host, timeout_s, device)
    tp = TPGroup(device=device)
    if tp_size > 1:
        stages = [list(range(s * tp_size, (s + 1) * tp_size)) for s in range(pp_size)]
        tp = init_subgroups(world, stages, bind_host, timeout_s)
    return PipelineGrid(world, pp_size, tp_size, tp)


def isend(group: TPGroup, tensor: torch.Tensor, dst: int) -> Any:
    """Start sending `tensor` (contiguous; keep it alive) to world rank `dst`; returns the work
    to `.wait()` on. Sends never block the sender's compute: with several micro-batches in
    flight a blocking send could wait on a peer that is itself blocked sending to us."""
    if group.device.type == "cpu":
        return group.backend.send([tensor], dst, 0)
    import torch.distributed as dist

    return dist.isend(tensor, dst)


def recv(group: TPGroup, tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Receive into `tensor` from world rank `src` (blocking); returns it."""
    irecv(group, tensor, src).wait()
    return tensor


def irecv(group: TPGroup, tensor: torch.Tensor, src: int) -> Any:
    """Start receiving into `tensor` from world rank `src`; returns the work to `.wait()` on."""
    if group.device.type == "cpu":
        return group.backend.recv([tensor], src, 0)
    import torch.distributed as dist

    return dist.irecv(tensor, src)
