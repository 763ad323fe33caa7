"""`run_server`: start the engine process, wait until it is ready, serve HTTP, clean up.

The port is checked before the engine starts, so a busy port fails in a second instead of
after the model loaded. Whatever ends the server -- SIGTERM, Ctrl-C, an engine that fails
to start, an exception -- the engine process is stopped and reaped and the ipc directory
removed: no orphan keeps the KV pool or the GPU.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from pdcore.server.app import build_app
from pdcore.server.engine_client import EngineClient, EngineStartupError
from pdcore.server.engine_process import start_engine_process, stop_engine_process
from pdcore.server.generation import ServerState
from pdcore.server.metrics import Metrics
from pdcore.settings import ServerSettings
from pdcore.web.errors import check_port

logger = logging.getLogger("pdcore.server")

GRACEFUL_SHUTDOWN_S = 5


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
    check_port("pdcore serve", settings.host, settings.port)
    ipc_dir = tempfile.mkdtemp(prefix="pdcore-ipc-")
    procs: list[BaseProcess] = []
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        asyncio.run(_serve(settings, ipc_dir, procs))
    except (KeyboardInterrupt, _Terminate):
        logger.info("shutting down")
    finally:
        for proc in procs:  # normally already stopped by _serve
            stop_engine_process(proc)
        shutil.rmtree(ipc_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


async def _serve(
    settings: ServerSettings,
    ipc_dir: str,
    procs: list[BaseProcess],
) -> None:
    client = EngineClient(ipc_dir)
    proc = start_engine_process(settings, client.request_addr, client.output_addr)
    procs.append(proc)
    try:
        logger.info("engine process %d started; loading the model", proc.pid)
        t0 = time.monotonic()
        try:
            ready = await client.wait_ready(proc)
        except EngineStartupError as exc:
            raise SystemExit(f"pdcore serve: the engine failed to start: {exc}") from None
        logger.info("engine ready in %.1fs; loading the tokenizer", time.monotonic() - t0)
        tokenizer = await asyncio.to_thread(_load_tokenizer, settings)
        state = ServerState(
            settings=settings,
            client=client,
            tokenizer=tokenizer,
            model_name=ready.model_name,
            max_context_len=ready.max_context_len,
            engine_info=dict(ready.server_info),
            metrics=Metrics(ready.model_name),
            vocab_size=len(tokenizer),
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
        await uvicorn.Server(config).serve()
    finally:
        client.close()
        stop_engine_process(proc)


def _load_tokenizer(settings: ServerSettings) -> Any:
    from pdcore.model.tokenizer import load_tokenizer

    return load_tokenizer(settings.model_path, settings.tokenizer_path)


if __name__ == "__main__":  # python -m pdcore.server.launch [pdcore serve flags]
    from pdcore.settings import parse_serve_args

    run_server(parse_serve_args(sys.argv[1:]))
