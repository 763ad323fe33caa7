"""The "tcp" transfer backend: KV bytes over plain TCP sockets, in pure Python.

Implements transfer contract v1 (pdcore/disagg/transfer.py) on pdcore's `ChannelBackend`
(pdcore/disagg/channel_backend.py), which does everything but moving bytes: the batch
table, the notification sent over its zmq side channel once a batch's data is in place,
the deadline, peers coming and going, release and close. Everything around that --
bootstrap, handshake, KVPoll states, heartbeat, abort -- is pdcore's control plane. This
module only moves bytes between two processes' registered CPU memory.

Receiver (decode). `describe()` starts a listener thread on `config.host`, port 0, and puts
that address in the blob next to the base class's fields. Each accepted connection gets a
thread that reads one frame per batch (tcp_wire.py has the format): a header naming the
destination ranges, then the payload. Every destination range is checked against the
regions *this side* registered before anything is written; a batch that strays outside is
read, thrown away and refused. Accepted bytes are copied into place with ctypes.memmove;
only after the last byte landed is the reply ("ok") sent.

Sender (prefill). `connect()` dials the peer and starts one worker thread per peer
(`_Link`). The base class's `submit()` checks and coalesces the runs; `_start_write` queues
them for the worker, which streams header and payload straight from registered memory and
waits for the reply. `_write_state` reads what the worker found: done on {"ok": True} (the
base class then sends the notification), failed on a refusal or a socket error (a dead peer
resets or refuses the connection).

No authentication and no encryption: bind it to a trusted network only.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack
import numpy as np

from pdcore.disagg.channel_backend import ChannelBackend, PeerBlob
from pdcore.disagg.transfer import (
    DONE,
    PENDING,
    TRANSFER_CONTRACT_VERSION,
    BatchState,
    MemoryRegion,
    RunArray,
    TransferConfig,
    TransferError,
    failed,
)
from pdcore_example_plugins.tcp_wire import (
    BLOB_TAG,
    BLOB_VERSION,
    memory,
    message,
    read_exact,
    read_message,
)

BOUNCE = 1 << 20  # receiver's staging buffer per connection
JOIN_S = 5.0


# --- sender side --------------------------------------------------------------------------


@dataclass
class _Send:
    """One batch's runs on their way to the peer; the worker thread sets `state`."""

    runs: RunArray
    state: BatchState = PENDING
    cancelled: bool = False  # released or timed out: if not on the wire yet, never sent


class _Link:
    """One peer on the sender: its address and the worker thread that sends its batches one
    after the other over one connection (reopened after an error)."""

    def __init__(self, peer_id: str, host: str, port: int, timeout_s: float) -> None:
        self.peer_id, self.host, self.port, self.timeout_s = peer_id, host, port, timeout_s
        self.queue: queue.SimpleQueue[_Send | None] = queue.SimpleQueue()
        self.sock: socket.socket | None = self._dial()  # unreachable: TransferError now
        self.stopping = False
        self.thread = threading.Thread(
            target=self._run, name=f"pdcore-tcp-send-{peer_id}", daemon=True
        )
        self.thread.start()

    def _dial(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), min(self.timeout_s, 10.0))
        except OSError as exc:
            raise TransferError(
                f"cannot reach tcp peer {self.peer_id!r} at {self.host}:{self.port}: {exc}"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout_s)  # a stalled peer fails a batch, not hang the worker
        return sock

    def _run(self) -> None:
        while (send := self.queue.get()) is not None:
            if send.cancelled or self.stopping:
                continue  # nothing goes on the wire
            try:
                if self.sock is None:
                    self.sock = self._dial()
                send.state = self._send(self.sock, send.runs)
            except TransferError as exc:  # could not (re)connect
                send.state = failed(str(exc))
            except (OSError, EOFError, ValueError, msgpack.UnpackException) as exc:
                # reset, refused, timed out, closed, or a reply that is not ours
                self._close_socket()
                why = str(exc) or type(exc).__name__
                send.state = failed(f"tcp peer {self.peer_id!r} at {self.host}:{self.port}: {why}")
        self._close_socket()

    def _send(self, sock: socket.socket, runs: RunArray) -> BatchState:
        header = {"runs": runs[:, 1:].astype("<u8").tobytes()}
        with sock.makefile("wb", buffering=BOUNCE) as wfile:  # coalesces small runs
            wfile.write(message(header))
            for src, _dst, length in runs.tolist():
                wfile.write(memory(src, length))  # straight from registered memory
        with sock.makefile("rb") as rfile:
            reply = read_message(rfile)
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            return failed(f"the receiver refused the batch: {error}")
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


class TcpBackend(ChannelBackend[_Link, _Send]):
    """Both roles in one object, as the contract wants: a decode server calls
    register_memory + describe + fetch_notifications, a prefill server register_memory +
    connect + submit + poll. The base class's lock guards the tables here too."""

    contract_version = TRANSFER_CONTRACT_VERSION
    blob_tag = BLOB_TAG
    blob_version = BLOB_VERSION
    blob_schema = {"host": str, "port": int}

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()

    def _register(self, regions: Sequence[MemoryRegion]) -> None:
        for r in regions:
            if r.device != "cpu":  # ctypes can only touch host memory
                raise TransferError(f"tcp moves CPU memory only; region {r} is on {r.device}")

    # -- sender side -----------------------------------------------------------------------

    def _open_peer(self, peer_id: str, blob: PeerBlob) -> _Link:
        return _Link(peer_id, blob.fields["host"], blob.fields["port"], self.config.timeout_s)

    def _start_write(self, peer: _Link, runs: RunArray) -> _Send:
        send = _Send(runs)
        peer.queue.put(send)  # the worker thread sends it; submit returns at once
        return send

    def _write_state(self, write: _Send) -> BatchState:
        return write.state

    def _cancel_write(self, write: _Send) -> None:
        write.cancelled = True  # one already streaming finishes: TCP cannot take bytes back

    def _close_peer(self, peer: _Link) -> None:
        peer.stop()

    # -- receiver side ---------------------------------------------------------------------

    def _blob_fields(self) -> dict[str, Any]:
        if self._listener is None:
            self._listener = socket.create_server((self.config.host, 0))
            self._listener.settimeout(0.1)
            self._spawn(self._accept_loop, self._listener, name="pdcore-tcp-listen")
        return {"host": self.config.host, "port": self._listener.getsockname()[1]}

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
        if not (
            isinstance(header, dict)
            and isinstance(header.get("runs"), bytes)
            and len(header["runs"]) % 16 == 0
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
        return {"ok": error is None, "error": error}  # ok: every byte is in place

    def _close_transport(self, unfinished: list[_Send]) -> None:
        """The listener, every connection and every thread this side started: no thread
        may touch the KV pool after the engine frees it."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, threads = list(self._conns), list(self._threads)
        if listener is not None:
            listener.close()  # the accept loop notices within its 0.1 s timeout
        for conn in conns:  # wakes the connection threads blocked in recv
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(JOIN_S)
