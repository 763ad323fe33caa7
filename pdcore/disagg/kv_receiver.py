"""Decode's half of the control plane: one connection per prefill it uses, and one
KVReceiver per room (DESIGN.md §3; every transfer backend shares it).

Per prefill (host, bootstrap port): look it up over HTTP on a worker thread, register over
zmq (our backend blob and KV layout; prefill refuses a layout that differs), then heartbeat
it. A room's receiver sends its pre-allocated page list and waits for the data plane's
notification, which arrives only once the KV is in place and carries the first token.
A prefill that stops answering fails its rooms after interval x max failures, not at the
waiting timeout; every failure on this side is told to prefill so it frees its pages too.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from pdcore.disagg.bootstrap import BootstrapError, fetch_route, reachable_endpoint
from pdcore.disagg.io_loop import IOLoop
from pdcore.disagg.kv_poll import KVPoll
from pdcore.disagg.messages import (
    PROTOCOL_VERSION,
    MessageError,
    pack,
    unpack,
    unpack_done,
)
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.transfer_queues import is_part
from pdcore.disagg.transfer_side import TransferSide
from pdcore.model.kv_pool import KVPool

logger = logging.getLogger(__name__)

PeerKey = tuple[str, int]


@dataclass(eq=False)
class _Prefill:
    key: PeerKey
    state: str = "bootstrapping"  # -> registering -> ready | failed
    sock: zmq.Socket[Any] | None = None
    backend_id: str = ""
    instance: str = ""
    last_ping: float = 0.0
    last_pong: float = 0.0
    misses: int = 0
    rooms: dict[int, KVReceiver] = field(default_factory=dict)
    backlog: list[bytes] = field(default_factory=list)  # aborts from before registering

    @property
    def name(self) -> str:
        return f"{self.key[0]}:{self.key[1]}"


class KVReceiver:
    """One room on decode. Engine thread: `poll`, `prealloc`, `abort`."""

    def __init__(self, manager: DecodeKVManager, peer: _Prefill, room: int) -> None:
        self.room = room
        self.peer = peer
        self.state = KVPoll.WaitingForInput if peer.state == "ready" else KVPoll.Bootstrapping
        self.failure_reason: str | None = None
        self.first_token: int | None = None
        self.first_logprob: float | None = None
        self._m = manager
        self._pages = 0
        self._prealloc_at = 0.0

    def poll(self) -> KVPoll:
        """The room's state; notifications are drained once per engine step by the
        manager's `tick`, not once per room."""
        return self.state

    def prealloc(self, page_ids: list[int]) -> None:
        """Hand prefill the pages to write the prompt's KV into."""
        m = self._m
        with m.lock:
            if self.state != KVPoll.WaitingForInput:
                if self.state == KVPoll.Failed:
                    return
                raise RuntimeError(f"room {self.room}: prealloc() in state {self.state.name}")
            self.state = KVPoll.Transferring
            self._pages = len(page_ids)
            self._prealloc_at = time.monotonic()
            m.send(self.peer, pack("prealloc", room=self.room, pages=[int(p) for p in page_ids]))

    def abort(self, reason: str) -> None:
        """Fail the room and tell prefill to drop it."""
        with self._m.lock:
            self._m.fail(self, f"aborted on decode: {reason}", tell=reason)

    def _finish(self, state: KVPoll, reason: str | None) -> None:
        """Manager lock held."""
        self.state, self.failure_reason = state, reason
        if self.peer.rooms.get(self.room) is self:
            del self.peer.rooms[self.room]
        ok = state == KVPoll.Success
        nbytes = self._pages * self._m.bytes_per_page if ok else 0
        latency = time.monotonic() - self._prealloc_at if self._prealloc_at else 0.0
        self._m.stats.record(self.room, "decode", ok, nbytes, latency, reason)


