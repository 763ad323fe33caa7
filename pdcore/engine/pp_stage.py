"""Pipeline parallelism (--pp-size N, optionally with --tp-size T): one grid rank's model
and KV pool, world rank 0's runner, and the loop of every other rank.

World rank 0 (stage 0, TP rank 0) is the engine (`EngineCore`: scheduler, pages,
sampling); its `PipelineRunner` broadcasts each batch to every rank of the grid over the
world group (tp_sync's int64 wire), runs the embedding and its layers, sends the hidden
state to stage 1, and receives the logits from the last stage. Every other rank
(`StageWorker`) receives the same batch, takes its input -- the embedding on stage 0, the
hidden state from its TP peer of stage s-1 otherwise -- runs its layers (its TP shard of
them, all-reducing with the other ranks of its stage) into its own KV pool, and sends the
hidden state on to its peer of stage s+1 -- or, on the last stage's TP rank 0, the final
norm and LM head's fp32 logits back to world rank 0.

Within a step the batch is cut into up to N micro-batches (`micro_batches`, the same cut on
every rank) that follow each other through the stages, so stage s runs micro-batch k+1
while stage s+1 runs micro-batch k; sends are non-blocking and receives are posted up front.
Steps do not overlap: rank 0 waits for the last logits before it schedules the next step
(decode needs the token it samples from them). docs/parallelism.md says what overlaps.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pdcore.engine.config import EngineConfig
from pdcore.engine.kv_memory import kv_pool_allocation
from pdcore.engine.model_runner import ModelRunner
from pdcore.engine.setup import pick_device, pick_dtype, pool_pages, weights_stay_quantized
from pdcore.engine.tp_sync import BATCH, STOP, BatchBroadcaster, BatchReceiver
from pdcore.engine.tp_worker import LoadedRank
from pdcore.model import registry
from pdcore.model.attention import AttentionBackend
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.llama import LlamaModel
from pdcore.model.loader import load_state_dict, resolve_model
from pdcore.model.parallel import check_tp_size
from pdcore.model.pipeline_split import (
    PipelineGrid,
    irecv,
    isend,
    micro_batches,
    pp_size_problem,
    split_layers,
    stage_config,
)
from pdcore.model.quantized import load_quantized
from pdcore.plugins import get_registry

logger = logging.getLogger(__name__)


class StageBroadcaster(BatchBroadcaster):
    """World rank 0's batch broadcast to the rest of the grid; `stop` also leaves the
    grid's groups."""

    def __init__(self, grid: PipelineGrid) -> None:
        super().__init__(grid.world)
        self.grid = grid

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.grid.close()


class PipelineRunner(ModelRunner):
    """World rank 0's runner: the whole grid's forward, seen from the scheduler as one call."""

    def __init__(
        self, model: LlamaModel, pool: KVPool, attn: AttentionBackend, grid: PipelineGrid
    ) -> None:
        super().__init__(model, pool, attn, disable_cuda_graph=True)
        self.grid = grid
        self.llama = model
        self.broadcaster = StageBroadcaster(grid)
        self.vocab_size = model.config.vocab_size
        # Micro-batches a step is cut into (every rank must use the same number).
        self.micro_batches = grid.pp_size

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        assert self.broadcaster is not None, "the pipeline was stopped"
        self.broadcaster.send_batch(batch)
        grid, world = self.grid, self.grid.world
        parts = micro_batches(batch, self.micro_batches)
        last = grid.peer(grid.pp_size - 1, 0)  # the last stage's TP rank 0 has the LM head
        logits = [
            torch.empty((len(mb.logits_indices), self.vocab_size), dtype=torch.float32,
                        device=self.device)
            for mb in parts
        ]  # fmt: skip
        # Post every receive first; a micro-batch with no finished sequence has no logits.
        works = [irecv(world, out, last) for out in logits if len(out)]
        held = []  # sent tensors stay alive until their sends complete
        for mb in parts:
            self.attn.prepare(mb, self.pool)
            hidden = F.embedding(mb.input_ids, self.llama.embed)
            hidden = self.llama.run_layers(hidden, mb, self.pool, self.attn).contiguous()
            held.append(hidden)
            works.append(isend(world, hidden, grid.peer(1)))  # stage 1 starts on it; we go on
        for work in works:
            work.wait()
        return logits[0] if len(logits) == 1 else torch.cat(logits)


