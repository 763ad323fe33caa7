"""Owns the model, the KV pool and the attention backend; turns a scheduled batch into logits."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pdcore.engine.cuda_graph import CudaGraphRunner

from pdcore.engine.scheduler import ScheduledBatch, pages_for
from pdcore.engine.tp_sync import BatchBroadcaster
from pdcore.model.attention import AttentionBackend
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.registry import CausalLM

logger = logging.getLogger(__name__)

DEFAULT_CUDA_GRAPH_MAX_BS = 64


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        attn_backend: AttentionBackend,
        *,
        disable_cuda_graph: bool = False,
        cuda_graph_max_bs: int = DEFAULT_CUDA_GRAPH_MAX_BS,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attn = attn_backend
        self.device = model.device
        tp = model.tp
        # TP rank 0 sends every batch to the other ranks before running it.
        self.broadcaster = BatchBroadcaster(tp) if tp.enabled and tp.is_driver else None
        self.graphs: CudaGraphRunner | None = (
            None  # CudaGraphRunner on CUDA; CPU engines never touch cuda_graph.py
        )
        if tp.enabled and self.device.type == "cuda" and not disable_cuda_graph:
            # Not built yet: capturing the all-reduces (and the followers' replays) in
            # CUDA graphs. TP decode runs eagerly.
            logger.info("tensor parallel: CUDA graphs off, decode runs eagerly")
            disable_cuda_graph = True
        if self.device.type == "cuda" and not disable_cuda_graph:
            self.graphs = _make_graph_runner(model, pool, attn_backend, cuda_graph_max_bs)

    def build(self, sched: ScheduledBatch) -> ForwardBatch:
        ps = self.pool.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        row = 0
        for req, n in zip(sched.reqs, sched.extend_lens):
            start = req.num_computed
            end = start + n
            if sched.is_decode:
                ids.append(req.output_ids[-1])
            else:
                ids.extend(req.all_ids[start:end])
            positions.extend(range(start, end))
            pages = req.pages
            slots.extend(pages[p // ps] * ps + p % ps for p in range(start, end))
            seq_lens.append(end)
            row += n
            if end == req.seq_len:  # the sequence is complete: sample its next token
                logits_rows.append(row - 1)
        # one tensor, one host-to-device copy where there is a device; views of it below
        t = len(ids)
        packed = torch.tensor(ids + positions + slots + logits_rows, dtype=torch.long)
        if self.device.type != "cpu":
            packed = packed.to(self.device, non_blocking=True)
        return ForwardBatch(
            is_decode=sched.is_decode,
            input_ids=packed[:t],
            positions=packed[t : 2 * t],
            out_slots=packed[2 * t : 3 * t],
            seq_lens=seq_lens,
            extend_lens=list(sched.extend_lens),
            page_tables=[r.pages for r in sched.reqs],
            logits_indices=packed[3 * t :],
            page_size=ps,
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits, one row per sequence that completed in this batch (a TP follower:
        an empty tensor)."""
        if self.broadcaster is not None:
            self.broadcaster.send_batch(batch)
        graphs = self.graphs
        if graphs is not None and graphs.can_run(batch):
            return graphs.replay(batch)
        return self.model.forward(batch, self.pool, self.attn)


def _make_graph_runner(
    model: CausalLM, pool: KVPool, attn: AttentionBackend, max_bs: int
) -> CudaGraphRunner | None:
    from pdcore.engine.cuda_graph import CudaGraphRunner, supports_cuda_graph

    if not supports_cuda_graph(attn):
        logger.info(
            "attention backend %s has no CUDA graph support: decode runs eagerly",
            type(attn).__name__,
        )
        return None
    # Longest sequence the engine admits: the RoPE table covers every position it allows.
    max_positions = model.rotary.cos.shape[0]
    max_pages = min(pages_for(max_positions, pool.page_size), pool.num_pages - 1)
    return CudaGraphRunner(model, pool, attn, max_bs, max_pages)
