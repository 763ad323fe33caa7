"""The engine process: owns the EngineCore and runs its loop, fed by the HTTP frontend over zmq.

The model lives in its own process so tokenizing, streaming and HTTP never steal time from
the forward passes, and so a crash in the engine cannot take the frontend with it (the
frontend then answers 503). Messages are the typed classes of engine_messages.py, sent as
msgpack maps (never pickle), one list of them per send, in both directions:

frontend -> engine: Generate(rid, input_ids, sampling_params, return_logprob, bootstrap)
                    Abort(rid)
                    Control(id, op: "ping"|"get_load"|"flush_cache"|"server_info"|"stats"|"metrics"
                                    |"kv_cache_blocks")
engine -> frontend: Ready(model_name, max_context_len, server_info)   (once)
                    StartupError(message)                              (then exit)
                    Output(RequestOutput)
                    Error(rid, message, status)
                    ControlReply(id, result)
                    Fatal(message)                                     (then exit)

A message that does not decode is logged and dropped; a malformed Generate is answered with
an Error (400) so its waiter does not hang. The loop never dies of a bad message.

With tensor parallelism (--tp-size N) this process is TP rank 0 (the driver) and the other
ranks of this node are processes running `follower_main`, started beside it by
`pdcore.server.spawn.start_follower_processes`; ranks on other nodes are started there by `pdcore serve
--node-rank K`. A rank that dies fails the others' next collective (or the heartbeat rank 0
sends while idle), so the group never hangs silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

import zmq

from pdcore.disagg.pipelines import pipeline_factory
from pdcore.disagg.rank_channel import RankAgent
from pdcore.disagg.tp_plan import TPPlace
from pdcore.engine.core import EngineCore
from pdcore.engine.pipeline import BootstrapInfo
from pdcore.engine.request import RequestError, RequestOutput
from pdcore.engine.sampling_params import SamplingParams, SamplingParamsError
from pdcore.engine.setup import pick_device
from pdcore.engine.tp_worker import FollowerWorker
from pdcore.model.dist_addr import bind_address
from pdcore.model.parallel import HeadShard, TPGroup, init_tp_group
from pdcore.model.pipeline_split import PipelineGrid
from pdcore.server.engine_messages import (
    Abort,
    Control,
    ControlReply,
    EngineMessage,
    Error,
    Fatal,
    FrontendMessage,
    Generate,
    MessageError,
    Output,
    Ready,
    StartupError,
    decode_request,
    pack,
    unpack,
)
from pdcore.settings import ServerSettings

logger = logging.getLogger("pdcore.engine_process")

IDLE_POLL_MS = 20  # how long an idle engine blocks waiting for a request
WAITING_POLL_MS = 1  # with requests only waiting on the network
PARENT_CHECK_EVERY = 50  # idle iterations between checks that the frontend is still alive


def _join_tp_group(settings: ServerSettings, rank: int, init_addr: str | None) -> TPGroup:
    """This process's TP group (size 1 without TP): its device (cuda:base+local rank on a
    GPU), torch's thread count (a CPU node's cores shared between its ranks), rendezvous."""
    import torch

    local_rank = rank % settings.tp_ranks_per_node
    threads = settings.cpu_threads or max((os.cpu_count() or 1) // settings.tp_ranks_per_node, 1)
    if settings.tp_size == 1:
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        return TPGroup()
    torch.set_num_threads(threads)
    device = pick_device(settings.device, settings.base_gpu_id + local_rank)
    if init_addr is None:
        raise ValueError("tensor parallel needs a rendezvous address")
    return init_tp_group(
        rank,
        settings.tp_size,
        init_addr,
        bind_address(settings.host),
        settings.dist_timeout,
        device,
    )


def follower_main(
    settings: ServerSettings, rank: int, init_addr: str, parent_pid: int | None = None
) -> None:
    """Entry point of a TP follower process: join the group, load the shard, run batches
    until rank 0 says stop (exit 0) or the group fails (exit 1)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s [tp{rank}] %(levelname)s %(name)s: %(message)s",
    )
    tp: TPGroup | None = None
    agent: RankAgent | None = None
    code = 0
    try:
        tp = _join_tp_group(settings, rank, init_addr)
        worker = FollowerWorker(settings.engine_config(), tp)
        agent = _pd_agent(settings, worker, tp)
        logger.info("TP rank %d ready", rank)
        worker.run()
    except Exception as exc:
        logger.error("TP rank %d failed: %s: %s", rank, type(exc).__name__, exc)
        logger.debug("%s", traceback.format_exc())
        code = 1
    finally:
        if tp is not None:
            tp.close()  # first: rank 0 waits for every rank to leave the group
        if agent is not None:
            agent.close()
    exit_process(code)


