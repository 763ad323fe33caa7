"""CUDA graphs for decode steps: capture the whole model forward once per padded batch size,
then replay it with new inputs written into the same buffers.

A decode step on a GPU is hundreds of small kernel launches; replaying them as one graph
removes the per-launch CPU cost that otherwise dominates small batches. Graphs are captured
at start-up for batch sizes 1, 2, 4, 8, ... up to `max_bs` (plus `max_bs` itself); a batch
of n sequences replays the smallest graph of size >= n, its extra rows padded with a
harmless dummy token. Extend (prefill) steps and larger batches run eagerly. CPU engines
never construct this class.

Attention backends opt in by implementing `GraphAttentionBackend` below (the "triton"
backend does; the built-in "torch" backend does not, and its decode simply runs eagerly).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Protocol, TypeGuard, runtime_checkable

import torch

from pdcore.model.attention import AttentionBackend
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.registry import CausalLM

logger = logging.getLogger(__name__)


@runtime_checkable
class GraphAttentionBackend(AttentionBackend, Protocol):
    """Optional part of the attention contract (pdcore.model.attention.AttentionBackend).

    During capture and replay the runner never calls `prepare()`: the backend's decode
    metadata must live in buffers allocated once, which replay updates in place.
    """

    def init_cuda_graph_state(self, max_bs: int, max_pages: int) -> None:
        """Allocate the fixed-size metadata buffers: up to `max_bs` sequences of up to
        `max_pages` pages each. Called once, before any capture."""

    def prepare_for_capture(self, bs: int, batch: ForwardBatch, pool: KVPool) -> None:
        """Fill `batch.attn_meta` with views of the buffers sized for `bs` sequences, holding
        valid dummy values (the batch's own page tables are placeholders); `forward()` reads
        only these during capture."""

    def prepare_for_replay(self, bs: int, batch: ForwardBatch, pool: KVPool) -> None:
        """Write the real decode batch's metadata (batch.num_seqs <= bs sequences) into the
        buffers in place, rows num_seqs..bs-1 as padding (one token on the padding page).
        No device synchronisation, no new device tensors the graph would not see."""


def supports_cuda_graph(attn: object) -> TypeGuard[GraphAttentionBackend]:
    return isinstance(attn, GraphAttentionBackend)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, ... below max_bs, then max_bs."""
    sizes = []
    bs = 1
    while bs < max_bs:
        sizes.append(bs)
        bs *= 2
    sizes.append(max_bs)
    return sizes


class _CapturedAttention:
    """The backend as the model sees it inside a graph: metadata is prepared outside."""

    def __init__(self, attn: AttentionBackend) -> None:
        self.forward = attn.forward

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        pass


class CudaGraphRunner:
    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        attn: GraphAttentionBackend,
        max_bs: int,
        max_pages: int,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attn = attn
        self.device = model.device
        self.sizes = capture_sizes(max_bs)
        self.max_bs = max_bs
        dev = self.device
        # Rows: input ids, positions, out slots. Padding rows: token 0 at position 0, its
        # K/V written to slot 0 of the padding page, which no real sequence reads.
        self.inputs = torch.zeros((3, max_bs), dtype=torch.long, device=dev)
        self.logits_rows = torch.arange(max_bs, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        attn.init_cuda_graph_state(max_bs, max_pages)
        self._capture_all()

    def _batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            is_decode=True,
            input_ids=self.inputs[0, :bs],
            positions=self.inputs[1, :bs],
            out_slots=self.inputs[2, :bs],
            seq_lens=[1] * bs,
            extend_lens=[1] * bs,
            page_tables=[[0]] * bs,
            logits_indices=self.logits_rows[:bs],
            page_size=self.pool.page_size,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        started = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        proxy = _CapturedAttention(self.attn)
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        self.inputs.zero_()
        # Largest first, so the smaller graphs reuse its memory from the shared pool.
        for bs in reversed(self.sizes):
            batch = self._batch(bs)
            self.attn.prepare_for_capture(bs, batch, self.pool)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: compiles kernels, picks algorithms
                for _ in range(2):
                    self.model.forward(batch, self.pool, proxy)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, stream=stream):
                out = self.model.forward(batch, self.pool, proxy)
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured CUDA graphs for decode batch sizes %s in %.1fs (%.0f MiB)",
            self.sizes,
            time.monotonic() - started,
            (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.num_seqs <= self.max_bs

    @torch.inference_mode()
    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits [num_seqs, vocab]; a view valid until the next replay."""
        n = batch.num_seqs
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        inputs = self.inputs
        inputs[0, :n].copy_(batch.input_ids)
        inputs[1, :n].copy_(batch.positions)
        inputs[2, :n].copy_(batch.out_slots)
        if n < bs:
            inputs[:, n:bs].zero_()
        self.attn.prepare_for_replay(bs, batch, self.pool)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