def load_stage(settings: EngineConfig, grid: PipelineGrid) -> LoadedRank:
    """Load grid rank `grid.rank`: its stage's layers, its TP shard of them (the embedding
    on stage 0, the final norm and LM head on the last stage's TP rank 0), a KV pool for
    those layers and its KV heads, its attention backend. Every rank agrees on the smallest
    page count, so world rank 0's page ids are valid everywhere."""
    resolved = resolve_model(settings.model_path)
    config = resolved.config
    family = registry.family_for(config)
    if family.module != "pdcore.model.llama_family":
        raise ValueError(f"--pp-size: pipeline parallelism is built for Llama-family models only, "
                         f"not {family.architecture}")  # fmt: skip
    problem = pp_size_problem(config, grid.pp_size)
    if problem:
        raise ValueError(f"--pp-size: {problem}")
    check_tp_size(config, grid.tp.size)
    layers = split_layers(config.num_layers, grid.pp_size)[grid.stage]
    first, last = grid.is_first, grid.is_last
    local = stage_config(config, layers)
    world = grid.world
    device = world.device if world.enabled else pick_device(settings.device, settings.base_gpu_id)
    keeps = family.quantized_linear and weights_stay_quantized(
        settings.dtype, settings.quantization, resolved.source, device, grid.tp.size
    )
    dtype = pick_dtype(settings.dtype, device, keeps)
    num_pages = pool_pages(
        local,
        dtype,
        device,
        settings.page_size,
        settings.max_total_tokens,
        settings.mem_fraction_static,
        grid.tp.size,
        settings.tp_ranks_per_node,
    )
    agreed = world.all_reduce_min(torch.tensor([num_pages], dtype=torch.long, device=device))
    num_pages = int(agreed.item())
    capacity_tokens = (num_pages - 1) * settings.page_size
    context = min(config.max_position_embeddings, settings.context_length or 1 << 30)
    context = min(context, capacity_tokens)
    quant = None
    if family.quantized_linear or settings.quantization not in ("auto", "none"):
        quant = load_quantized(
            settings.quantization, resolved.source, config, device, grid.tp.size,
            settings.gguf_activations, settings.quantized_prefill_dtype, settings.dtype,
        )  # fmt: skip
    state = load_state_dict(resolved)
    model = LlamaModel(config, state, dtype, device, context + 1, grid.tp, quant, layers)
    if not last:
        model.lm_head = None  # only the last stage computes logits (its TP rank 0)
    if not first:
        model.embed = model.embed.new_empty((0,))  # a tied LM head keeps its own reference
    del state
    with kv_pool_allocation(device):
        pool = registry.make_kv_pool(
            local, num_pages, settings.page_size, dtype, device, grid.tp.size
        )
    attn = get_registry("attention_backend").create(
        settings.attention_backend,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=config.head_dim,
        device=device,
        dtype=dtype,
    )
    if grid.rank == 0:
        runner: ModelRunner = PipelineRunner(model, pool, attn, grid)
    else:
        runner = ModelRunner(model, pool, attn, disable_cuda_graph=True)
        runner.broadcaster = None  # world rank 0 alone sends batches
    logger.info(
        "pipeline stage %d of %d%s: layers %d..%d%s%s, %d KV pages",
        grid.stage,
        grid.pp_size,
        f", TP rank {grid.tp_rank} of {grid.tp_size}" if grid.tp_size > 1 else "",
        layers.start,
        layers.stop - 1,
        ", embedding" if first else "",
        ", final norm + LM head" if model.lm_head is not None else "",
        num_pages - 1,
    )
    return LoadedRank(resolved, device, dtype, runner, num_pages, context)


class StageWorker:
    """Every grid rank but world rank 0: run rank 0's batches through this rank's layers
    until told to stop. Any failure of a group (a rank gone, --dist-timeout passed) raises
    out of `run()`; the process then exits non-zero and the server fails (see launch.py)."""

    def __init__(self, settings: EngineConfig, grid: PipelineGrid) -> None:
        if not grid.world.enabled or grid.rank == 0:
            raise ValueError("StageWorker is for grid ranks 1..N-1 (rank 0 is the engine)")
        self.grid = grid
        self.rank = load_stage(settings, grid)
        self.receiver = BatchReceiver(grid.world)
        self.num_forward_steps = 0
        self.micro_batches = grid.pp_size  # as world rank 0's PipelineRunner

    @torch.inference_mode()
    def run(self) -> None:
        runner = self.rank.runner
        model = runner.model
        assert isinstance(model, LlamaModel)
        grid, world = self.grid, self.grid.world
        hidden_size = model.config.hidden_size
        # Where this rank's output goes: the next stage's same TP rank; from the last stage
        # only TP rank 0 (the one with the LM head) sends, the logits, to world rank 0.
        if not grid.is_last:
            dst: int | None = grid.peer(grid.stage + 1)
        else:
            dst = 0 if model.lm_head is not None else None
        while True:
            msg = self.receiver.recv()
            if msg.kind == STOP:
                logger.info("pipeline stage %d: stop from stage 0", grid.stage)
                return
            if msg.kind != BATCH or msg.batch is None:
                continue
            parts = micro_batches(msg.batch, self.micro_batches)
            if grid.is_first:  # stage 0's other TP ranks embed the tokens themselves
                hiddens = [F.embedding(mb.input_ids, model.embed) for mb in parts]
                recvs = []
            else:
                hiddens = [
                    torch.empty((len(mb.input_ids), hidden_size), dtype=self.rank.dtype,
                                device=runner.device)
                    for mb in parts
                ]  # fmt: skip
                src = grid.peer(grid.stage - 1)
                recvs = [irecv(world, h, src) for h in hiddens]
            sends, held = [], []
            for k, (mb, hidden) in enumerate(zip(parts, hiddens)):
                if recvs:
                    recvs[k].wait()
                runner.attn.prepare(mb, runner.pool)
                out = model.run_layers(hidden, mb, runner.pool, runner.attn)
                if dst is None:
                    continue
                if grid.is_last:
                    if not len(mb.logits_indices):
                        continue
                    out = model.logits(out, mb)
                out = out.contiguous()
                held.append(out)
                sends.append(isend(world, out, dst))
            for work in sends:
                work.wait()
            self.num_forward_steps += 1
