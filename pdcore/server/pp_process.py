"""The processes of a pipeline (--pp-size N, optionally with --tp-size T): joining the grid,
and every grid rank but 0.

The grid has N x T ranks, rank g = stage * T + tp_rank (pdcore.model.pipeline_split). World
rank 0 is the engine process itself (engine_process.engine_main joins the grid through
`join_pp_grid` and hands it to the EngineCore). Ranks 1..N*T-1 are processes running
`stage_main`, started beside it by `pdcore.server.spawn.start_stage_processes` and watched by the frontend like
TP followers: any of them exiting marks the engine dead (/health 503, requests fail, the
server exits non-zero). On a PD side each of them also runs a transfer agent
(pdcore.disagg.rank_channel) that moves the KV of its own layers and heads.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback

from pdcore.disagg.rank_channel import RankAgent
from pdcore.disagg.tp_plan import TPPlace
from pdcore.engine.pp_stage import StageWorker
from pdcore.engine.setup import pick_device
from pdcore.model.dist_addr import bind_address
from pdcore.model.parallel import HeadShard
from pdcore.model.pipeline_split import PipelineGrid, init_pipeline_grid, split_layers
from pdcore.server.spawn import rank_name
from pdcore.settings import ServerSettings

logger = logging.getLogger("pdcore.pp_process")


def join_pp_grid(settings: ServerSettings, rank: int, init_addr: str | None) -> PipelineGrid:
    """Grid rank `rank`'s place: its device (cuda:base+rank on a GPU), torch's thread count
    (the node's cores shared between the grid's ranks), rendezvous at `init_addr`."""
    import torch

    local = settings.grid_ranks_per_node  # ranks on this node
    threads = settings.cpu_threads or max((os.cpu_count() or 1) // local, 1)
    torch.set_num_threads(threads)
    device = pick_device(settings.device, settings.base_gpu_id + rank % local)
    if init_addr is None:
        raise ValueError("pipeline parallel needs a rendezvous address")
    return init_pipeline_grid(
        rank,
        settings.pp_size,
        settings.tp_size,
        init_addr,
        bind_address(settings.host),
        settings.dist_timeout,
        device,
    )


def stage_main(settings: ServerSettings, rank: int, init_addr: str) -> None:
    """Entry point of grid rank 1..N*T-1: join the grid, load its layers (its TP shard of
    them), run batches until rank 0 says stop (exit 0) or a group fails (exit 1)."""
    from pdcore.server.engine_process import _die_with_parent, exit_process

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name = rank_name(settings, rank)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s",
    )
    grid: PipelineGrid | None = None
    agent: RankAgent | None = None
    code = 0
    try:
        grid = join_pp_grid(settings, rank, init_addr)
        worker = StageWorker(settings.engine_config(), grid)
        agent = _pd_agent(settings, worker, grid)
        logger.info("pipeline rank %s ready", name)
        worker.run()
    except Exception as exc:
        logger.error("pipeline rank %s failed: %s: %s", name, type(exc).__name__, exc)
        logger.debug("%s", traceback.format_exc())
        code = 1
    finally:
        if grid is not None:
            grid.close()  # first: rank 0 waits for every rank to leave the groups
        if agent is not None:
            agent.close()
    exit_process(code)


def _pd_agent(
    settings: ServerSettings, worker: StageWorker, grid: PipelineGrid
) -> RankAgent | None:
    """On a PD side every grid rank moves the KV of its own layers and heads, so it runs a
    transfer agent (its own backend, its pool registered) that rank 0's control plane
    drives, as a TP follower does."""
    mode = settings.disaggregation_mode
    if mode == "null":
        return None
    config = worker.rank.resolved.config
    shard = HeadShard.of(config, grid.tp_size, grid.tp_rank)
    layers = split_layers(config.num_layers, grid.pp_size)[grid.stage]
    place = TPPlace(
        grid.rank,
        grid.world.size,
        shard.kv_head_start,
        config.num_kv_heads,
        grid.pp_size,
        layers.start,
        config.num_layers,
    )
    pool = worker.rank.runner.pool
    return RankAgent(mode, settings, pool, settings.host, place, grid.world.store)
