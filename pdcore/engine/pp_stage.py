"""Pipeline parallelism (--pp-size N): one stage's model and KV pool, stage 0's runner, and
the loop of stages 1..N-1.

Stage 0 is the engine (`EngineCore`: scheduler, pages, sampling); its `PipelineRunner`
broadcasts each batch to every stage over the pipeline group (tp_sync's int64 wire), runs
the embedding and its layers, sends the hidden state to stage 1, and receives the logits
from the last stage. Stage s > 0 (`StageWorker`) receives the same batch, receives the
hidden state from stage s-1, runs its layers into its own KV pool, and sends the hidden
state on -- or, on the last stage, the final norm and LM head's fp32 logits back to stage 0.

Within a step the batch is cut into up to N micro-batches (`micro_batches`, the same cut on
every stage) that follow each other through the stages, so stage s runs micro-batch k+1
while stage s+1 runs micro-batch k; sends are non-blocking and receives are posted up front.
Steps do not overlap: stage 0 waits for the last logits before it schedules the next step
(decode needs the token it samples from them). docs/parallelism.md says what overlaps.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pdcore.engine.config import EngineConfig
from pdcore.engine.kv_memory import kv_pool_allocation
from pdcore.engine.model_runner import ModelRunner
from pdcore.engine.setup import pick_device, pick_dtype, pool_pages
from pdcore.engine.tp_sync import BATCH, STOP, BatchBroadcaster, BatchReceiver
from pdcore.engine.tp_worker import LoadedRank
from pdcore.model import registry
from pdcore.model.attention import AttentionBackend
from pdcore.model.forward_batch import ForwardBatch
from pdcore.model.kv_pool import KVPool
from pdcore.model.llama import LlamaModel
from pdcore.model.loader import load_state_dict, resolve_model
from pdcore.model.parallel import TPGroup
from pdcore.model.pipeline_split import (
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
    """Stage 0's batch broadcast to the other stages; `stop` also leaves the group."""

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.group.close()


class PipelineRunner(ModelRunner):
    """Stage 0's runner: the whole pipeline's forward, seen from the scheduler as one call."""

    def __init__(
        self, model: LlamaModel, pool: KVPool, attn: AttentionBackend, pp: TPGroup
    ) -> None:
        super().__init__(model, pool, attn, disable_cuda_graph=True)
        self.pp = pp
        self.llama = model
        self.broadcaster = StageBroadcaster(pp)
        self.vocab_size = model.config.vocab_size
        # Micro-batches a step is cut into (every stage must use the same number).
        self.micro_batches = pp.size

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        assert self.broadcaster is not None, "the pipeline was stopped"
        self.broadcaster.send_batch(batch)
        parts = micro_batches(batch, self.micro_batches)
        last = self.pp.size - 1
        logits = [
            torch.empty((len(mb.logits_indices), self.vocab_size), dtype=torch.float32,
                        device=self.device)
            for mb in parts
        ]  # fmt: skip
        # Post every receive first; a micro-batch with no finished sequence has no logits.
        works = [irecv(self.pp, out, last) for out in logits if len(out)]
        held = []  # sent tensors stay alive until their sends complete
        for mb in parts:
            self.attn.prepare(mb, self.pool)
            hidden = F.embedding(mb.input_ids, self.llama.embed)
            hidden = self.llama.run_layers(hidden, mb, self.pool, self.attn).contiguous()
            held.append(hidden)
            works.append(isend(self.pp, hidden, 1))  # stage 1 starts on it; we go on
        for work in works:
            work.wait()
        return logits[0] if len(logits) == 1 else torch.cat(logits)