def exit_process(code: int) -> NoReturn:
    """End an engine-side process now, once everything that matters is closed, skipping
    the interpreter's teardown: with torch, gloo and a model loaded, its final garbage
    collection took 4-7 s -- past the frontend's 5 s SIGTERM grace, so every stop ended in
    a SIGKILL and a warning, and every server stop cost seconds."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _pd_agent(settings: ServerSettings, worker: FollowerWorker, tp: TPGroup) -> RankAgent | None:
    """On a PD side every TP rank moves its own KV heads, so a follower runs a transfer
    agent (its own backend, its pool registered) that rank 0's control plane drives."""
    mode = settings.disaggregation_mode
    if mode == "null":
        return None
    config = worker.rank.resolved.config
    shard = HeadShard.of(config, tp.size, tp.rank)
    place = TPPlace(tp.rank, tp.size, shard.kv_head_start, config.num_kv_heads)
    return RankAgent(mode, settings, worker.rank.runner.pool, settings.host, place, tp.store)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the frontend dies, even by SIGKILL (best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - the getppid() check below still works
        pass


class _Shutdown(BaseException):
    """Raised by our SIGTERM handler so the engine loop unwinds into `core.close()`."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Shutdown()


def build_engine(
    settings: ServerSettings,
    tp: TPGroup | None = None,
    pp: PipelineGrid | None = None,
    ep_group: TPGroup | None = None,
) -> EngineCore:
    """The engine of `pdcore serve`: the model, plus the pipeline of its PD mode; with
    --pp-size, world rank 0 of the pipeline grid `pp`; with --enable-dp-attention, dp rank
    `ep_group.rank` of the group its MoE layers split experts over."""
    return EngineCore(
        settings.engine_config(),
        pipeline_factory(settings.disaggregation_mode, settings, settings.host),
        tp,
        pp,
        ep_group,
    )


def _build_dp_attention_engine(
    settings: ServerSettings, dp_rank: int, init_addr: str | None
) -> EngineCore:
    """--enable-dp-attention: this dp rank attends alone (a TP group of its own, size 1)
    and joins the group of all dp ranks (rendezvous at `init_addr`) for the MoE layers."""
    import torch

    threads = settings.cpu_threads or max((os.cpu_count() or 1) // settings.dp_size, 1)
    torch.set_num_threads(threads)
    device = pick_device(settings.device, settings.base_gpu_id)
    if init_addr is None:
        raise ValueError("--enable-dp-attention needs a rendezvous address")
    ep_group = init_tp_group(
        dp_rank,
        settings.tp_size,
        init_addr,
        bind_address(settings.host),
        settings.dist_timeout,
        device,
    )
    try:
        return build_engine(settings, TPGroup(device=device), None, ep_group)
    except BaseException:
        ep_group.close()
        raise


def engine_main(
    settings: ServerSettings,
    request_addr: str,
    output_addr: str,
    parent_pid: int | None = None,
    init_addr: str | None = None,
    dp_rank: int = 0,
) -> None:
    """Entry point of the engine process: build the core, announce readiness, run the loop."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the frontend, which stops us
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s [engine] %(levelname)s %(name)s: %(message)s",
    )
    zctx = zmq.Context()
    pull = zctx.socket(zmq.PULL)
    pull.connect(request_addr)
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(output_addr)
    try:
        if settings.pp_size > 1:  # pipeline grid rank 0 (pdcore.server.pp_process)
            from pdcore.server.pp_process import join_pp_grid

            core = build_engine(settings, None, join_pp_grid(settings, 0, init_addr))
        elif settings.enable_dp_attention:
            core = _build_dp_attention_engine(settings, dp_rank, init_addr)
        else:
            core = build_engine(settings, _join_tp_group(settings, 0, init_addr))
    except BaseException as exc:
        logger.error("engine failed to start:\n%s", traceback.format_exc())
        push.send(pack([StartupError(f"{type(exc).__name__}: {exc}")]))
        push.close()
        zctx.term()
        exit_process(1)
    push.send(pack([Ready(core.model_name, core.max_context_len, core.server_info())]))
    signal.signal(signal.SIGTERM, _on_sigterm)  # the frontend stops us: shut down cleanly
    code = 0
    try:
        EngineLoop(core, pull, push, parent_pid).run()
    except _Shutdown:
        logger.info("engine shutting down")
    except Exception as exc:
        logger.error("engine loop crashed:\n%s", traceback.format_exc())
        push.send(pack([Fatal(f"{type(exc).__name__}: {exc}")]))
        code = 1
    finally:
        # PD: fail open rooms and tell the peers now (not at their heartbeat timeout); write
        # a profile that was still recording. Bounded: the frontend SIGKILLs us after 5 s.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        core.close()
    push.close(linger=1000)  # what was sent (a Fatal) still reaches the frontend
    pull.close(linger=0)
    zctx.term()
    exit_process(code)


