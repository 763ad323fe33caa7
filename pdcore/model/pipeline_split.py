"""Pipeline parallelism: which layers each stage holds, and moving activations between stages.

A model of L layers over P stages: stage s holds a contiguous range, the first L % P stages
one layer more (as even as possible); stage 0 also embeds, the last stage also applies the
final norm and the LM head. Between stages only the hidden state travels: in the Llama
forward the residual stream *is* the hidden state (each layer adds to it; the normed copy
is recomputed from it at the next layer), so one [T, hidden] tensor carries everything a
stage needs.

The stages form one torch.distributed group (`TPGroup` of size P, built by
`init_tp_group`): rank 0 broadcasts each batch over it (pdcore.engine.tp_sync), and
activations go point to point with `send` / `recv` below (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

from typing import Any

import torch

from pdcore.model.config import ModelConfig
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.parallel import TPGroup


def split_layers(num_layers: int, pp_size: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (the first
    `num_layers % pp_size` stages take the extra layer)."""
    if pp_size < 1 or num_layers < pp_size:
        raise ValueError(f"cannot split {num_layers} layers over {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    ranges, start = [], 0
    for stage in range(pp_size):
        end = start + base + (1 if stage < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


def pp_size_problem(config: ModelConfig, pp_size: int) -> str | None:
    """Why `config` cannot be split over `pp_size` stages (None when it can)."""
    if pp_size > config.num_layers:
        return (
            f"pp size {pp_size} is larger than the model's {config.num_layers} layers "
            f"(each stage needs at least one); valid pp sizes: 1..{config.num_layers}"
        )
    return None


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


def isend(group: TPGroup, tensor: torch.Tensor, dst: int) -> Any:
    """Start sending `tensor` (contiguous; keep it alive) to stage `dst`; returns the work
    to `.wait()` on. Sends never block the sender's compute: with several micro-batches in
    flight a blocking send could wait on a peer that is itself blocked sending to us."""
    if group.device.type == "cpu":
        return group.backend.send([tensor], dst, 0)
    import torch.distributed as dist

    return dist.isend(tensor, dst)


def recv(group: TPGroup, tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Receive into `tensor` from stage `src` (blocking); returns it."""
    irecv(group, tensor, src).wait()
    return tensor


def irecv(group: TPGroup, tensor: torch.Tensor, src: int) -> Any:
    """Start receiving into `tensor` from stage `src`; returns the work to `.wait()` on."""
    if group.device.type == "cpu":
        return group.backend.recv([tensor], src, 0)
    import torch.distributed as dist

    return dist.irecv(tensor, src)
