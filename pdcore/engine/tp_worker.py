"""One rank's model, KV pool and attention backend; and the loop of a TP follower.

`load_rank` is what every rank does at start-up, the driver (rank 0, inside `EngineCore`)
and the followers alike: pick device and dtype, size its KV pool for the KV heads it holds
(every rank then agrees on the smallest page count, so a page id means the same slots on
every rank), load its shard of the weights, build its attention backend with its local head
counts. A follower then runs `FollowerWorker.run()`: receive rank 0's next batch, run the
same forward on its shard (the all-reduces inside pair up with rank 0's), repeat -- it never
schedules, samples or allocates pages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pdcore.engine.config import EngineConfig
from pdcore.engine.kv_memory import kv_pool_allocation
from pdcore.engine.model_runner import ModelRunner
from pdcore.engine.setup import pick_device, pick_dtype, pool_pages, weights_stay_quantized
from pdcore.engine.tp_sync import BATCH, STOP, BatchReceiver
from pdcore.model import registry
from pdcore.model.loader import ResolvedModel, load_state_dict, resolve_model
from pdcore.model.parallel import TPGroup, check_tp_size
from pdcore.model.quantized import load_quantized
from pdcore.plugins import get_registry

logger = logging.getLogger(__name__)


@dataclass
class LoadedRank:
    resolved: ResolvedModel
    device: torch.device
    dtype: torch.dtype
    runner: ModelRunner
    num_pages: int  # including the padding page; equal on every rank
    max_context_len: int


def load_rank(
    settings: EngineConfig, tp: TPGroup | None = None, ep_group: TPGroup | None = None
) -> LoadedRank:
    """Load this rank's part of the model (the whole model without TP); `ep_group`: with
    --enable-dp-attention, the group the MoE layers split their experts over."""
    tp = tp or TPGroup()
    resolved = resolve_model(settings.model_path)
    config = resolved.config
    family = registry.family_for(config)
    registry.check_parallel(config, tp.size)
    check_tp_size(config, tp.size)
    device = tp.device if tp.enabled else pick_device(settings.device, settings.base_gpu_id)
    keeps = family.quantized_linear and weights_stay_quantized(
        settings.dtype, settings.quantization, resolved.source, device, tp.size
    )
    dtype = pick_dtype(settings.dtype, device, keeps)
    num_pages = pool_pages(
        config,
        dtype,
        device,
        settings.page_size,
        settings.max_total_tokens,
        settings.mem_fraction_static,
        tp.size,
        settings.tp_ranks_per_node,
    )
    if tp.enabled:  # the same pages on every rank: the smallest pool decides
        agreed = tp.all_reduce_min(torch.tensor([num_pages], dtype=torch.long, device=device))
        if int(agreed.item()) != num_pages:
            logger.info("KV pool: %d pages, agreed by the TP group", int(agreed.item()) - 1)
        num_pages = int(agreed.item())
    capacity_tokens = (num_pages - 1) * settings.page_size
    context = min(config.max_position_embeddings, settings.context_length or 1 << 30)
    if context > capacity_tokens:
        logger.warning(
            "context length %d exceeds the KV pool (%d tokens); limiting it to the pool",
            context,
            capacity_tokens,
        )
        context = capacity_tokens
    quant = None
    if family.quantized_linear or settings.quantization not in ("auto", "none"):
        quant = load_quantized(
            settings.quantization, resolved.source, config, device, tp.size,
            settings.gguf_activations, settings.quantized_prefill_dtype, settings.dtype,
        )  # fmt: skip
    state = load_state_dict(resolved)
    model = registry.build_model(
        config, state, dtype, device, context + 1, tp, quant, settings.ep_size, ep_group
    )
    with kv_pool_allocation(device):  # a plugin's allocator, where its transport needs one
        pool = registry.make_kv_pool(config, num_pages, settings.page_size, dtype, device, tp.size)
    backend = settings.attention_backend
    if not family.uses_attention_backend and backend != "torch":
        logger.info(
            "%s attends in its own code: --attention-backend %s unused",
            family.architecture,
            backend,
        )
        backend = "torch"
    attn = get_registry("attention_backend").create(
        backend,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=config.head_dim,
        device=device,
        dtype=dtype,
    )
    runner = ModelRunner(
        model,
        pool,
        attn,
        # dp-attention steps run lock-step with idle peers: eager, as TP decode is.
        disable_cuda_graph=settings.disable_cuda_graph
        or not family.cuda_graphs
        or ep_group is not None,
        cuda_graph_max_bs=settings.cuda_graph_max_bs,
    )
    return LoadedRank(resolved, device, dtype, runner, num_pages, context)


class FollowerWorker:
    """TP rank 1..N-1: run rank 0's batches on this rank's shard until told to stop.

    Any failure of the group (rank 0 gone, a peer gone, --dist-timeout passed) raises out
    of `run()`; the process then exits non-zero and whoever watches it fails the server.
    """

    def __init__(self, settings: EngineConfig, tp: TPGroup) -> None:
        if not tp.enabled or tp.is_driver:
            raise ValueError("FollowerWorker is for TP ranks 1..N-1")
        self.tp = tp
        self.rank = load_rank(settings, tp)
        self.receiver = BatchReceiver(tp)
        self.num_forward_steps = 0

    def run(self) -> None:
        runner = self.rank.runner
        while True:
            msg = self.receiver.recv()
            if msg.kind == STOP:
                logger.info("TP rank %d: stop from rank 0", self.tp.rank)
                return
            if msg.kind == BATCH and msg.batch is not None:
                runner.run(msg.batch)
                self.num_forward_steps += 1
