"""PD with tensor or pipeline parallelism: rank 0's channel to the transfer agents of its
other ranks.

Every TP rank holds its own KV heads in its own pool, and every pipeline stage its own
layers, so every rank needs its own transfer endpoint (a transfer backend with that pool
registered): bytes never pass through rank 0. With --pp-size the ranks are the grid's
(rank = stage * tp_size + tp_rank; pdcore.model.pipeline_split), the rendezvous store the
grid's.
But only rank 0 runs the control plane -- it owns the scheduler, the page allocator (page
ids are the same on every rank), the bootstrap server and the rooms -- as it owns every
other decision in pdcore's TP (docs/parallelism.md). So a follower rank runs a `RankAgent`:
its transfer backend, driven by rank 0 over one zmq connection.

    follower -> rank 0   hello {rank, backend_id, blob, layout, spec}   once, at start
                         state {key, ok, reason, inflight}              a write ended
                         notes {notes: [[sender, payload], ...]}        decode: KV arrived
    rank 0 -> follower   connect {peer_id, blob} / disconnect {peer_id} prefill
                         submit {key, peer_id, room, runs, note}         prefill: write these
                         cancel {key}                                    prefill: room failed

Rank 0 binds the channel and publishes its address in the TP group's rendezvous store (a
follower on another node reaches it the same way it reached the group). Messages are msgpack
maps, never pickle; runs travel as raw little-endian uint64 triples.

Why zmq and not the TP group's collectives: a follower spends its life blocked in the next
batch broadcast, and a write's completion or a notification comes at any moment; an I/O
thread per follower reports it at once, and the step loop gains no collective.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import zmq

from pdcore.disagg.io_loop import IOLoop
from pdcore.disagg.messages import MessageError, pack, unpack
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.tp_plan import RankHeads, TPPlace
from pdcore.disagg.transfer import BatchState, BatchStatus, KVLayout, TransferError
from pdcore.disagg.transfer_queues import SendJob, TransferQueues
from pdcore.disagg.transfer_side import TransferSide
from pdcore.model.kv_pool import KVPool

logger = logging.getLogger(__name__)

STORE_KEY = "pdcore-pd/rank0-channel"


@dataclass(frozen=True)
class RankEndpoint:
    """One rank's transfer endpoint as rank 0 knows it."""

    rank: int
    backend_id: str
    blob: bytes
    layout: KVLayout
    spec: dict[str, Any]

    @property
    def heads(self) -> RankHeads:
        return RankHeads.from_spec(self.spec, self.rank)

    def to_wire(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "backend_id": self.backend_id,
            "blob": self.blob,
            "layout": asdict(self.layout),
            "spec": self.spec,
        }

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> RankEndpoint:
        return cls(
            int(msg["rank"]),
            str(msg["backend_id"]),
            bytes(msg["blob"]),
            KVLayout(**msg["layout"]),
            dict(msg["spec"]),
        )


def _identity(rank: int) -> bytes:
    return f"tp{rank}".encode()