class DecodeKVManager:
    """See the module docstring. `host`: the address this side binds and advertises."""

    def __init__(self, settings: DisaggSettings, pool: KVPool, host: str) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        side = TransferSide.open("decode", settings, pool, host)
        self.layout, self.spec, self.backend, self.stats = (
            side.layout,
            side.spec,
            side.backend,
            side.stats,
        )
        self.bytes_per_page = 2 * self.layout.num_layers * self.layout.page_bytes
        self.peers: dict[PeerKey, _Prefill] = {}
        self._by_backend_id: dict[str, _Prefill] = {}
        self._pool = ThreadPoolExecutor(
            settings.disaggregation_thread_pool_size, thread_name_prefix="pd-bootstrap"
        )
        self.io = IOLoop("pd-decode-control", self._tick, tick_s=0.05)
        try:
            self.backend.register_memory(self.layout.regions())
            self._blob = self.backend.describe()
            self.io.start()
        except BaseException:
            self.close()
            raise

    def create_receiver(
        self, room: int, bootstrap_host: str, bootstrap_port: int | None
    ) -> KVReceiver:
        port = bootstrap_port or self.settings.disaggregation_bootstrap_port
        key = (bootstrap_host, int(port))
        with self.lock:
            peer = self.peers.get(key)
            if peer is None:
                peer = self.peers[key] = _Prefill(key)
                self._pool.submit(self._bootstrap, peer)
            old = peer.rooms.get(room)
            if old is not None:
                self.fail(old, f"room {room} was reused by a new request")
            receiver = peer.rooms[room] = KVReceiver(self, peer, room)
            return receiver

    def fail(self, receiver: KVReceiver, reason: str, *, tell: str | None = None) -> None:
        """Lock held. Fail a room; with `tell`, prefill is asked to drop it too."""
        if receiver.state.finished:
            return
        receiver._finish(KVPoll.Failed, reason)
        if tell is not None:
            self.send(receiver.peer, pack("abort", room=receiver.room, reason=tell))

    def fail_peer(self, peer: _Prefill, reason: str) -> None:
        """Lock held. The prefill is unusable: fail its rooms and forget it, so the next
        request for it bootstraps afresh (it may have restarted)."""
        peer.state = "failed"
        logger.warning("PD: prefill %s: %s", peer.name, reason)
        for receiver in list(peer.rooms.values()):
            self.fail(receiver, reason, tell=reason)
        if self.peers.get(peer.key) is peer:
            del self.peers[peer.key]
        if self._by_backend_id.get(peer.backend_id) is peer:
            del self._by_backend_id[peer.backend_id]
        sock = peer.sock
        if sock is not None:
            self.io.call(lambda: self.io.remove_socket(sock))

    def send(self, peer: _Prefill, frame: bytes) -> None:
        def do() -> None:
            if peer.sock is None and peer.state == "bootstrapping":
                peer.backlog.append(frame)
            elif peer.sock is not None and not peer.sock.closed:
                try:
                    peer.sock.send(frame, flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    logger.warning("PD: cannot reach prefill %s: %s", peer.name, exc)

        self.io.call(do)

    # --- worker thread: bootstrap lookup ----------------------------------------------------

    def _bootstrap(self, peer: _Prefill) -> None:
        """Retry the lookup for interval x max failures: a prefill that long unreachable is
        treated as dead, exactly like one that stopped answering heartbeats."""
        s = self.settings
        interval = s.disaggregation_heartbeat_interval
        deadline = time.monotonic() + interval * s.disaggregation_heartbeat_max_failure
        while True:
            try:
                route = fetch_route(peer.key[0], peer.key[1], timeout=interval)
                break
            except BootstrapError as exc:
                if time.monotonic() + 0.2 >= deadline:
                    with self.lock:
                        self.fail_peer(peer, str(exc))
                    return
                time.sleep(0.2)
        self.io.call(lambda: self._register(peer, route))

    # --- I/O thread -----------------------------------------------------------------------

    def _register(self, peer: _Prefill, route: dict[str, Any]) -> None:
        with self.lock:
            if peer.state == "failed":
                return
            # Even when route["spec"] shows a mismatch, register: prefill refuses, and our
            # aborts for the affected rooms then fail its senders too.
            sock = self.io.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 500)  # let the last aborts leave on close
            sock.connect(reachable_endpoint(route["endpoint"], peer.key[0]))
            self.io.add_socket(sock, lambda s: self._on_dealer(peer, s))
            peer.sock, peer.state = sock, "registering"
            peer.backend_id, peer.instance = route["backend_id"], route["instance"]
            peer.last_ping = peer.last_pong = time.monotonic()
            sock.send(
                pack(
                    "register",
                    protocol=PROTOCOL_VERSION,
                    decode_id=self.backend.local_id,
                    blob=self._blob,
                    layout=asdict(self.layout),
                    spec=self.spec.to_wire(),
                ),
                flags=zmq.NOBLOCK,
            )
            for frame in peer.backlog:
                sock.send(frame, flags=zmq.NOBLOCK)
            peer.backlog.clear()

    def _refused(self, peer: _Prefill, reason: str) -> None:
        self.fail_peer(peer, f"prefill {peer.name} refused this decode: {reason}")

    def _on_dealer(self, peer: _Prefill, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                msg = unpack(sock.recv(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            except MessageError as exc:
                logger.warning("PD control plane: %s", exc)
                continue
            with self.lock:
                try:
                    self._handle(peer, msg)
                except (KeyError, TypeError, ValueError) as exc:  # a malformed field
                    logger.warning("PD control plane: bad %r message: %r", msg["type"], exc)

    def _handle(self, peer: _Prefill, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        peer.last_pong, peer.misses = time.monotonic(), 0
        if kind == "registered":
            if not msg.get("ok"):
                return self._refused(peer, str(msg.get("reason")))
            peer.state = "ready"
            self._by_backend_id[peer.backend_id] = peer
            for receiver in peer.rooms.values():
                if receiver.state == KVPoll.Bootstrapping:
                    receiver.state = KVPoll.WaitingForInput
        elif kind == "pong" and msg.get("instance") != peer.instance:
            self.fail_peer(peer, f"prefill {peer.name} restarted")
        elif kind == "abort":
            aborted = peer.rooms.get(int(msg.get("room") or 0))
            if aborted is not None:
                self.fail(aborted, f"prefill {peer.name}: {msg.get('reason')}")

    def drain_notifications(self) -> None:
        """Completion notifications: the KV of a room is in place, with its first token."""
        for note in self.backend.fetch_notifications():
            if is_part(note.payload):  # a slice of a room's KV; the room's own note follows
                continue
            try:
                room, token, logprob = unpack_done(note.payload)
            except Exception:
                logger.warning("PD: malformed notification from %s", note.sender)
                continue
            with self.lock:
                peer = self._by_backend_id.get(note.sender)
                receiver = peer.rooms.get(room) if peer is not None else None
                if receiver is not None and receiver.state == KVPoll.Transferring:
                    receiver.first_token, receiver.first_logprob = token, logprob
                    receiver._finish(KVPoll.Success, None)

    def _tick(self) -> None:
        """Heartbeats and the waiting timeout."""
        self.drain_notifications()
        s, now = self.settings, time.monotonic()
        with self.lock:
            for peer in list(self.peers.values()):
                if peer.state in ("registering", "ready") and (
                    now - peer.last_ping >= s.disaggregation_heartbeat_interval
                ):
                    if peer.last_pong < peer.last_ping:
                        peer.misses += 1
                        if peer.misses >= s.disaggregation_heartbeat_max_failure:
                            self.fail_peer(
                                peer,
                                f"prefill {peer.name} missed {peer.misses} heartbeats "
                                f"({s.disaggregation_heartbeat_interval:g} s apart); is it dead?",
                            )
                            continue
                    peer.last_ping = now
                    self.send(peer, pack("ping"))
                for receiver in list(peer.rooms.values()):
                    if (
                        receiver.state == KVPoll.Transferring
                        and now - receiver._prealloc_at > s.disaggregation_waiting_timeout
                    ):
                        reason = (
                            f"KV cache did not arrive within "
                            f"{s.disaggregation_waiting_timeout:g} s (waiting timeout)"
                        )
                        self.fail(receiver, reason, tell=reason)

    # --- engine-facing --------------------------------------------------------------------

    def tick(self) -> None:
        """Engine thread, every iteration: pick up finished transfers promptly, and report
        ended rooms to observation hooks."""
        self.drain_notifications()
        self.stats.emit_events()

    def metrics(self, drain_samples: bool = False) -> dict[str, Any]:
        return self.stats.snapshot(drain_samples)

    def close(self) -> None:
        with self.lock:
            for peer in list(self.peers.values()):
                self.fail_peer(peer, "decode instance shutting down")
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.io.close()
        self.backend.close()
