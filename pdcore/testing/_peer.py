"""The receiving side of the conformance kit, run in its own process (multiprocessing spawn).

A separate process because a transfer backend is only tested honestly across an address
space: a backend that "works" inside one process may be copying through shared Python
state. The receiver registers a zeroed buffer of `chunks` equal chunks, hands its blob to
the parent, then drains notifications continuously. Each notification names a chunk
(payload `b"room:<chunk>:..."`), and the receiver hashes that chunk *the moment it sees the
notification* -- so the parent can tell "data arrived after its notification" apart from
"data never arrived" by comparing that hash with the final one.
"""

from __future__ import annotations

import hashlib
import importlib
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from pdcore.testing.report import CheckFailed

if TYPE_CHECKING:
    from pdcore.disagg.transfer import TransferBackend

CHUNK = 256 << 10
"""Bytes per chunk: one room writes into one chunk, so rooms never overlap."""
GRACE_S = 5.0
"""Slack on top of the backend's `timeout_s` before a wait counts as a hang."""


def chunk_of(payload: bytes) -> int | None:
    """The chunk a notification payload names, or None when it names none."""
    parts = payload.split(b":", 2)
    if len(parts) < 2 or parts[0] != b"room" or not parts[1].isdigit():
        return None
    return int(parts[1])


def register_plugins(plugins: list[Any]) -> list[Any]:
    """Register extra plugin objects (or importable module names) with this process's
    plugin manager; returns what was newly registered, for `unregister_plugins`. A spawned
    child does not inherit plugins the parent registered at run time, hence this."""
    from pdcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    added = []
    for plugin in plugins:
        obj = importlib.import_module(plugin) if isinstance(plugin, str) else plugin
        if not pm.is_registered(obj):
            pm.register(obj)
            added.append(obj)
    return added


def unregister_plugins(added: list[Any]) -> None:
    from pdcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    for obj in added:
        pm.unregister(obj)


def receiver_main(
    conn: Connection, name: str, chunks: int, plugins: list[Any], timeout_s: float
) -> None:
    """Entry point of the receiver process; speaks dicts over `conn` (see module doc).

    Commands: {"op": "notifs"} -> every (sender, payload, digest-at-arrival) seen since the
    last ask; {"op": "chunk", "chunk": i} -> chunk i's bytes; {"op": "digests"} -> the current sha256 of every chunk; {"op": "close"} ->
    close the backend twice and report any exception, then exit.
    """
    from pdcore.disagg.transfer import MemoryRegion, TransferConfig, create_transfer_backend

    try:
        register_plugins(plugins)
        buf = np.zeros(chunks * CHUNK, dtype=np.uint8)
        config = TransferConfig(local_id=f"conformance-receiver-{name}", timeout_s=timeout_s)
        backend = create_transfer_backend(name, config)
        backend.register_memory([MemoryRegion(buf.ctypes.data, buf.nbytes)])
        blob = backend.describe()
    except BaseException as exc:  # reported to the parent, which names the failed check
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"ok": True, "blob": blob, "addr": buf.ctypes.data, "size": buf.nbytes})

    def digest(chunk: int) -> str:
        if not 0 <= chunk < chunks:
            return ""
        return hashlib.sha256(buf[chunk * CHUNK : (chunk + 1) * CHUNK].tobytes()).hexdigest()

    seen: list[tuple[str, bytes, str]] = []
    while True:
        for n in backend.fetch_notifications():
            chunk = chunk_of(n.payload)
            seen.append((n.sender, n.payload, "" if chunk is None else digest(chunk)))
        if not conn.poll(0.0005):
            continue
        cmd = conn.recv()
        if cmd["op"] == "notifs":
            conn.send(seen)
            seen = []
        elif cmd["op"] == "chunk":
            c = cmd["chunk"]
            conn.send(buf[c * CHUNK : (c + 1) * CHUNK].tobytes())
        elif cmd["op"] == "digests":
            conn.send([digest(c) for c in range(chunks)])
        elif cmd["op"] == "close":
            t0 = time.monotonic()
            try:
                backend.close()
                backend.close()
                conn.send({"ok": True, "seconds": time.monotonic() - t0})
            except BaseException as exc:
                conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return


class Receiver:
    """A receiver process and its pipe; every wait is bounded so nothing hangs the kit."""

    def __init__(self, name: str, chunks: int, plugins: list[Any], timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, name, chunks, plugins, timeout_s)
        self.proc = ctx.Process(target=receiver_main, args=args, daemon=True)
        self.proc.start()
        child.close()
        self.hello: dict[str, Any] | None = None

    def recv(self, limit_s: float) -> Any:
        if not self.conn.poll(limit_s):
            raise CheckFailed(f"receiver process gave no answer in {limit_s:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise CheckFailed(f"receiver process died (exit code {self.proc.exitcode})") from None

    def start(self, limit_s: float) -> dict[str, Any]:
        if self.hello is None:
            self.hello = self.recv(limit_s)
        return self.hello

    def ask(self, op: str, limit_s: float = 10.0, **kw: Any) -> Any:
        try:
            self.conn.send({"op": op, **kw})
        except (BrokenPipeError, OSError):
            raise CheckFailed("receiver process is gone") from None
        return self.recv(limit_s)

    def notifs(self, want: set[bytes], limit_s: float) -> list[tuple[str, bytes, str]]:
        """Notifications until every payload in `want` was seen (others are kept too)."""
        got: list[tuple[str, bytes, str]] = []
        deadline = time.monotonic() + limit_s
        while not want <= {p for _, p, _ in got} and time.monotonic() < deadline:
            got += self.ask("notifs")
            time.sleep(0.002)
        return got

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL
        self.proc.join(10)
        self.conn.close()


def wait_batches(backend: TransferBackend, batches: list[int], limit_s: float) -> list[Any]:
    """Poll until every batch is finished; CheckFailed if any is pending past `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        states = [backend.poll(b) for b in batches]
        pending = sum(not s.finished for s in states)
        if not pending:
            return states
        if time.monotonic() > deadline:
            raise CheckFailed(
                f"{pending} of {len(batches)} batch(es) still pending after {limit_s:.0f} s "
                f"(timeout_s + {GRACE_S:.0f} s): a hang, or poll never reports done"
            )
        time.sleep(0.001)
