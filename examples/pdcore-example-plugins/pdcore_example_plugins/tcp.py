"""The "tcp" transfer backend: KV bytes over plain TCP sockets, in pure Python.

Implements transfer contract v1 (pdcore/disagg/transfer.py). Everything around it --
bootstrap, handshake, KVPoll states, timeouts, heartbeat, abort -- is pdcore's control
plane; this module only moves bytes between two processes' registered CPU memory.

Receiver (decode). `describe()` starts a listener thread on `config.host`, port 0, and
returns a msgpack blob with that address and the registered regions. Each accepted
connection gets a thread that reads one frame per batch (tcp_wire.py has the format): a
header naming the destination ranges and the notification, then the payload. Every
destination range is checked against the regions *this side* registered before anything
is written; a batch that strays outside is read, thrown away and refused. Accepted bytes
are copied into place with ctypes.memmove; the notification is queued for
`fetch_notifications` only after the last byte landed, then the reply ("ok") is sent.

Sender (prefill). `connect()` opens a socket to the peer and starts one worker thread per
peer; `submit()` checks the runs, coalesces them and queues the batch; the worker streams
header and payload straight from registered memory and waits for the reply. `poll()` is
done on {"ok": True}, failed on a refusal, a socket error (a dead peer resets or refuses the
connection) or when the batch has been pending longer than `config.timeout_s`.

No authentication and no encryption: bind it to a trusted network only.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack
import numpy as np

from pdcore.disagg.transfer import (
    DONE,
    PENDING,
    TRANSFER_CONTRACT_VERSION,
    BatchState,
    MemoryRegion,
    Notification,
    RegionTable,
    RunsLike,
    TransferBackend,
    TransferConfig,
    TransferError,
    coalesce_runs,
    failed,
)
from pdcore_example_plugins.tcp_wire import (
    make_blob,
    memory,
    message,
    parse_blob,
    read_exact,
    read_message,
)

BOUNCE = 1 << 20  # receiver's staging buffer per connection
JOIN_S = 5.0


# --- sender side --------------------------------------------------------------------------


@dataclass
class _Batch:
    link: _Link
    runs: np.ndarray  # coalesced (local, remote, length)
    note: bytes
    deadline: float
    state: BatchState = PENDING
    released: bool = False


class _Link:
    """One peer on the sender: its address, its regions, and the worker thread that sends
    its batches one after the other over one connection (reopened after an error)."""

    def __init__(self, backend: TcpBackend, peer_id: str, blob: bytes) -> None:
        self.backend, self.peer_id, self.blob = backend, peer_id, blob
        self.host, self.port, self.regions = parse_blob(blob)
        self.queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.sock: socket.socket | None = self._dial()  # unreachable: TransferError now
        self.stopping = False
        self.thread = threading.Thread(
            target=self._run, name=f"pdcore-tcp-send-{peer_id}", daemon=True
        )
        self.thread.start()

    def _dial(self) -> socket.socket:
        timeout = self.backend.config.timeout_s
        try:
            sock = socket.create_connection((self.host, self.port), timeout=min(timeout, 10.0))
        except OSError as exc:
            raise TransferError(
                f"cannot reach tcp peer {self.peer_id!r} at {self.host}:{self.port}: {exc}"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)  # a stalled peer fails a batch instead of hanging the worker
        return sock

    def _run(self) -> None:
        while (batch := self.queue.get()) is not None:
            if batch.released or batch.state.finished or self.stopping:
                continue  # released before it was sent: nothing goes on the wire
            try:
                if self.sock is None:
                    self.sock = self._dial()
                state = self._send(self.sock, batch)
            except TransferError as exc:  # could not (re)connect
                state = failed(str(exc))
            except (OSError, EOFError, ValueError, msgpack.UnpackException) as exc:
                # reset, refused, timed out, closed, or a reply that is not ours
                self._close_socket()
                why = str(exc) or type(exc).__name__
                state = failed(f"tcp peer {self.peer_id!r} at {self.host}:{self.port}: {why}")
            self.backend._settle(batch, state)
        self._close_socket()

    def _send(self, sock: socket.socket, batch: _Batch) -> BatchState:
        header = {
            "sender": self.backend.local_id,
            "note": batch.note,
            "runs": batch.runs[:, 1:].astype("<u8").tobytes(),
        }
        with sock.makefile("wb", buffering=BOUNCE) as wfile:  # coalesces small runs
            wfile.write(message(header))
            for src, _dst, length in batch.runs.tolist():
                wfile.write(memory(src, length))  # straight from registered memory
        with sock.makefile("rb") as rfile:
            reply = read_message(rfile)
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            return failed(f"tcp peer {self.peer_id!r} refused the batch: {error}")
        return DONE

    def _close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stop(self) -> None:
        """Stop the worker; a batch being sent fails at once (its socket is shut down)."""
        self.stopping = True
        self.queue.put(None)
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(JOIN_S)


# --- the backend --------------------------------------------------------------------------


class TcpBackend(TransferBackend):
    """Both roles in one object, as the contract wants: a decode server calls
    register_memory + describe + fetch_notifications, a prefill server register_memory +
    connect + submit + poll. Thread-safe: one lock guards the tables."""

    contract_version = TRANSFER_CONTRACT_VERSION

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._regions = RegionTable()
        self._links: dict[str, _Link] = {}
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._inbox: list[Notification] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._closed = False

    # -- both sides ------------------------------------------------------------------------

    def register_memory(self, regions: Sequence[MemoryRegion]) -> None:
        for r in regions:
            if r.device != "cpu":  # ctypes can only touch host memory
                raise TransferError(f"tcp moves CPU memory only; region {r} is on {r.device}")
        with self._lock:
            self._regions.add(regions)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links, self._links = list(self._links.values()), {}
            listener, self._listener = self._listener, None
            conns, threads = list(self._conns), list(self._threads)
        for link in links:
            link.stop()
        if listener is not None:
            listener.close()  # the accept loop notices within its 0.1 s timeout
        for conn in conns:  # wakes the connection threads blocked in recv
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(JOIN_S)
        with self._lock:
            for b in self._batches.values():
                self._settle_locked(b, failed("the tcp backend was closed"))

    # -- sender side -----------------------------------------------------------------------

    def connect(self, peer_id: str, blob: bytes) -> None:
        with self._lock:
            old = self._links.get(peer_id)
            if old is not None and old.blob == blob:
                return  # idempotent
        link = _Link(self, peer_id, blob)  # dials outside the lock: may take a while
        with self._lock:
            closed = self._closed
            old = None if closed else self._links.get(peer_id)
            if not closed:
                self._links[peer_id] = link
        if closed:
            link.stop()
            raise TransferError("the tcp backend is closed")
        if old is not None:  # a restarted peer: its old batches fail, new ones use `link`
            self._drop(old, "tcp peer was reconnected with a new blob")

    def disconnect(self, peer_id: str) -> None:
        with self._lock:
            link = self._links.pop(peer_id, None)
        if link is not None:
            self._drop(link, f"tcp peer {peer_id!r} was disconnected")

    def _drop(self, link: _Link, reason: str) -> None:
        link.stop()
        with self._lock:
            for b in self._batches.values():
                if b.link is link:  # queued or in flight on the dropped connection
                    self._settle_locked(b, failed(reason))

    def submit(self, peer_id: str, runs: RunsLike, notification: bytes) -> int:
        try:
            arr = coalesce_runs(runs)  # adjacent runs travel as one: fewer writes
        except ValueError as exc:
            raise TransferError(f"bad runs: {exc}") from exc
        with self._lock:
            link = self._links.get(peer_id)
            if link is None:
                raise TransferError(f"tcp peer {peer_id!r} is not connected; connect() first")
            if len(arr):  # caller mistakes raise here; the transport never sees them
                self._regions.device_of(arr[:, 0], arr[:, 2], "local")
                link.regions.device_of(arr[:, 1], arr[:, 2], "remote")
            deadline = time.monotonic() + self.config.timeout_s
            batch = _Batch(link, arr, bytes(notification), deadline)
            batch_id = next(self._ids)
            self._batches[batch_id] = batch
        link.queue.put(batch)
        return batch_id

    def poll(self, batch: int) -> BatchState:
        with self._lock:
            b = self._batches.get(batch)
            if b is None:
                raise TransferError(f"unknown batch {batch}")
            if not b.state.finished and time.monotonic() > b.deadline:
                self._settle_locked(
                    b, failed(f"tcp batch still pending after {self.config.timeout_s} s")
                )
            return b.state

    def release(self, batch: int) -> None:
        """Forget a batch. One not yet on the wire is never sent; one being sent finishes
        (TCP cannot take back bytes), and its notification may still be delivered."""
        with self._lock:
            b = self._batches.pop(batch, None)
            if b is not None:
                b.released = True

    def _settle(self, batch: _Batch, state: BatchState) -> None:
        with self._lock:
            self._settle_locked(batch, state)

    @staticmethod
    def _settle_locked(batch: _Batch, state: BatchState) -> None:
        if not batch.state.finished:  # the first verdict stands (a timeout beats a late ack)
            batch.state = state

    # -- receiver side ---------------------------------------------------------------------

    def describe(self) -> bytes:
        with self._lock:
            if self._closed:
                raise TransferError("the tcp backend is closed")
            if self._listener is None:
                self._listener = socket.create_server((self.config.host, 0))
                self._listener.settimeout(0.1)
                self._spawn(self._accept_loop, self._listener, name="pdcore-tcp-listen")
            port = self._listener.getsockname()[1]
            return make_blob(self.config.host, port, self._regions)

    def fetch_notifications(self) -> list[Notification]:
        with self._lock:
            out, self._inbox = self._inbox, []
        return out

    def _spawn(self, target: Any, *args: Any, name: str) -> None:
        """Lock held."""
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            conn.settimeout(None)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                self._spawn(self._serve, conn, name=f"pdcore-tcp-recv-{addr[0]}:{addr[1]}")

    def _serve(self, conn: socket.socket) -> None:
        """One sender's connection: frames until it closes (or we do)."""
        bounce = bytearray(BOUNCE)
        bounce_addr = ctypes.addressof((ctypes.c_char * BOUNCE).from_buffer(bounce))
        try:
            with conn.makefile("rb", buffering=BOUNCE) as rfile:
                while not self._closed:
                    header = read_message(rfile)  # between batches: wait as long as it takes
                    conn.settimeout(self.config.timeout_s)  # inside a batch: bounded
                    reply = self._receive(header, rfile, bounce, bounce_addr)
                    conn.sendall(message(reply))
                    conn.settimeout(None)
        except (OSError, EOFError, ValueError, msgpack.UnpackException):
            pass  # the sender went away or spoke garbage: its in-flight batch fails there
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _receive(
        self, header: Any, rfile: BinaryIO, bounce: bytearray, bounce_addr: int
    ) -> dict[str, Any]:
        if not isinstance(header, dict) or not (
            isinstance(header.get("runs"), bytes)
            and len(header["runs"]) % 16 == 0
            and isinstance(header.get("note"), bytes)
            and isinstance(header.get("sender"), str)
        ):
            raise ValueError("malformed batch header")  # cannot resync: drop the connection
        pairs = np.frombuffer(header["runs"], dtype="<u8").reshape(-1, 2).astype(np.uint64)
        dst, lengths = pairs[:, 0].copy(), pairs[:, 1].copy()
        error = None
        try:
            if (lengths == 0).any() or (dst + lengths < dst).any():
                raise TransferError("a run of length 0, or one that wraps around memory")
            if len(dst):
                with self._lock:
                    self._regions.device_of(dst, lengths, "destination")  # raises outside
        except TransferError as exc:
            error = str(exc)
        view = memoryview(bounce)
        for addr, length in zip(dst.tolist(), lengths.tolist()):
            done = 0
            while done < length:
                n = min(length - done, BOUNCE)
                read_exact(rfile, view[:n])
                if error is None:  # a refused batch is read and thrown away
                    ctypes.memmove(addr + done, bounce_addr, n)
                done += n
        if error is not None:
            return {"ok": False, "error": error}
        note = Notification(header["sender"], header["note"])
        with self._lock:
            self._inbox.append(note)  # every byte is in place: now the peer may see it
        return {"ok": True, "error": None}
