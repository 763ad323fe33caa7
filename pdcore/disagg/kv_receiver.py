"""Decode's half of the control plane: one connection per prefill it uses, and one
KVReceiver per room (DESIGN.md §3; every transfer backend shares it).

Per prefill (host, bootstrap port, dp rank): look it up over HTTP on a worker thread,
register over zmq (our backend blob and KV layout; prefill refuses a layout that differs),
then heartbeat it. A prefill with `--dp-size N` is N such peers: a room's KV is on dp rank
`room % N`; N is learnt from the first lookup (dp rank 0's, which answers `dp_size`), and
rooms created before it was known move to their rank's peer then. A room's receiver sends its pre-allocated page list and waits for the data plane's
notification, which arrives only once the KV is in place and carries the first token.
A prefill that stops answering fails its rooms after interval x max failures, not at the
waiting timeout; every failure on this side is told to prefill so it frees its pages too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from pdcore.disagg import wire_checks as wire
from pdcore.disagg.auth import NOTIFY, TO_DECODE, TO_PREFILL, AuthError, ControlAuth, warn_if_open
from pdcore.disagg.bootstrap import (
    BootstrapError,
    BootstrapRefused,
    fetch_route,
    reachable_endpoint,
)
from pdcore.disagg.io_loop import IOLoop
from pdcore.disagg.kv_poll import KVPoll
from pdcore.disagg.messages import (
    PROTOCOL_VERSION,
    MessageError,
    pack,
    unpack,
    unpack_done,
)
from pdcore.disagg.rank_channel import RankEndpoint, RankLink
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.tp_plan import RankHeads, TPPlace, transfer_plan
from pdcore.disagg.transfer import Notification
from pdcore.disagg.transfer_queues import is_part
from pdcore.disagg.transfer_side import TransferSide
from pdcore.model.kv_pool import KVPool

logger = logging.getLogger(__name__)

PeerKey = tuple[str, int, int]  # the prefill's bootstrap host and port, and its dp rank


@dataclass(eq=False)
class _Prefill:
    key: PeerKey
    state: str = "bootstrapping"  # -> registering -> ready | failed
    dp_size: int = 1  # the prefill's, once looked up
    sock: zmq.Socket[Any] | None = None
    backend_id: str = ""
    instance: str = ""
    last_ping: float = 0.0
    last_pong: float = 0.0
    misses: int = 0
    rooms: dict[int, KVReceiver] = field(default_factory=dict)
    backlog: list[bytes] = field(default_factory=list)  # aborts from before registering
    backend_ids: list[str] = field(default_factory=list)  # every prefill TP rank's endpoint
    expected: Counter[tuple[str, int]] = field(default_factory=Counter)
    """A room's notifications: one per (prefill rank's backend id, our TP rank) slice."""

    @property
    def name(self) -> str:
        host, port, dp_rank = self.key
        return f"{host}:{port}" + (f" (dp rank {dp_rank})" if self.dp_size > 1 else "")


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
        self.pending: Counter[tuple[str, int]] = Counter()

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
            self.pending = Counter(self.peer.expected)
            self._pages = len(page_ids)
            self._prealloc_at = time.monotonic()
            m.send(self.peer, pack("prealloc", room=self.room, pages=[int(p) for p in page_ids]))

    def arrived(self, sender: str, rank: int, token: int, logprob: float | None) -> None:
        """Manager lock held: the notification of one head slice (from prefill endpoint
        `sender` into our TP rank `rank`). Once every slice the plan names is in, on every
        rank, the room succeeds and prefill hears `done` (it frees its pages only then)."""
        key = (sender, rank)
        if self.pending[key] <= 0:
            return  # not a slice this room waits for (a duplicate, or a stranger's)
        self.pending[key] -= 1
        self.first_token, self.first_logprob = token, logprob
        if not +self.pending:
            self._finish(KVPoll.Success, None)
            self._m.send(self.peer, pack("done", room=self.room))

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

    def __init__(
        self,
        settings: DisaggSettings,
        pool: KVPool,
        host: str,
        place: TPPlace | None = None,
        tp_store: Any = None,
        rank_timeout: float = 300.0,
    ) -> None:
        """With tensor parallelism this is TP rank 0 (`place`): it registers every rank's
        transfer endpoint with each prefill (the follower ranks' agents say hello over
        `tp_store` first), and a room succeeds only once all ranks got all their heads --
        the followers' agents forward their notifications here, and rank 0 decides, as it
        decides every batch."""
        self.settings = settings
        self.lock = threading.RLock()
        self.place = place = place or TPPlace()
        self.auth = ControlAuth(settings.disaggregation_auth_token)
        warn_if_open(self.auth, host, "decode")
        side = TransferSide.open("decode", settings, pool, host, place)
        self.layout, self.spec, self.backend, self.stats = (
            side.layout,
            side.spec,
            side.backend,
            side.stats,
        )
        self.bytes_per_page = (
            len(self.layout.buffer_addrs) * self.layout.num_layers * self.layout.page_bytes
        )
        self.peers: dict[PeerKey, _Prefill] = {}
        self._dp_sizes: dict[tuple[str, int], int] = {}  # per prefill, once looked up
        self._by_backend_id: dict[str, _Prefill] = {}
        self._pool = ThreadPoolExecutor(
            settings.disaggregation_thread_pool_size, thread_name_prefix="pd-bootstrap"
        )
        self.io = IOLoop("pd-decode-control", self._tick, tick_s=0.05)
        self.link: RankLink | None = None
        try:
            self.backend.register_memory(self.layout.regions())
            self._blob = self.backend.describe()
            self.ranks = {
                0: RankEndpoint(
                    0, self.backend.local_id, self._blob, self.layout, self.spec.to_wire()
                )
            }
            if place.size > 1:
                self.link = RankLink(self.io, host, tp_store, place.size, self._on_rank)
            self.io.start()
            if self.link is not None:
                self.link.wait(rank_timeout)
                self.ranks.update(self.link.followers)
        except BaseException:
            self.close()
            raise

    def create_receiver(
        self, room: int, bootstrap_host: str, bootstrap_port: int | None
    ) -> KVReceiver:
        port = int(bootstrap_port or self.settings.disaggregation_bootstrap_port)
        with self.lock:
            # Until the prefill's dp size is known, its dp rank 0 (whose lookup tells it).
            dp_size = self._dp_sizes.get((bootstrap_host, port), 1)
            peer = self._peer((bootstrap_host, port, room % dp_size))
            old = peer.rooms.get(room)
            if old is not None:
                self.fail(old, f"room {room} was reused by a new request")
            receiver = peer.rooms[room] = KVReceiver(self, peer, room)
            return receiver

    def _peer(self, key: PeerKey) -> _Prefill:
        """Lock held: the peer of `key`, looked up in the background when new."""
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = _Prefill(key)
            self._pool.submit(self._bootstrap, peer)
        return peer

    def _learn_dp_size(self, peer: _Prefill, route: dict[str, Any]) -> str | None:
        """Lock held, after `peer`'s lookup: record the prefill's dp size; from dp rank 0,
        move the rooms it holds for other dp ranks to their peers. A reason when the
        answer does not fit the question."""
        host, port, dp_rank = peer.key
        dp_size, answered = route.get("dp_size", 1), route.get("dp_rank", 0)
        if not isinstance(dp_size, int) or not 0 < dp_size <= 4096 or answered != dp_rank:
            return (
                f"bootstrap server {host}:{port} answered dp rank {answered!r} of "
                f"{dp_size!r} when asked for dp rank {dp_rank}"
            )
        if peer.state == "failed":
            return None
        peer.dp_size = dp_size
        if dp_rank != 0:
            return None
        self._dp_sizes[(host, port)] = dp_size
        for room, receiver in list(peer.rooms.items()):
            if room % dp_size == 0:
                continue
            del peer.rooms[room]
            target = self._peer((host, port, room % dp_size))
            old = target.rooms.get(room)
            if old is not None:
                self.fail(old, f"room {room} was reused by a new request")
            receiver.peer, target.rooms[room] = target, receiver
            ready = target.state == "ready" and receiver.state == KVPoll.Bootstrapping
            if ready:
                receiver.state = KVPoll.WaitingForInput
        return None

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
            if peer.key[2] == 0:  # the next request looks the dp size up afresh
                self._dp_sizes.pop(peer.key[:2], None)
        for backend_id in {peer.backend_id, *peer.backend_ids}:
            if self._by_backend_id.get(backend_id) is peer:
                del self._by_backend_id[backend_id]
        sock = peer.sock
        if sock is not None:
            self.io.call(lambda: self.io.remove_socket(sock))

    def send(self, peer: _Prefill, frame: bytes) -> None:
        def do() -> None:
            if peer.sock is None and peer.state == "bootstrapping":
                peer.backlog.append(frame)
            elif peer.sock is not None and not peer.sock.closed:
                try:
                    peer.sock.send(self.auth.seal(TO_PREFILL, frame), flags=zmq.NOBLOCK)
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
                host, port, dp_rank = peer.key
                route = fetch_route(host, port, interval, self.auth, dp_rank or None)
                break
            except BootstrapRefused as exc:  # the same token will not do better next time
                self.stats.count("auth_refusals")
                with self.lock:
                    self.fail_peer(peer, str(exc))
                return
            except BootstrapError as exc:
                if time.monotonic() + 0.2 >= deadline:
                    with self.lock:
                        self.fail_peer(peer, str(exc))
                    return
                time.sleep(0.2)
        with self.lock:
            wrong = self._learn_dp_size(peer, route)
            if wrong is not None:
                self.fail_peer(peer, wrong)
                return
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
            self._plan(peer, route)
            register = pack(
                "register",
                protocol=PROTOCOL_VERSION,
                decode_id=self.backend.local_id,
                blob=self._blob,
                layout=asdict(self.layout),
                spec=self.spec.to_wire(),
                ranks=[r.to_wire() for r in sorted(self.ranks.values(), key=lambda r: r.rank)],
            )
            sock.send(self.auth.seal(TO_PREFILL, register), flags=zmq.NOBLOCK)
            for frame in peer.backlog:
                sock.send(self.auth.seal(TO_PREFILL, frame), flags=zmq.NOBLOCK)
            peer.backlog.clear()

    def _plan(self, peer: _Prefill, route: dict[str, Any]) -> None:
        """Which notifications a room from this prefill waits for: the same head and layer
        plan the prefill computes (pdcore.disagg.tp_plan), from its topology in `/route`. A plan
        that cannot be made leaves nothing expected; the prefill then refuses the
        registration, naming both sides' values."""
        ranks = route.get("ranks") or [
            {"rank": 0, "backend_id": route["backend_id"], "spec": route["spec"]}
        ]
        ids = {int(r["rank"]): str(r["backend_id"]) for r in ranks}
        peer.backend_ids = list(ids.values())
        try:
            plan = transfer_plan(
                [RankHeads.from_spec(r["spec"], int(r["rank"])) for r in ranks],
                [r.heads for r in self.ranks.values()],
            )
        except (KeyError, TypeError, ValueError):
            peer.expected = Counter()
            return
        peer.expected = Counter((ids[p.prefill_rank], p.decode_rank) for p in plan)

    def _on_rank(self, rank: int, msg: dict[str, Any]) -> None:
        """I/O thread: a follower rank's agent forwards the notifications it received."""
        if msg["type"] == "notes":
            notes = [Notification(str(s), bytes(p)) for s, p in msg["notes"]]
            self._on_notes(notes, rank)

    def _refused(self, peer: _Prefill, reason: str) -> None:
        self.fail_peer(peer, f"prefill {peer.name} refused this decode: {reason}")

    def _on_dealer(self, peer: _Prefill, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                frame = sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = unpack(self.auth.open(TO_DECODE, frame))
            except AuthError as exc:
                self.stats.count("auth_refusals")
                logger.warning(
                    "PD control plane: refused a message from prefill %s: %s", peer.name, exc
                )
                continue
            except MessageError as exc:
                logger.warning("PD control plane: %s", exc)
                continue
            with self.lock:
                try:
                    self._handle(peer, msg)
                except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # a bad field
                    logger.warning(
                        "PD control plane: refused a %r message: %s", msg["type"][:40], exc
                    )

    def _handle(self, peer: _Prefill, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        peer.last_pong, peer.misses = time.monotonic(), 0
        if kind == "registered":
            if not msg.get("ok"):
                return self._refused(peer, wire.reason(msg.get("reason")))
            peer.state = "ready"
            for backend_id in {peer.backend_id, *peer.backend_ids}:
                self._by_backend_id[backend_id] = peer
            for receiver in peer.rooms.values():
                if receiver.state == KVPoll.Bootstrapping:
                    receiver.state = KVPoll.WaitingForInput
        elif kind == "pong" and msg.get("instance") != peer.instance:
            self.fail_peer(peer, f"prefill {peer.name} restarted")
        elif kind == "abort":
            aborted = peer.rooms.get(wire.room(msg.get("room") or 0))
            if aborted is not None:
                self.fail(aborted, f"prefill {peer.name}: {wire.reason(msg.get('reason'))}")

    def drain_notifications(self) -> None:
        """Completion notifications: the KV of a room is in place, with its first token."""
        self._on_notes(self.backend.fetch_notifications(), 0)

    def _on_notes(self, notes: list[Notification], rank: int) -> None:
        """Notifications that arrived at our TP rank `rank` (0: this process)."""
        for note in notes:
            if is_part(note.payload):  # a slice of a room's KV; the room's own note follows
                continue
            try:
                room, token, logprob = unpack_done(self.auth.open(NOTIFY, note.payload))
            except AuthError as exc:
                self.stats.count("auth_refusals")
                logger.warning("PD: refused a notification from %s: %s", note.sender[:80], exc)
                continue
            except Exception:
                logger.warning("PD: malformed notification from %s", note.sender[:80])
                continue
            with self.lock:
                peer = self._by_backend_id.get(note.sender)
                receiver = peer.rooms.get(room) if peer is not None else None
                if receiver is not None and receiver.state == KVPoll.Transferring:
                    receiver.arrived(note.sender, rank, token, logprob)

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
                            self.stats.count("heartbeat_failures")
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

    def transfers_by_rank(self) -> dict[int, int]:
        """Rooms whose KV has not yet fully arrived, per TP rank it is still due on."""
        with self.lock:
            counts = dict.fromkeys(self.ranks, 0)
            for peer in self.peers.values():
                for receiver in peer.rooms.values():
                    if receiver.state == KVPoll.Transferring:
                        for rank in {r for _, r in +receiver.pending}:
                            counts[rank] = counts.get(rank, 0) + 1
            return counts

    def close(self) -> None:
        with self.lock:
            for peer in list(self.peers.values()):
                self.fail_peer(peer, "decode instance shutting down")
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.io.close()
        self.backend.close()
