"""The frontend's side of the zmq link to the engine process.

Requests go out on a plain (sync) PUSH socket with an unlimited send queue, so sending --
including the abort sent from a `finally` while a task is being cancelled -- never awaits.
Outputs come back on an asyncio PULL socket read by one task that routes each message to
the `Stream` of its request id. The engine process's sentinel is watched by the event loop:
when the engine dies every waiting request fails at once with `EngineDeadError` instead of
hanging, and the server turns unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import zmq
import zmq.asyncio

from pdcore.engine.request import RequestOutput
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
    decode_reply,
    pack,
    unpack,
)

logger = logging.getLogger("pdcore.server")


class EngineDeadError(RuntimeError):
    """The engine process is gone; the request cannot be served (HTTP 503)."""


class EngineStartupError(RuntimeError):
    """The engine process failed while loading; the message says why."""


class RequestRejected(Exception):
    """The engine refused a request (empty/too long prompt, duplicate id, ...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Dead:
    """Queued to every open stream when the engine dies."""


_DEAD = _Dead()


class Stream:
    """The outputs of a group of requests (a batch), merged in arrival order."""

    def __init__(self, client: EngineClient, rids: list[str]) -> None:
        self._client = client
        self.rids = rids
        self.index = {rid: i for i, rid in enumerate(rids)}
        self.unfinished = set(rids)
        self.queue: asyncio.Queue[Output | Error | _Dead] = asyncio.Queue()

    @property
    def done(self) -> bool:
        return not self.unfinished

    async def next(self) -> tuple[int, RequestOutput]:
        """The next output as (index in the batch, output); raises when the engine refused
        the request or died."""
        item = await self.queue.get()
        if isinstance(item, _Dead):
            raise EngineDeadError(self._client.dead_reason or "engine process is gone")
        if isinstance(item, Error):
            self.unfinished.discard(item.rid)
            raise RequestRejected(item.message, item.status)
        out = item.output
        if out.finished:
            self.unfinished.discard(out.rid)
        return self.index[out.rid], out

    def close(self) -> None:
        """Abort what has not finished (the client went away) and stop routing to us."""
        self._client._release(self)


class EngineClient:
    """Owns both sockets (bound here; the engine connects) and the table of live requests."""

    def __init__(self, ipc_dir: str, label: str = "engine process") -> None:
        self.label = label  # names this engine in logs and errors ("dp rank 1 engine")
        self.request_addr = f"ipc://{os.path.join(ipc_dir, 'requests')}"
        self.output_addr = f"ipc://{os.path.join(ipc_dir, 'outputs')}"
        self._sync_ctx = zmq.Context()
        self._push = self._sync_ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(self.request_addr)
        self._async_ctx = zmq.asyncio.Context()
        self._pull = self._async_ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.output_addr)
        self._streams: dict[str, Stream] = {}
        self._controls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._proc: BaseProcess | None = None
        self._watched: list[BaseProcess] = []
        self._reader: asyncio.Task[None] | None = None
        self._dead = asyncio.Event()
        self.dead_reason: str | None = None

    @property
    def alive(self) -> bool:
        return not self._dead.is_set()

    async def wait_ready(self, proc: BaseProcess, followers: Sequence[BaseProcess] = ()) -> Ready:
        """Wait for the engine's "ready" message; raise EngineStartupError if it fails or dies.
        `followers`: this node's other TP rank processes, watched like the engine itself --
        any of them exiting marks the engine dead (the TP group cannot go on without it)."""
        self._proc = proc
        loop = asyncio.get_running_loop()
        self._watched = [proc, *followers]
        loop.add_reader(proc.sentinel, self._on_engine_exit)
        for rank, follower in enumerate(followers, start=1):
            loop.add_reader(follower.sentinel, self._on_follower_exit, follower, rank)
        while True:
            recv = asyncio.ensure_future(self._pull.recv())
            died = asyncio.ensure_future(self._dead.wait())
            await asyncio.wait({recv, died}, return_when=asyncio.FIRST_COMPLETED)
            died.cancel()
            if not recv.done():
                # Dead: its last words may still be in flight.
                done, _ = await asyncio.wait({recv}, timeout=1.0)
                if not done:
                    recv.cancel()
                    raise EngineStartupError(self.dead_reason or "engine process exited")
            try:
                messages = [decode_reply(raw) for raw in unpack(recv.result())]
            except MessageError as exc:
                raise EngineStartupError(f"malformed message from the engine: {exc}") from exc
            for msg in messages:
                if isinstance(msg, Ready):
                    self._reader = asyncio.create_task(self._read_loop())
                    return msg
                if isinstance(msg, StartupError):
                    raise EngineStartupError(msg.message)

    def _on_engine_exit(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._proc is not None
        loop.remove_reader(self._proc.sentinel)
        self._proc.join(0)
        self._mark_dead(f"{self.label} exited with code {self._proc.exitcode}")

    def _on_follower_exit(self, proc: BaseProcess, rank: int) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(0)
        if proc.name.startswith("pdcore-pp"):  # a pipeline grid rank: pp1, or pp1-tp0
            what = f"pipeline rank {proc.name.removeprefix('pdcore-')}"
        else:
            what = f"TP rank {rank}"
        self._mark_dead(f"{what} (pid {proc.pid}) exited with code {proc.exitcode}")

    def _mark_dead(self, reason: str) -> None:
        if self._dead.is_set():
            return
        logger.error("%s; requests will fail with 503", reason)
        self.dead_reason = reason
        self._dead.set()
        for stream in self._streams.values():
            stream.queue.put_nowait(_DEAD)
        for fut in self._controls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._pull.recv()
                for raw in unpack(data):
                    self._dispatch(decode_reply(raw))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leave requests waiting on a reader that is gone
            logger.exception("engine output reader failed")
            self._mark_dead(f"engine output reader failed: {exc}")

    def _dispatch(self, msg: EngineMessage) -> None:
        if isinstance(msg, Output | Error):
            rid = msg.output.rid if isinstance(msg, Output) else msg.rid
            stream = self._streams.get(rid)
            if stream is not None:
                stream.queue.put_nowait(msg)
        elif isinstance(msg, ControlReply):
            fut = self._controls.get(msg.id)
            if fut is not None and not fut.done():
                fut.set_result(msg.result)
        elif isinstance(msg, Fatal):
            self._mark_dead(f"engine crashed: {msg.message}")

    def _send(self, messages: list[FrontendMessage]) -> None:
        if not self.alive:
            raise EngineDeadError(self.dead_reason or "engine process is gone")
        try:
            self._push.send(pack(messages), zmq.NOBLOCK)
        except zmq.Again as exc:  # no engine connected
            raise EngineDeadError("engine process is not connected") from exc

    def submit(self, jobs: list[Generate]) -> Stream:
        """Send a batch of requests to the engine; read their outputs from the Stream."""
        rids = [job.rid for job in jobs]
        for rid in rids:
            if rid in self._streams or rids.count(rid) > 1:
                raise RequestRejected(f"Duplicate request id {rid!r}", 400)
        stream = Stream(self, rids)
        self._send(list(jobs))
        for rid in rids:
            self._streams[rid] = stream
        return stream

    def _release(self, stream: Stream) -> None:
        unfinished = [rid for rid in stream.rids if rid in stream.unfinished]
        for rid in stream.rids:
            if self._streams.get(rid) is stream:
                del self._streams[rid]
        stream.unfinished.clear()
        if unfinished and self.alive:
            with contextlib.suppress(EngineDeadError):
                self._send([Abort(rid) for rid in unfinished])

    def abort(self, rid: str) -> None:
        """Ask the engine to abort `rid`; its waiter then sees finish_reason "abort"."""
        self._send([Abort(rid)])

    def live_rids(self) -> list[str]:
        return list(self._streams)

    async def control(self, op: str, timeout: float = 10.0) -> Any:
        """Run a control op in the engine and return its result (TimeoutError if slow)."""
        cid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._controls[cid] = fut
        try:
            self._send([Control(cid, op)])
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._controls.pop(cid, None)

    async def wait_dead(self) -> None:
        await self._dead.wait()

    def close(self) -> None:
        for proc in self._watched:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(proc.sentinel)
        if self._reader is not None:
            self._reader.cancel()
        self._push.close(0)
        self._pull.close(0)
        self._sync_ctx.term()
        self._async_ctx.term()
