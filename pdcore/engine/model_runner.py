"""Owns the model, the KV pool and the attention backend; turns a scheduled batch into logits."""

from __future__ import annotations

import torch

from pdcore.engine.forward_batch import ForwardBatch
from pdcore.engine.kv_pool import KVPool
from pdcore.engine.scheduler import ScheduledBatch
from pdcore.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, attn_backend) -> None:
        self.model = model
        self.pool = pool
        self.attn = attn_backend
        self.device = model.device

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
        dev = self.device
        return ForwardBatch(
            is_decode=sched.is_decode,
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            out_slots=torch.tensor(slots, dtype=torch.long, device=dev),
            seq_lens=seq_lens,
            extend_lens=list(sched.extend_lens),
            page_tables=[r.pages for r in sched.reqs],
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            page_size=ps,
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits, one row per sequence that completed in this batch."""
        return self.model.forward(batch, self.pool, self.attn)
