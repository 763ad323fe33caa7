"""`pdcore router --router-processes N` (N > 1): a supervisor and N router processes.

The supervisor checks the ports, waits for the workers once (--worker-startup-timeout-secs),
binds N listening sockets on --host:--port with SO_REUSEPORT (and N on --prometheus-port),
makes the shared flow-control memory and a PROMETHEUS_MULTIPROC_DIR, and starts the router
processes with multiprocessing's spawn (never fork: a clean interpreter, and still no
torch). Each process serves the whole app on its socket; the kernel spreads connections
over the sockets. The supervisor then

- relays worker registrations: one at a time, numbered here so ids match everywhere,
  applied by every process before the one that received it answers (cluster.py);
- on SIGTERM or SIGINT stops every process (each with --shutdown-grace-period-secs for
  its requests in flight) and exits 0;
- when a router process dies, stops the others and exits 1 naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import values
from prometheus_client.multiprocess import mark_process_dead

from pdcore.router.cluster import LINE_LIMIT, ChildSpec, encode
from pdcore.router.launch import (
    _auth,
    _client,
    _event_loop_runner,
    _serve,
    _Terminate,
    setup_logging,
    stop_on_signals,
    wait_for_workers,
)
from pdcore.router.settings import RouterSettings
from pdcore.router.shared_admission import SharedSlots
from pdcore.router.workers import WorkerExists, WorkerPool

logger = logging.getLogger("pdcore.router")

BACKLOG = 2048  # uvicorn's default
_STOP_EXTRA_S = 10.0  # beyond the grace period, before a router process is killed


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on host:port (one per address `host` resolves to, as asyncio's
    create_server binds them) with SO_REUSEPORT, so every router process can have its own;
    exits with a message when the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SystemExit(f"pdcore router: cannot resolve --host {host!r}: {exc}") from None
    out: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    for family, kind, proto, _, addr in infos:
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            for s in out:
                s.close()
            raise SystemExit(
                f"pdcore router: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        out.append(sock)
    return out


def child_main(settings: RouterSettings, spec: ChildSpec) -> None:
    """A router process (the target multiprocessing spawns)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = spec.metrics_dir
    values.ValueClass = values.get_value_class()  # every metric of this process in the files
    setup_logging(settings, f"router {spec.index}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    with contextlib.suppress(KeyboardInterrupt, _Terminate):  # a graceful stop: status 0
        _event_loop_runner()(_serve(settings, spec))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminate()


@dataclass(eq=False)
class _Child:
    index: int
    proc: BaseProcess
    sock: socket.socket  # the supervisor's end of the link
    writer: asyncio.StreamWriter | None = None
    ready: bool = False
    exit_message: str | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def send(self, message: dict[str, Any]) -> bool:
        if self.writer is None or self.writer.is_closing():
            return False
        self.writer.write(encode(message))
        return True


def _exit_description(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """The supervisor's event loop: the links, the registrations, the children's fate."""

    def __init__(self, settings: RouterSettings, children: list[_Child], metrics_dir: str):
        self.settings = settings
        self.children = children
        self.metrics_dir = metrics_dir
        self.registry = WorkerPool(settings)  # ids and duplicates, as every process has them
        for p in settings.prefill:
            self.registry.add(p.url, "prefill", p.bootstrap_port)
        for url in settings.decode:
            self.registry.add(url, "decode")
        self._op_ids = itertools.count(1)
        self._acks: dict[tuple[int, int], asyncio.Future[dict[str, Any]]] = {}
        self._stopping = False
        self._failed: asyncio.Future[str] | None = None
        self._all_ready: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self.status = 0  # the exit status, once `run` returns

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._failed = loop.create_future()
        self._all_ready = asyncio.Event()
        self._lock = asyncio.Lock()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for child in self.children:
            reader, child.writer = await asyncio.open_unix_connection(
                sock=child.sock, limit=LINE_LIMIT
            )
            child.tasks.append(asyncio.create_task(self._read(child, reader)))
            loop.add_reader(child.proc.sentinel, self._exited, child)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        ready: asyncio.Future[Any] = asyncio.ensure_future(self._all_ready.wait())
        first = {stopped, ready, self._failed}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and not self._failed.done():
            s = self.settings
            logger.info(
                "PD router on http://%s:%d: prefill %s; decode %s; policies prefill=%s "
                "decode=%s; %d router processes (pids %s)",
                s.host,
                s.port,
                ", ".join(f"{p.url} (bootstrap port {p.bootstrap_port})" for p in s.prefill),
                ", ".join(s.decode),
                s.role_policy("prefill"),
                s.role_policy("decode"),
                len(self.children),
                ", ".join(str(c.proc.pid) for c in self.children),
            )
            then: set[asyncio.Future[Any]] = {stopped, self._failed}
            await asyncio.wait(then, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
        status = 0
        if self._failed.done():
            logger.error("%s; stopping the other router processes", self._failed.result())
            status = 1
        else:
            logger.info("stopping %d router processes", len(self.children))
        await self.stop_children()
        for child in self.children:
            for task in child.tasks:
                task.cancel()
        if status:
            logger.error("pdcore router: %s", self._failed.result())
        self.status = status

    def _exited(self, child: _Child) -> None:
        asyncio.get_running_loop().remove_reader(child.proc.sentinel)
        child.proc.join(5)
        child.exit_message = (
            f"router process {child.index} (pid {child.proc.pid}) "
            f"{_exit_description(child.proc.exitcode)}"
        )
        with contextlib.suppress(OSError):
            mark_process_dead(child.proc.pid, self.metrics_dir)
        for (_, index), future in self._acks.items():
            if index == child.index and not future.done():
                future.set_result({"error": child.exit_message})
        if not self._stopping and self._failed is not None and not self._failed.done():
            self._failed.set_result(child.exit_message)

    async def stop_children(self) -> None:
        """SIGTERM to every router process; SIGKILL to those still there after the grace
        period (and some)."""
        self._stopping = True
        for child in self.children:
            if child.proc.is_alive():
                with contextlib.suppress(OSError):
                    child.proc.terminate()
        deadline = time.monotonic() + self.settings.shutdown_grace_period_secs + _STOP_EXTRA_S
        while any(c.proc.is_alive() for c in self.children) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for child in self.children:
            if child.proc.is_alive():
                logger.warning("router process %d did not stop: killing it", child.index)
                child.proc.kill()
            child.proc.join(5)

    async def _read(self, child: _Child, reader: asyncio.StreamReader) -> None:
        assert self._all_ready is not None
        try:
            while line := await reader.readline():
                message = json.loads(line)
                kind = message.get("type")
                if kind == "ready":
                    child.ready = True
                    if all(c.ready for c in self.children):
                        self._all_ready.set()
                elif kind == "change":
                    task = asyncio.create_task(self._change(child, message))
                    child.tasks.append(task)
                    task.add_done_callback(child.tasks.remove)
                elif kind == "applied":
                    future = self._acks.get((message.get("op_id"), child.index))
                    if future is not None and not future.done():
                        future.set_result(message)
        except (OSError, ValueError) as exc:
            logger.error("router process %d: the link broke: %s", child.index, exc)

    async def _change(self, origin: _Child, message: dict[str, Any]) -> None:
        """One registration change: numbered here, applied by every router process, then
        answered to the process that received it."""
        assert self._lock is not None
        seq = message.get("seq")
        try:
            async with self._lock:
                reply = await self._apply_everywhere(origin, message)
        except Exception as exc:  # noqa: BLE001 - the asking process gets it as an error
            logger.exception("a worker change failed")
            reply = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
        origin.send({"type": "reply", "seq": seq, **reply})

    async def _apply_everywhere(self, origin: _Child, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        op_id = next(self._op_ids)
        if op == "add":
            url, role, port = message["url"], message["role"], message.get("bootstrap_port")
            try:
                member = self.registry.add(url, role, port)
            except WorkerExists as exc:
                return {"status": "exists", "message": str(exc)}
            apply = {
                "type": "apply",
                "op_id": op_id,
                "op": "add",
                "id": member.worker.worker_id,
                "url": url,
                "role": role,
                "bootstrap_port": port,
                "headers": message.get("headers") or {},
            }
        elif op == "remove":
            found = self.registry.get(str(message.get("id")))
            if found is None:
                return {"status": "not_found"}
            self.registry.remove(found)
            apply = {"type": "apply", "op_id": op_id, "op": "remove", "id": found.worker.worker_id}
        else:
            return {"status": "error", "message": f"unknown change {op!r}"}
        acks = await self._broadcast(op_id, apply)
        errors = [f"router process {i}: {a['error']}" for i, a in acks.items() if a.get("error")]
        if errors:
            return {"status": "error", "message": "; ".join(errors)}
        return {"status": "ok", "detail": acks[origin.index].get("detail")}

    async def _broadcast(self, op_id: int, message: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Send `message` to every router process and wait for each one's ack (an error
        ack for a process that is gone or too slow)."""
        loop = asyncio.get_running_loop()
        waits: dict[int, asyncio.Future[dict[str, Any]]] = {}
        for child in self.children:
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            if child.exit_message is not None or not child.send(message):
                future.set_result({"error": child.exit_message or "its link is closed"})
            waits[child.index] = self._acks[(op_id, child.index)] = future
        timeout = self.settings.health_check_timeout_secs + _STOP_EXTRA_S
        try:
            await asyncio.wait(waits.values(), timeout=timeout)
        finally:
            for index in waits:
                self._acks.pop((op_id, index), None)
        return {
            index: f.result() if f.done() else {"error": f"no answer within {timeout:g}s"}
            for index, f in waits.items()
        }


def run_supervisor(settings: RouterSettings) -> int:
    """Start settings.router_processes router processes and watch them; the exit status
    (0 after SIGTERM/SIGINT, 1 when a router process died). The ports were checked."""
    n = settings.router_processes
    ctx = multiprocessing.get_context("spawn")
    metrics_dir = tempfile.mkdtemp(prefix="pdcore-router-metrics-")
    saved_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the children start with it set
    children: list[_Child] = []
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not settings.disable_health_check:
            _event_loop_runner()(stop_on_signals(_wait_for_workers(settings)))
        rate = settings.rate_limit_tokens_per_second
        slots = SharedSlots(ctx, max(1.0, rate) if rate else 0.0)
        for i in range(n):
            sockets = listen_sockets(settings.host, settings.port)
            metrics_sockets = []
            if settings.prometheus_port is not None:
                metrics_sockets = listen_sockets(settings.prometheus_host, settings.prometheus_port)
            mine, theirs = socket.socketpair()
            spec = ChildSpec(i, sockets, metrics_sockets, theirs, slots, metrics_dir)
            proc = ctx.Process(target=child_main, args=(settings, spec), name=f"pdcore-router-{i}")
            proc.start()
            for sock in [*sockets, *metrics_sockets, theirs]:
                sock.close()  # the child has its copies now
            children.append(_Child(i, proc, mine))
        supervisor = Supervisor(settings, children, metrics_dir)
        _event_loop_runner()(supervisor.run())  # its own SIGTERM and SIGINT handlers
        return supervisor.status
    except (KeyboardInterrupt, _Terminate):
        logger.info("router stopped")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        for child in children:
            if child.proc.is_alive():
                child.proc.kill()
            child.proc.join(5)
            child.sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if saved_env is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved_env


async def _wait_for_workers(settings: RouterSettings) -> None:
    """Every worker healthy before any router process starts (the processes do not wait)."""
    pool = WorkerPool(settings)
    for p in settings.prefill:
        pool.add(p.url, "prefill", p.bootstrap_port)
    for url in settings.decode:
        pool.add(url, "decode")
    async with _client(settings) as client:
        await wait_for_workers(client, [m.worker for m in pool], settings, _auth(settings))
