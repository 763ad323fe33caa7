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

A PD prefill with --dp-size N: each replica's engine serves its bootstrap server on a
private free port, and this process serves the instance's one bootstrap server on
--disaggregation-bootstrap-port, answering decode's query for dp rank r with replica r's
route (pdcore.disagg.bootstrap.replica_routes); requests go to replica `room % N`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from pdcore.disagg.auth import ControlAuth
from pdcore.disagg.bootstrap import BootstrapError, BootstrapServer, replica_routes
from pdcore.model.dist_addr import bind_address, free_port
from pdcore.model.generation_defaults import GenerationDefaults
from pdcore.server.app import build_app
from pdcore.server.dp_client import (
    DataParallelClient,
    make_dp_client,
    replica_ipc_dir,
    wait_replicas_ready,
)
from pdcore.server.engine_client import EngineClient, EngineStartupError
from pdcore.server.generation import ServerState
from pdcore.server.http_limits import guarded_h11
from pdcore.server.metrics import Metrics
from pdcore.server.spawn import (
    start_engine_process,
    start_follower_processes,
    start_stage_processes,
    stop_engine_process,
)
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
    if _dp_prefill(settings):
        check_port("pdcore serve", settings.host, settings.disaggregation_bootstrap_port)
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


def replica_settings(
    settings: ServerSettings, dp_rank: int, bootstrap_port: int | None = None
) -> ServerSettings:
    """Replica `dp_rank`'s settings: with --dp-size, its share of the node's cores (unless
    --cpu-threads) and, on GPUs, its own devices after the earlier replicas'; on a PD
    prefill, its own private `bootstrap_port`."""
    if settings.dp_size == 1:
        return settings
    cores = os.cpu_count() or 1
    update: dict[str, Any] = {
        "cpu_threads": settings.cpu_threads or max(cores // settings.engine_procs_per_node, 1),
        "base_gpu_id": settings.base_gpu_id + dp_rank * settings.tp_ranks_per_node,
    }
    if bootstrap_port is not None:
        update["disaggregation_bootstrap_port"] = bootstrap_port
    return settings.model_copy(update=update)


def _dp_prefill(settings: ServerSettings) -> bool:
    return settings.disaggregation_mode == "prefill" and settings.dp_size > 1


def _init_addr(settings: ServerSettings) -> str | None:
    """The TP (or pipeline) rendezvous: --dist-init-addr, or (one node) a free port on
    --host."""
    if settings.tp_size == 1 and settings.pp_size == 1:
        return None
    if settings.dist_init_addr:
        return settings.dist_init_addr
    host = bind_address(settings.host)
    port = free_port(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _run_follower_node(settings: ServerSettings) -> None:
    """Node K > 0: run this node's TP ranks (or pipeline grid ranks) until they exit; no HTTP. Exits non-zero when
    any rank failed (a peer or rank 0 died, a timeout), zero after rank 0's stop."""
    assert settings.dist_init_addr is not None  # checked with the flags
    procs: list[BaseProcess] = []
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    failed: list[str] = []
    try:
        if settings.pp_size > 1:
            procs = start_stage_processes(settings, settings.dist_init_addr)
        else:
            procs = start_follower_processes(settings, settings.dist_init_addr)
        logger.info(
            "node %d: ranks %s started (pids %s); rank 0 at %s",
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
    replicas: list[EngineClient] = []
    engines: list[BaseProcess] = []
    followers: list[list[BaseProcess]] = []
    bootstrap: BootstrapServer | None = None
    # PD prefill with --dp-size: each replica's own bootstrap server, on a private port.
    ports = (
        [free_port(bind_address(settings.host)) for _ in range(settings.dp_size)]
        if _dp_prefill(settings)
        else []
    )
    # --enable-dp-attention: one rendezvous for all dp ranks (the MoE layers' group).
    dp_attention_addr = _init_addr(settings) if settings.enable_dp_attention else None
    try:
        for dp_rank in range(settings.dp_size):
            rs = replica_settings(settings, dp_rank, ports[dp_rank] if ports else None)
            if settings.dp_size > 1:
                replica = EngineClient(
                    replica_ipc_dir(ipc_dir, dp_rank), f"dp rank {dp_rank} engine"
                )
            else:
                replica = EngineClient(ipc_dir)
            replicas.append(replica)
            init_addr = dp_attention_addr or _init_addr(rs)
            proc = start_engine_process(
                rs, replica.request_addr, replica.output_addr, init_addr, dp_rank
            )
            procs.append(proc)
            engines.append(proc)
            followers.append([])
            if settings.enable_dp_attention:
                continue  # each dp rank attends alone: no TP followers
            if init_addr is not None and settings.pp_size > 1:
                followers[-1] = start_stage_processes(rs, init_addr)
                procs.extend(followers[-1])
                logger.info(
                    "pipeline parallel: %d stages x %d TP ranks, rendezvous %s; stage processes %s",
                    settings.pp_size,
                    settings.tp_size,
                    init_addr,
                    [p.pid for p in followers[-1]],
                )
            elif init_addr is not None:
                followers[-1] = start_follower_processes(rs, init_addr)
                procs.extend(followers[-1])
                logger.info(
                    "tensor parallel%s: %d ranks over %d node(s), rendezvous %s; "
                    "local followers %s",
                    f" (dp rank {dp_rank})" if settings.dp_size > 1 else "",
                    settings.tp_size,
                    settings.nnodes,
                    init_addr,
                    [p.pid for p in followers[-1]],
                )
        client = make_dp_client(
            replicas,
            settings.load_balance_method,
            settings.dp_balance_abs_threshold,
            route_by_room=settings.disaggregation_mode == "prefill",
        )
        if settings.dp_size > 1:
            logger.info(
                "data parallel: %d replicas (engine pids %s), %s",
                settings.dp_size,
                [p.pid for p in engines],
                settings.load_balance_method,
            )
        logger.info("engine process %s started; loading the model", engines[0].pid)
        t0 = time.monotonic()
        # The tokenizer and the sampling defaults load here while the engine loads there.
        tokenizer_load = asyncio.ensure_future(asyncio.to_thread(_load_tokenizer, settings))
        defaults_load = asyncio.ensure_future(asyncio.to_thread(_sampling_defaults, settings))
        try:
            ready = await wait_replicas_ready(replicas, engines, followers)
        except EngineStartupError as exc:
            for load in (tokenizer_load, defaults_load):  # their own errors say the same again
                load.cancel()
                load.add_done_callback(_consume_error)
            raise SystemExit(f"pdcore serve: the engine failed to start: {exc}") from None
        logger.info("engine ready in %.1fs", time.monotonic() - t0)
        if ports:
            bootstrap = _start_dp_bootstrap(settings, ports)
        tokenizer = await tokenizer_load
        defaults = await defaults_load
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
            http=guarded_h11(settings.http_header_timeout),
            timeout_keep_alive=int(settings.timeout_keep_alive) or 1,
            h11_max_incomplete_event_size=64 * 1024,  # request line + headers
        )
        logger.info("serving %s on http://%s:%d", state.model_name, settings.host, settings.port)
        server = uvicorn.Server(config)
        watchdog = None
        if settings.tp_size > 1 or settings.pp_size > 1:
            watchdog = asyncio.create_task(_exit_when_dead(client, server))
        await server.serve()
        if watchdog is not None:
            watchdog.cancel()
        if settings.tp_size > 1 and not client.alive:
            raise SystemExit(f"pdcore serve: tensor-parallel engine failed: {client.dead_reason}")
        if settings.pp_size > 1 and not client.alive:
            raise SystemExit(f"pdcore serve: pipeline-parallel engine failed: {client.dead_reason}")
    finally:
        if bootstrap is not None:
            bootstrap.close()
        for replica in replicas:
            replica.close()
        for p in procs:  # rank 0 first: it tells the followers to stop
            stop_engine_process(p)


def _start_dp_bootstrap(settings: ServerSettings, ports: list[int]) -> BootstrapServer:
    """The one bootstrap server of a PD prefill with --dp-size (see the module docstring)."""
    auth = ControlAuth(settings.disaggregation_auth_token)
    routes = replica_routes(
        bind_address(settings.host), ports, settings.disaggregation_heartbeat_interval, auth
    )
    try:
        server = BootstrapServer(
            settings.host, settings.disaggregation_bootstrap_port, routes, auth
        )
    except BootstrapError as exc:
        raise SystemExit(f"pdcore serve: {exc}") from None
    logger.info(
        "PD bootstrap server on %s:%d answers for %d dp ranks (their own servers: ports %s)",
        settings.host,
        server.port,
        len(ports),
        ports,
    )
    return server


async def _exit_when_dead(client: DataParallelClient, server: uvicorn.Server) -> None:
    """TP: once a rank is gone (with --dp-size: once every replica lost one), answer 503
    for DEAD_EXIT_S, then stop serving."""
    await client.wait_dead()
    await asyncio.sleep(DEAD_EXIT_S)
    logger.error("a TP rank is gone (%s); exiting", client.dead_reason)
    server.should_exit = True


def _consume_error(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _load_tokenizer(settings: ServerSettings) -> Any:
    from pdcore.model.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(settings.model_path, settings.tokenizer_path)


def _sampling_defaults(settings: ServerSettings) -> GenerationDefaults:
    from pdcore.model.generation_defaults import sampling_defaults

    defaults = sampling_defaults(settings.sampling_defaults, settings.model_path)
    logger.info("sampling defaults %s from %s", defaults.params, defaults.source)
    return defaults


if __name__ == "__main__":  # python -m pdcore.server.launch [pdcore serve flags]
    from pdcore.settings import parse_serve_args

    run_server(parse_serve_args(sys.argv[1:]))
