"""`run_server`: start the engine process, wait until it is ready, serve HTTP, clean up.

The port is checked before the engine starts, so a busy port fails in a second instead of
after the model loaded. Whatever ends the server -- SIGTERM, Ctrl-C, an engine that fails
to start, an exception -- the engine process is stopped and reaped and the ipc directory
removed: no orphan keeps the KV pool or the GPU.

Tensor parallel (--tp-size N): this node's TP ranks are started beside the engine (which is
rank 0) and watched like it. A rank that dies ends the whole server: /health turns 503,
requests in flight get errors, and the process exits non-zero a moment later
(DEAD_EXIT_S) -- a TP group that lost a rank cannot serve again, so a supervisor should
restart all nodes. A node other than 0 (--node-rank K) runs only its ranks: no HTTP, and it
exits when they do (0 after rank 0 told them to stop, 1 when the group failed).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from pdcore.model.generation_defaults import GenerationDefaults
from pdcore.model.parallel import bind_address
from pdcore.server.app import build_app
from pdcore.server.engine_client import EngineClient, EngineStartupError
from pdcore.server.engine_process import (
    start_engine_process,
    start_follower_processes,
    stop_engine_process,
)
from pdcore.server.generation import ServerState
from pdcore.server.metrics import Metrics
from pdcore.settings import ServerSettings
from pdcore.web.errors import check_port

logger = logging.getLogger("pdcore.server")

GRACEFUL_SHUTDOWN_S = 5
DEAD_EXIT_S = 2.0  # TP: after a rank died, how long 503s are served before exiting


class _Terminate(BaseException):
    """Raised by our SIGTERM handler so the cleanup in `finally` blocks runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminate()


def run_server(settings: ServerSettings) -> None:
    """Serve `settings.model_path` on settings.host:settings.port until SIGINT or SIGTERM.

    Raises SystemExit (status 1, with the engine's message) when the engine fails to start
    or the port cannot be listened on.
    """
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s [server] %(levelname)s %(name)s: %(message)s",
    )
    if settings.node_rank > 0:
        _run_follower_node(settings)
        return
    check_port("pdcore serve", settings.host, settings.port)
    ipc_dir = tempfile.mkdtemp(prefix="pdcore-ipc-")
    procs: list[BaseProcess] = []
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        asyncio.run(_serve(settings, ipc_dir, procs))
    except (KeyboardInterrupt, _Terminate):
        logger.info("shutting down")
    finally:
        for proc in procs:  # normally already stopped by _serve; rank 0 first
            stop_engine_process(proc)
        shutil.rmtree(ipc_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _init_addr(settings: ServerSettings) -> str | None:
    """The TP rendezvous: --dist-init-addr, or (one node) a free port on --host."""
    if settings.tp_size == 1:
        return None
    if settings.dist_init_addr:
        return settings.dist_init_addr
    host = bind_address(settings.host)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _run_follower_node(settings: ServerSettings) -> None:
    """Node K > 0: run this node's TP ranks until they exit; no HTTP. Exits non-zero when
    any rank failed (a peer or rank 0 died, a timeout), zero after rank 0's stop."""
    assert settings.dist_init_addr is not None  # checked with the flags
    procs: list[BaseProcess] = []
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    failed: list[str] = []
    try:
        procs = start_follower_processes(settings, settings.dist_init_addr)
        logger.info(
            "node %d: TP ranks %s started (pids %s); rank 0 at %s",
            settings.node_rank,
            [p.name for p in procs],
            [p.pid for p in procs],
            settings.dist_init_addr,
        )
        running = list(procs)
        while running:
            for sentinel in multiprocessing.connection.wait([p.sentinel for p in running]):
                proc = next(p for p in running if p.sentinel == sentinel)
                proc.join()
                running.remove(proc)
                if proc.exitcode != 0:
                    failed.append(f"{proc.name} exited with code {proc.exitcode}")
                    # The group is broken: the others would only fail later.
                    for other in running:
                        stop_engine_process(other)
                    running = []
                    break
    except (KeyboardInterrupt, _Terminate):
        logger.info("shutting down")
    finally:
        for proc in procs:
            stop_engine_process(proc)
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise SystemExit(f"pdcore serve (node {settings.node_rank}): {'; '.join(failed)}")


async def _serve(
    settings: ServerSettings,
    ipc_dir: str,
    procs: list[BaseProcess],
) -> None:
    client = EngineClient(ipc_dir)
    init_addr = _init_addr(settings)
    proc = start_engine_process(settings, client.request_addr, client.output_addr, init_addr)
    procs.append(proc)
    followers: list[BaseProcess] = []
    try:
        if init_addr is not None:
            followers = start_follower_processes(settings, init_addr)
            procs.extend(followers)
            logger.info(
                "tensor parallel: %d ranks over %d node(s), rendezvous %s; local followers %s",
                settings.tp_size,
                settings.nnodes,
                init_addr,
                [p.pid for p in followers],
            )
        logger.info("engine process %d started; loading the model", proc.pid)
        t0 = time.monotonic()
        try:
            ready = await client.wait_ready(proc, followers)
        except EngineStartupError as exc:
            raise SystemExit(f"pdcore serve: the engine failed to start: {exc}") from None
        logger.info("engine ready in %.1fs; loading the tokenizer", time.monotonic() - t0)
        tokenizer = await asyncio.to_thread(_load_tokenizer, settings)
        defaults = await asyncio.to_thread(_sampling_defaults, settings)
        state = ServerState(
            settings=settings,
            client=client,
            tokenizer=tokenizer,
            model_name=ready.model_name,
            max_context_len=ready.max_context_len,
            engine_info=dict(ready.server_info),
            metrics=Metrics(ready.model_name),
            vocab_size=len(tokenizer),
            sampling_defaults=defaults,
        )
        config = uvicorn.Config(
            build_app(state),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=settings.log_level == "debug",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            lifespan="off",
        )
        logger.info("serving %s on http://%s:%d", state.model_name, settings.host, settings.port)
        server = uvicorn.Server(config)
        watchdog = None
        if settings.tp_size > 1:
            watchdog = asyncio.create_task(_exit_when_dead(client, server))
        await server.serve()
        if watchdog is not None:
            watchdog.cancel()
        if settings.tp_size > 1 and not client.alive:
            raise SystemExit(f"pdcore serve: tensor-parallel engine failed: {client.dead_reason}")
    finally:
        client.close()
        for p in procs:  # rank 0 first: it tells the followers to stop
            stop_engine_process(p)


async def _exit_when_dead(client: EngineClient, server: uvicorn.Server) -> None:
    """TP: once any rank is gone, answer 503 for DEAD_EXIT_S, then stop serving."""
    await client.wait_dead()
    await asyncio.sleep(DEAD_EXIT_S)
    logger.error("a TP rank is gone (%s); exiting", client.dead_reason)
    server.should_exit = True


def _load_tokenizer(settings: ServerSettings) -> Any:
    from pdcore.model.tokenizer import load_tokenizer

    return load_tokenizer(settings.model_path, settings.tokenizer_path)


def _sampling_defaults(settings: ServerSettings) -> GenerationDefaults:
    from pdcore.model.generation_defaults import sampling_defaults

    defaults = sampling_defaults(settings.sampling_defaults, settings.model_path)
    logger.info("sampling defaults %s from %s", defaults.params, defaults.source)
    return defaults


if __name__ == "__main__":  # python -m pdcore.server.launch [pdcore serve flags]
    from pdcore.settings import parse_serve_args

    run_server(parse_serve_args(sys.argv[1:]))