def load_stage(settings: EngineConfig, pp: TPGroup) -> LoadedRank:
    """Load pipeline stage `pp.rank`: its layers (and the embedding on stage 0, the final
    norm and LM head on the last), a KV pool for its layers, its attention backend. Every
    stage agrees on the smallest page count, so stage 0's page ids are valid everywhere."""
    resolved = resolve_model(settings.model_path)
    config = resolved.config
    family = registry.family_for(config)
    if family.module != "pdcore.model.llama_family":
        raise ValueError(f"--pp-size: pipeline parallelism is built for Llama-family models only, "
                         f"not {family.architecture}")  # fmt: skip
    problem = pp_size_problem(config, pp.size)
    if problem:
        raise ValueError(f"--pp-size: {problem}")
    layers = split_layers(config.num_layers, pp.size)[pp.rank]
    first, last = pp.rank == 0, pp.rank == pp.size - 1
    local = stage_config(config, layers)
    device = pp.device if pp.enabled else pick_device(settings.device, settings.base_gpu_id)
    dtype = pick_dtype(settings.dtype, device)
    num_pages = pool_pages(
        local,
        dtype,
        device,
        settings.page_size,
        settings.max_total_tokens,
        settings.mem_fraction_static,
        1,
        settings.tp_ranks_per_node,
    )
    agreed = pp.all_reduce_min(torch.tensor([num_pages], dtype=torch.long, device=device))
    num_pages = int(agreed.item())
    capacity_tokens = (num_pages - 1) * settings.page_size
    context = min(config.max_position_embeddings, settings.context_length or 1 << 30)
    context = min(context, capacity_tokens)
    quant = None
    if family.quantized_linear or settings.quantization not in ("auto", "none"):
        quant = load_quantized(settings.quantization, resolved.source, config, device, 1)
    state = load_state_dict(resolved)
    model = LlamaModel(config, state, dtype, device, context + 1, None, quant, layers)
    if not last:
        model.lm_head = None  # only the last stage computes logits
    if not first:
        model.embed = model.embed.new_empty((0,))  # a tied LM head keeps its own reference
    del state
    with kv_pool_allocation(device):
        pool = registry.make_kv_pool(local, num_pages, settings.page_size, dtype, device, 1)
    attn = get_registry("attention_backend").create(
        settings.attention_backend,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=config.head_dim,
        device=device,
        dtype=dtype,
    )
    if first:
        runner: ModelRunner = PipelineRunner(model, pool, attn, pp)
    else:
        runner = ModelRunner(model, pool, attn, disable_cuda_graph=True)
    logger.info(
        "pipeline stage %d of %d: layers %d..%d%s%s, %d KV pages",
        pp.rank,
        pp.size,
        layers.start,
        layers.stop - 1,
        ", embedding" if first else "",
        ", final norm + LM head" if last else "",
        num_pages - 1,
    )
    return LoadedRank(resolved, device, dtype, runner, num_pages, context)


class StageWorker:
    """Pipeline stage 1..N-1: run stage 0's batches through this stage's layers until told
    to stop. Any failure of the group (a stage gone, --dist-timeout passed) raises out of
    `run()`; the process then exits non-zero and the server fails (see launch.py)."""

    def __init__(self, settings: EngineConfig, pp: TPGroup) -> None:
        if not pp.enabled or pp.rank == 0:
            raise ValueError("StageWorker is for pipeline stages 1..N-1")
        self.pp = pp
        self.rank = load_stage(settings, pp)
        self.receiver = BatchReceiver(pp)
        self.num_forward_steps = 0
        self.micro_batches = pp.size  # as stage 0's PipelineRunner

    @torch.inference_mode()
    def run(self) -> None:
        runner = self.rank.runner
        model = runner.model
        assert isinstance(model, LlamaModel)
        last = self.pp.rank == self.pp.size - 1
        hidden_size = model.config.hidden_size
        dst = 0 if last else self.pp.rank + 1
        while True:
            msg = self.receiver.recv()
            if msg.kind == STOP:
                logger.info("pipeline stage %d: stop from stage 0", self.pp.rank)
                return
            if msg.kind != BATCH or msg.batch is None:
                continue
            parts = micro_batches(msg.batch, self.micro_batches)
            hiddens = [
                torch.empty((len(mb.input_ids), hidden_size), dtype=self.rank.dtype,
                            device=runner.device)
                for mb in parts
            ]  # fmt: skip
            recvs = [irecv(self.pp, h, self.pp.rank - 1) for h in hiddens]
            sends, held = [], []
            for mb, hidden, received in zip(parts, hiddens, recvs):
                received.wait()
                runner.attn.prepare(mb, runner.pool)
                out = model.run_layers(hidden, mb, runner.pool, runner.attn)
                if last:
                    if not len(mb.logits_indices):
                        continue
                    out = model.logits(out, mb)
                out = out.contiguous()
                held.append(out)
                sends.append(isend(self.pp, out, dst))
            for work in sends:
                work.wait()
            self.num_forward_steps += 1
