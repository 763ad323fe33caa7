"""The processes of a pipeline (--pp-size N): joining the stage group, and stages 1..N-1.

Stage 0 is the engine process itself (engine_process.engine_main joins the group through
`join_pp_group` and hands it to the EngineCore). Stages 1..N-1 are processes running
`stage_main`, started beside it by `start_stage_processes` and watched by the frontend like
TP followers: any of them exiting marks the engine dead (/health 503, requests fail, the
server exits non-zero).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import traceback
from multiprocessing.process import BaseProcess

from pdcore.engine.pp_stage import StageWorker
from pdcore.engine.setup import pick_device
from pdcore.model.parallel import TPGroup, bind_address, init_tp_group
from pdcore.settings import ServerSettings

logger = logging.getLogger("pdcore.pp_process")


def join_pp_group(settings: ServerSettings, stage: int, init_addr: str | None) -> TPGroup:
    """This stage's pipeline group: its device (cuda:base+stage on a GPU), torch's thread
    count (the node's cores shared between the stages), rendezvous at `init_addr`."""
    import torch

    threads = settings.cpu_threads or max((os.cpu_count() or 1) // settings.pp_size, 1)
    torch.set_num_threads(threads)
    device = pick_device(settings.device, settings.base_gpu_id + stage)
    if init_addr is None:
        raise ValueError("pipeline parallel needs a rendezvous address")
    return init_tp_group(
        stage,
        settings.pp_size,
        init_addr,
        bind_address(settings.host),
        settings.dist_timeout,
        device,
    )


def start_stage_processes(settings: ServerSettings, init_addr: str) -> list[BaseProcess]:
    """Spawn stages 1..N-1 (stage 0 is the engine process)."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    for stage in range(1, settings.pp_size):
        proc = ctx.Process(
            target=stage_main,
            args=(settings, stage, init_addr),
            name=f"pdcore-pp{stage}",
            daemon=False,
        )
        proc.start()
        procs.append(proc)
    return procs


def stage_main(settings: ServerSettings, stage: int, init_addr: str) -> None:
    """Entry point of stage 1..N-1: join the group, load its layers, run batches until
    stage 0 says stop (exit 0) or the group fails (exit 1)."""
    from pdcore.server.engine_process import _die_with_parent

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s [pp{stage}] %(levelname)s %(name)s: %(message)s",
    )
    pp: TPGroup | None = None
    try:
        pp = join_pp_group(settings, stage, init_addr)
        worker = StageWorker(settings.engine_config(), pp)
        logger.info("pipeline stage %d ready", stage)
        worker.run()
    except Exception as exc:
        logger.error("pipeline stage %d failed: %s: %s", stage, type(exc).__name__, exc)
        logger.debug("%s", traceback.format_exc())
        sys.exit(1)
    finally:
        if pp is not None:
            pp.close()