class EngineLoop:
    """Drain requests without blocking while there is work, step, send what the step produced."""

    def __init__(
        self, core: EngineCore, pull: zmq.Socket, push: zmq.Socket, parent_pid: int | None
    ) -> None:
        self.core = core
        self.pull = pull
        self.push = push
        self.parent_pid = parent_pid
        self.user_errors: tuple[type[Exception], ...] = (RequestError, SamplingParamsError)
        self.outbox: list[EngineMessage] = []

    def run(self) -> None:
        idle_iterations = 0
        while True:
            if not self.core.has_work():
                timeout = 0 if self.core.peers_busy else IDLE_POLL_MS
            elif self.core.last_step_ran_forward:
                timeout = 0
            else:  # only waiting on network (PD handshakes, transfers): don't spin a core
                timeout = WAITING_POLL_MS
            if self.pull.poll(timeout):
                self._drain()
            if self.core.has_work():
                idle_iterations = 0
                for out in self.core.step(self._send_now):
                    self.outbox.append(Output(out))
            else:
                self.core.keepalive()  # TP: followers hear from rank 0 at least once a second
                idle_iterations += 1
                if idle_iterations % PARENT_CHECK_EVERY == 0 and self._orphaned():
                    logger.info("frontend process is gone; engine exiting")
                    return
            if self.outbox:
                self.push.send(pack(self.outbox))
                self.outbox = []

    def _send_now(self, outputs: list[RequestOutput]) -> None:
        """Outputs ready before a forward pass: flush them (and anything queued) at once."""
        self.outbox.extend(Output(out) for out in outputs)
        self.push.send(pack(self.outbox))
        self.outbox = []

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _drain(self) -> None:
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                raws = unpack(data)
            except MessageError as exc:
                logger.error("dropping a frame from the frontend: %s", exc)
                continue
            for raw in raws:
                try:
                    msg = decode_request(raw)
                except MessageError as exc:
                    self._reject(exc)
                else:
                    self._handle(msg)

    def _reject(self, exc: MessageError) -> None:
        """A message that does not decode: say so, and fail the request it opened (if any)."""
        logger.error("dropping a malformed message from the frontend: %s", exc)
        if exc.rid is not None:
            self.outbox.append(Error(exc.rid, f"malformed request: {exc}", 400))

    def _handle(self, msg: FrontendMessage) -> None:
        if isinstance(msg, Generate):
            self._add_request(msg)
        elif isinstance(msg, Abort):
            self.core.abort_request(msg.rid)
        else:
            self._run_control(msg)

    def _run_control(self, msg: Control) -> None:
        try:
            result = self._control(msg.op)
        except Exception as exc:
            logger.error("control %r failed:\n%s", msg.op, traceback.format_exc())
            result = {"error": f"{type(exc).__name__}: {exc}"}
        self.outbox.append(ControlReply(msg.id, result))

    def _add_request(self, msg: Generate) -> None:
        rid = msg.rid
        try:
            params = SamplingParams.from_dict(msg.sampling_params)
            self.core.add_request(
                rid,
                list(msg.input_ids),
                params,
                msg.return_logprob,
                bootstrap=BootstrapInfo.from_message(msg.bootstrap),
            )
        except self.user_errors as exc:
            self.outbox.append(Error(rid, str(exc), 400))
        except Exception as exc:
            logger.error("add_request(%s) failed:\n%s", rid, traceback.format_exc())
            self.outbox.append(Error(rid, f"internal error: {exc}", 500))

    def _control(self, op: str) -> Any:
        core = self.core
        if op == "ping":
            return "pong"
        if op == "get_load":
            return core.get_load()
        if op == "flush_cache":
            return bool(core.flush_cache())
        if op == "server_info":
            return core.server_info()
        if op == "stats":
            return core.get_stats()
        if op == "kv_cache_blocks":
            return core.kv_cache_blocks()
        if op == "metrics":  # like stats, and hands out the latency samples (once)
            return core.get_stats(drain_samples=True)
        return {"error": f"unknown control op {op!r}"}