class RankLink:
    """Rank 0's end: a ROUTER on `host` that the followers' agents connect to. Built before
    `io` starts (it adds its socket there); `wait()` then blocks until every follower said
    hello. `on_message(rank, msg)` gets every later message, on the I/O thread."""

    def __init__(
        self,
        io: IOLoop,
        host: str,
        store: Any,
        size: int,
        on_message: Callable[[int, dict[str, Any]], None],
    ) -> None:
        self.io, self.size, self._on_message = io, size, on_message
        self.followers: dict[int, RankEndpoint] = {}
        self._ready = threading.Event()
        self._sock = io.ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 200)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        io.add_socket(self._sock, self._on_sock)
        store.set(STORE_KEY, f"tcp://{host}:{port}")

    def wait(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            missing = sorted(set(range(1, self.size)) - set(self.followers))
            raise TransferError(
                f"ranks {missing} (TP ranks, or pipeline grid ranks) did not start their PD "
                f"transfer agents within {timeout:g} s"
            )

    def send(self, rank: int, type_: str, **fields: Any) -> None:
        """Any thread: queue a message to follower `rank`."""
        frame = pack(type_, **fields)
        sock = self._sock
        self.io.call(lambda: sock.send_multipart([_identity(rank), frame], flags=zmq.NOBLOCK))

    def _on_sock(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                identity, frame = sock.recv_multipart(flags=zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                msg = unpack(frame)
                rank = int(identity.decode().removeprefix("tp"))
                if msg["type"] == "hello":
                    self.followers[rank] = RankEndpoint.from_wire(msg)
                    if len(self.followers) >= self.size - 1:
                        self._ready.set()
                else:
                    self._on_message(rank, msg)
            except (MessageError, KeyError, TypeError, ValueError) as exc:
                logger.warning("PD rank channel: bad message: %r", exc)


class RankAgent:
    """A follower rank's transfer endpoint: its own backend with its own pool registered,
    connecting and writing (prefill) or reporting arrived notifications (decode) as rank 0
    says. Runs on its own threads beside the follower's forward loop."""

    def __init__(
        self,
        role: Literal["prefill", "decode"],
        settings: DisaggSettings,
        pool: KVPool,
        host: str,
        place: TPPlace,
        store: Any,
    ) -> None:
        self.role, self.place = role, place
        self.lock = threading.RLock()
        side = TransferSide.open(role, settings, pool, host, place)
        self.backend = side.backend
        self._refused: dict[str, str] = {}  # peer -> why connect failed
        self._live: set[int] = set()
        self._cancelled: set[int] = set()
        self.queues: TransferQueues | None = None
        # Decode: notifications are fetched every 5 ms (some transports move data only
        # while asked); prefill: the transfer queues poll their own writes.
        self.io = IOLoop(f"pd-tp{place.rank}-agent", self._tick, 0.005 if role == "decode" else 0.5)
        try:
            self.backend.register_memory(side.layout.regions())
            endpoint = store.get(STORE_KEY).decode()
            self._sock = self.io.ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.IDENTITY, _identity(place.rank))
            self._sock.setsockopt(zmq.LINGER, 200)
            self._sock.connect(endpoint)
            self.io.add_socket(self._sock, self._on_sock)
            hello = RankEndpoint(
                place.rank,
                self.backend.local_id,
                self.backend.describe(),
                side.layout,
                side.spec.to_wire(),
            )
            self._sock.send(pack("hello", **hello.to_wire()))  # before the I/O thread starts
            if role == "prefill":
                self.queues = TransferQueues(
                    self.backend,
                    self.lock,
                    settings.disaggregation_queue_size,
                    settings.disaggregation_thread_pool_size,
                    name=f"pd-tp{place.rank}-send",
                )
            self.io.start()
        except BaseException:
            self.close()
            raise

    def _send(self, type_: str, **fields: Any) -> None:
        frame = pack(type_, **fields)
        self.io.call(lambda: self._sock.send(frame, flags=zmq.NOBLOCK))

    def _on_sock(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                msg = unpack(sock.recv(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            except MessageError as exc:
                logger.warning("PD rank channel: %s", exc)
                continue
            try:
                self._handle(msg)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("PD rank channel: bad %r message: %r", msg["type"], exc)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "connect":
            peer = str(msg["peer_id"])
            try:
                with self.lock:
                    self.backend.connect(peer, bytes(msg["blob"]))
                self._refused.pop(peer, None)
            except TransferError as exc:
                self._refused[peer] = str(exc)
        elif kind == "disconnect":
            peer = str(msg["peer_id"])
            if self.queues is not None:
                self.queues.forget(peer)
            with self.lock:
                self.backend.disconnect(peer)
        elif kind == "submit":
            self._submit(msg)
        elif kind == "cancel":  # the room failed: stop the write (a queued one never starts)
            key = int(msg["key"])
            with self.lock:
                live = key in self._live
                if live:
                    self._cancelled.add(key)
            if live:
                self._report(key, BatchState(BatchStatus.FAILED, "cancelled"))

    def _submit(self, msg: dict[str, Any]) -> None:
        key, peer = int(msg["key"]), str(msg["peer_id"])
        with self.lock:
            self._live.add(key)
        if self.queues is None:
            self._report(key, BatchState(BatchStatus.FAILED, "this rank does not send"))
            return
        if peer in self._refused:
            reason = f"TP rank {self.place.rank} cannot connect: {self._refused[peer]}"
            self._report(key, BatchState(BatchStatus.FAILED, reason))
            return
        runs = np.frombuffer(bytes(msg["runs"]), dtype="<u8").reshape(-1, 3).astype(np.uint64)
        self.queues.put(
            SendJob(
                peer,
                int(msg["room"]),
                runs,
                bytes(msg["note"]),
                lambda state: self._ended(key, state),
                lambda: key in self._cancelled,
            )
        )

    def _ended(self, key: int, state: BatchState) -> None:
        """A transfer queue's thread: the write ended (cancelled ones included)."""
        with self.lock:
            self._cancelled.discard(key)
        self._report(key, state)

    def _report(self, key: int, state: BatchState) -> None:
        """Any thread: a write ended (or was cancelled); tell rank 0, with how many are still
        in flight. A cancelled write's own end is not reported again."""
        with self.lock:
            if key not in self._live:
                return
            self._live.discard(key)
            inflight = len(self._live)
        ok = state.status is BatchStatus.DONE
        self._send("state", key=key, ok=ok, reason=state.reason, inflight=inflight)

    def _tick(self) -> None:
        if self.role != "decode":
            return
        with self.lock:
            notes = self.backend.fetch_notifications()
        if notes:
            self._sock.send(
                pack("notes", notes=[[n.sender, n.payload] for n in notes]), flags=zmq.NOBLOCK
            )

    def close(self) -> None:
        """Stop the threads and release the backend; idempotent, and safe after a failed
        start."""
        if self.queues is not None:
            self.queues.close()
        self.io.close()
        self.backend.close()
