"""Starting and stopping the engine-side processes, from the HTTP frontend, without torch.

The frontend only spawns and watches these processes; the model, torch and transformers live
in them. Each process target here is a small trampoline that imports its heavy module
(engine_process or pp_process) inside the child, so the frontend never imports torch: that
saved ~3 s of CPU per server start (and the same again in every spawned child, which
re-imports the frontend's main module).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from multiprocessing.process import BaseProcess
from typing import Any

from pdcore.settings import ServerSettings

logger = logging.getLogger("pdcore.server")


def _engine_entry(*args: Any) -> None:
    from pdcore.server.engine_process import engine_main

    engine_main(*args)


def _follower_entry(*args: Any) -> None:
    from pdcore.server.engine_process import follower_main

    follower_main(*args)


def _stage_entry(*args: Any) -> None:
    from pdcore.server.pp_process import stage_main

    stage_main(*args)


def _spawn(target: Any, args: tuple[Any, ...], name: str) -> BaseProcess:
    # "spawn": a fresh interpreter, no forked torch/zmq state. Not daemonic: a daemonic
    # process may not start children (the engine starts transfer threads and processes).
    proc = multiprocessing.get_context("spawn").Process(
        target=target, args=args, name=name, daemon=False
    )
    proc.start()
    return proc


def start_engine_process(
    settings: ServerSettings,
    request_addr: str,
    output_addr: str,
    init_addr: str | None = None,
    dp_rank: int = 0,
) -> BaseProcess:
    """Spawn the engine process; with TP it is rank 0 and joins the group at `init_addr`
    (with --enable-dp-attention: dp rank `dp_rank` of the MoE layers' group there)."""
    args = (settings, request_addr, output_addr, os.getpid(), init_addr, dp_rank)
    return _spawn(_engine_entry, args, "pdcore-engine")


def node_ranks(settings: ServerSettings) -> list[int]:
    """The global TP ranks this node runs: node k holds ranks k*L .. k*L+L-1."""
    per_node = settings.tp_ranks_per_node
    return list(range(settings.node_rank * per_node, (settings.node_rank + 1) * per_node))


def start_follower_processes(settings: ServerSettings, init_addr: str) -> list[BaseProcess]:
    """Spawn this node's TP followers (every rank of this node except global rank 0)."""
    return [
        _spawn(_follower_entry, (settings, rank, init_addr, os.getpid()), f"pdcore-tp{rank}")
        for rank in node_ranks(settings)
        if rank != 0
    ]


def rank_name(settings: ServerSettings, rank: int) -> str:
    """pp1 (no TP) or pp1-tp0: how a pipeline grid rank's process and log lines are named."""
    stage, tp_rank = divmod(rank, settings.tp_size)
    return f"pp{stage}" + (f"-tp{tp_rank}" if settings.tp_size > 1 else "")


def start_stage_processes(settings: ServerSettings, init_addr: str) -> list[BaseProcess]:
    """Spawn this node's pipeline grid ranks (`grid_ranks_per_node` contiguous ones; on node
    0 all but rank 0, which is the engine process)."""
    per_node = settings.grid_ranks_per_node
    first = settings.node_rank * per_node
    return [
        _spawn(_stage_entry, (settings, rank, init_addr), f"pdcore-{rank_name(settings, rank)}")
        for rank in range(max(first, 1), first + per_node)
    ]


def stop_engine_process(proc: BaseProcess, timeout: float = 5.0) -> None:
    """Terminate an engine-side process and reap it, escalating to SIGKILL; never leave an
    orphan."""
    if proc.pid is None:
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        logger.warning("engine process did not stop on SIGTERM; killing it")
        proc.kill()
        proc.join(timeout)
    else:
        proc.join(0)
