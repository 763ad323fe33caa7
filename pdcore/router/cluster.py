"""A router process's side of `pdcore router --router-processes N` (N > 1).

Each router process serves the whole app on its own SO_REUSEPORT socket and talks to the
supervisor (supervisor.py) over a unix socket pair, in JSON lines -- nothing is pickled
after start-up. What crosses it:

- `{"type": "ready"}`: this process serves;
- `{"type": "change", "seq", "op": "add" | "remove", ...}`: a worker registration this
  process received; the supervisor numbers it, sends it to every process as
  `{"type": "apply", "op_id", "op", "id", ...}`, each process applies it (an added worker
  is probed once, as with one process) and answers `{"type": "applied", "op_id",
  "detail"}`; only then does the supervisor answer the asking process `{"type": "reply",
  "seq", "status": "ok" | "exists" | "not_found" | "error", "detail"?, "message"?}`. So
  when a client has its answer, every process has the change, and a worker has the same id
  everywhere.

A process whose link to the supervisor breaks (the supervisor is gone) stops serving.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdcore.router.pd import RouterState
from pdcore.router.shared_admission import SharedSlots
from pdcore.router.workers_api import add_member, remove_member
from pdcore.web.errors import ProtocolError

logger = logging.getLogger("pdcore.router")

# Most bytes of one message line (a worker's detail, a registration: a few hundred bytes).
LINE_LIMIT = 1 << 20


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


@dataclass
class ChildSpec:
    """What the supervisor hands a router process at its start (through multiprocessing's
    spawn, which passes the sockets and the shared memory)."""

    index: int
    sockets: list[socket.socket]  # the router's port, SO_REUSEPORT (one per address)
    metrics_sockets: list[socket.socket]  # --prometheus-port, likewise (or none)
    link: socket.socket  # this process's end of the pair to the supervisor
    slots: SharedSlots  # flow control's shared counts
    metrics_dir: str  # PROMETHEUS_MULTIPROC_DIR
    extra: dict[str, Any] = field(default_factory=dict)


class SupervisorLink:
    """This process's channel to the supervisor (see the module docstring)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.timeout_s = timeout_s  # longest wait for a registration to reach every process
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._state: RouterState | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self, state: RouterState, on_lost: Callable[[], None]) -> None:
        """Read the supervisor's messages from now on; `on_lost` runs if the link breaks."""
        self._state = state
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock, limit=LINE_LIMIT)
        self._reader_task = asyncio.create_task(self._read(reader, on_lost), name="link")

    def send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))

    def ready(self) -> None:
        self.send({"type": "ready", "pid": os.getpid()})

    async def change(
        self, op: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Have the supervisor apply a registration change in every process; its reply.
        Raises ProtocolError (503) when the change did not reach every process in time."""
        seq = next(self._seq)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        self.send({"type": "change", "seq": seq, **op, "headers": headers or {}})
        try:
            reply = await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            reply = {"status": "error", "message": f"no answer within {self.timeout_s:g}s"}
        finally:
            self._pending.pop(seq, None)
        if reply.get("status") == "error":
            raise ProtocolError(
                "The worker change did not reach every router process "
                f"(--router-processes): {reply.get('message')}",
                status=503,
                type="service_unavailable",
            )
        return reply

    async def _read(self, reader: asyncio.StreamReader, on_lost: Callable[[], None]) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                kind = message.get("type")
                if kind == "reply":
                    future = self._pending.get(message.get("seq"))
                    if future is not None and not future.done():
                        future.set_result(message)
                elif kind == "apply" and self._state is not None:
                    self._state.keep(asyncio.create_task(self._apply(message)))
        except (OSError, ValueError) as exc:  # a broken pipe or line: the link is gone
            logger.error("the link to the router supervisor broke: %s", exc)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_result({"status": "error", "message": "the supervisor is gone"})
            on_lost()

    async def _apply(self, message: dict[str, Any]) -> None:
        """Apply one change the supervisor sent, then acknowledge it with this process's
        detail of the worker."""
        state = self._state
        assert state is not None
        detail: dict[str, Any] | None = None
        error: str | None = None
        try:
            if message["op"] == "add":
                member = await add_member(
                    state,
                    message["url"],
                    message["role"],
                    message.get("bootstrap_port"),
                    message.get("headers") or {},
                    worker_id=message["id"],
                )
                detail = member.detail()
            elif message["op"] == "remove":
                found = state.pool.get(message["id"])
                if found is not None:
                    detail = remove_member(state, found)
        except Exception as exc:  # noqa: BLE001 - reported to the supervisor
            logger.exception("applying %s failed", message.get("op"))
            error = f"{type(exc).__name__}: {exc}"
        self.send({"type": "applied", "op_id": message["op_id"], "detail": detail, "error": error})
