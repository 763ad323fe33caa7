"""Prefill's half of the control plane: the bootstrap server, decode registrations, and one
KVSender per room (DESIGN.md §3; every transfer backend shares it).

A decode registers once (its backend blob and KV layout; a layout that differs from ours is
refused here, naming both values), then sends each room's page list. The engine's KVSender
sees the page list (WaitingForInput), sends the prompt's pages straight into decode's, and
polls the write without blocking. Timeouts, silent decodes and aborts fail rooms on the I/O
thread, and every failure is told to the decode so neither side waits for the other.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from pdcore.disagg import wire_checks as wire
from pdcore.disagg.auth import NOTIFY, TO_DECODE, TO_PREFILL, AuthError, ControlAuth, warn_if_open
from pdcore.disagg.bootstrap import BootstrapServer
from pdcore.disagg.kv_poll import KVPoll
from pdcore.disagg.messages import PROTOCOL_VERSION, MessageError, pack, pack_done, unpack
from pdcore.disagg.rank_channel import RankEndpoint, RankLink
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.tp_plan import HeadSlice, TPPlace, head_runs, transfer_plan
from pdcore.disagg.transfer import (
    BatchState,
    BatchStatus,
    KVLayout,
    RunArray,
    TransferError,
)
from pdcore.disagg.transfer_queues import SendJob, TransferQueues
from pdcore.disagg.transfer_side import TransferSide
from pdcore.disagg.wire_checks import WireError
from pdcore.model.kv_pool import KVPool

logger = logging.getLogger(__name__)


class _Mismatch(Exception):
    """A decode whose KV cache cannot be bridged to ours; the message names both sides."""


@dataclass
class _Decode:
    identity: bytes
    decode_id: str
    layout: KVLayout
    last_seen: float
    ranks: dict[int, RankEndpoint]  # the decode's TP ranks (rank 0 alone without TP)
    plan: list[HeadSlice]  # which of our ranks sends which heads to which of its ranks


class KVSender:
    """One room on prefill. Engine thread: `poll`, `send`, `abort`; I/O thread: the rest."""

    def __init__(self, manager: PrefillKVManager, room: int) -> None:
        self.room = room
        self.state = KVPoll.Bootstrapping
        self.failure_reason: str | None = None
        self.created = time.monotonic()
        self._m = manager
        self.decode: _Decode | None = None
        self.dst_pages: list[int] = []
        self._sent_at = 0.0
        self._bytes = 0
        self._parts_left = 0  # head slices (one per prefill rank -> decode rank) not yet done
        self._confirmed = False  # decode said every one of its ranks has its KV
        self._remote: list[tuple[int, int]] = []  # (TP rank, key) of follower ranks' writes

    def poll(self) -> KVPoll:
        """Non-blocking: the write is driven by its transfer queue's thread."""
        return self.state

    def send(self, page_ids: list[int], first_token: int, first_logprob: float | None) -> None:
        """Write the prompt's pages into decode's pre-allocated ones; the first token rides
        in the notification, which decode sees only after the bytes are in place."""
        with self._m.lock:
            if self.state != KVPoll.WaitingForInput:
                if self.state == KVPoll.Failed:
                    return
                raise RuntimeError(f"room {self.room}: send() in state {self.state.name}")
            assert self.decode is not None
            if len(page_ids) != len(self.dst_pages):
                self._m.fail(
                    self,
                    f"prefill has {len(page_ids)} pages for room {self.room}, decode "
                    f"pre-allocated {len(self.dst_pages)} (prompts differ?)",
                )
                return
            m = self._m
            try:
                done = m.auth.seal(NOTIFY, pack_done(self.room, first_token, first_logprob))
                parts = m.parts(self.decode, page_ids, self.dst_pages)
                self.state = KVPoll.Transferring
                self._parts_left = len(parts)
                self._bytes = sum(int(runs[:, 2].sum()) for _, _, runs in parts if len(runs))
                self._sent_at = time.monotonic()
                for rank, peer_id, runs in parts:
                    if rank == 0:  # our own pool: through our transfer queues
                        job = SendJob(
                            peer_id,
                            self.room,
                            runs,
                            done,
                            self._on_sent,
                            lambda: self.state != KVPoll.Transferring,
                        )
                        m.queues.put(job)
                    else:  # a follower's pool: its agent writes it
                        self._remote.append(
                            (rank, m.submit_remote(self, rank, peer_id, runs, done))
                        )
            except (TransferError, ValueError, TypeError, ArithmeticError) as exc:
                self.state = KVPoll.WaitingForInput  # so fail() sees an unfinished room
                m.fail(self, f"cannot send room {self.room}: {exc}")
                return

    def _on_sent(self, state: BatchState) -> None:
        """A transfer queue's thread (our slice) or the I/O thread (a follower rank's): one
        head slice's write ended. The room succeeds once every slice is written and decode
        confirmed that all its ranks have their KV; only then are the pages freed."""
        with self._m.lock:
            if self.state != KVPoll.Transferring:
                return  # failed meanwhile (timeout, abort): already reported
            if state.status is BatchStatus.DONE:
                self._parts_left -= 1
                self._maybe_done()
            else:
                self._m.fail(self, f"KV write to decode failed: {state.reason}")

    def confirm(self) -> None:
        """Lock held: decode's `done` for this room."""
        self._confirmed = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.state == KVPoll.Transferring and self._parts_left <= 0 and self._confirmed:
            self._finish(KVPoll.Success, None)

    def abort(self, reason: str) -> None:
        """Fail the room and tell decode (now, or when its page list comes)."""
        with self._m.lock:
            if not self.state.finished:
                self._m.fail(self, f"aborted on prefill: {reason}")

    def _finish(self, state: KVPoll, reason: str | None) -> None:
        """Lock held."""
        self.state, self.failure_reason = state, reason
        m = self._m
        if m.senders.get(self.room) is self:
            del m.senders[self.room]
        for rank, key in self._remote:  # follower writes still going: stop them
            if m.remote.pop(key, None) is not None and m.link is not None:
                m.link.send(rank, "cancel", key=key)
        ok = state == KVPoll.Success
        latency = time.monotonic() - self._sent_at if self._sent_at else 0.0
        m.stats.record(self.room, "prefill", ok, self._bytes if ok else 0, latency, reason)


class PrefillKVManager:
    """See the module docstring. `host`: the address this side binds and advertises.

    With tensor parallelism this is TP rank 0 (`place`), the one control plane of the
    instance: the follower ranks' transfer agents say hello over `tp_store` before the
    bootstrap server starts, so `/route` always answers the whole prefill topology, and a
    room's head slices go out from whichever ranks hold them (pdcore.disagg.tp_plan)."""

    def __init__(
        self,
        settings: DisaggSettings,
        pool: KVPool,
        host: str,
        place: TPPlace | None = None,
        tp_store: Any = None,
        rank_timeout: float = 300.0,
    ) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        self.place = place = place or TPPlace()
        self.auth = ControlAuth(settings.disaggregation_auth_token)
        warn_if_open(self.auth, host, "prefill")
        side = TransferSide.open("prefill", settings, pool, host, place)
        self.layout, self.spec, self.backend, self.stats = (
            side.layout,
            side.spec,
            side.backend,
            side.stats,
        )
        self.queues = TransferQueues(
            self.backend,
            self.lock,
            settings.disaggregation_queue_size,
            settings.disaggregation_thread_pool_size,
        )
        self.senders: dict[int, KVSender] = {}
        self._pending: dict[int, tuple[_Decode, list[int], float]] = {}  # page lists, no sender
        self._tombstones: dict[int, tuple[str, float]] = {}  # rooms failed before both met
        self._decodes: dict[bytes, _Decode] = {}
        self.instance = uuid.uuid4().hex
        self._last_cleanup = time.monotonic()
        self._http: BootstrapServer | None = None
        self.ranks = {
            0: RankEndpoint(0, self.backend.local_id, b"", self.layout, self.spec.to_wire())
        }
        self.link: RankLink | None = None
        self.remote: dict[int, KVSender] = {}  # follower writes in flight, by key
        self.rank_inflight: dict[int, int] = {}  # follower rank -> its writes in flight
        self._keys = itertools.count(1)
        from pdcore.disagg.io_loop import IOLoop

        self.io = IOLoop("pd-prefill-control", self._tick, tick_s=0.05)
        try:
            self.backend.register_memory(self.layout.regions())
            if place.size > 1:
                self.link = RankLink(self.io, host, tp_store, place.size, self._on_rank)
            self._router = self.io.ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 200)  # let aborts sent at close() leave
            self.io.add_socket(self._router, self._on_router)
            port = self._router.bind_to_random_port(f"tcp://{host}")
            self.endpoint = f"tcp://{host}:{port}"
            self.io.start()
            if self.link is not None:
                self.link.wait(rank_timeout)
                self.ranks.update(self.link.followers)
            self._http = BootstrapServer(
                host, settings.disaggregation_bootstrap_port, self.route, self.auth, self._refused
            )
        except BaseException:
            self.close()
            raise
        self.bootstrap_port = self._http.port

    def route(self, dp_rank: int | None = None) -> dict[str, Any] | None:
        """What GET /route tells a decode: where to register, and what we expect of it.
        This instance is one engine (dp rank 0); with --dp-size the HTTP server process
        answers for the replicas (pdcore.disagg.bootstrap.replica_routes)."""
        if dp_rank:
            return None
        return {
            "protocol": PROTOCOL_VERSION,
            "endpoint": self.endpoint,
            "instance": self.instance,
            "backend_id": self.backend.local_id,
            "spec": self.spec.to_wire(),
            # Every rank of this prefill (TP ranks; with --pp-size, every stage's): its KV
            # heads and layers (in its spec) and transfer endpoint.
            "tp_size": self.place.tp_size,
            "pp_size": self.place.pp_size,
            "ranks": [
                {"rank": r.rank, "backend_id": r.backend_id, "spec": r.spec}
                for r in sorted(self.ranks.values(), key=lambda r: r.rank)
            ],
        }

    def parts(
        self, decode: _Decode, page_ids: list[int], dst_pages: list[int]
    ) -> list[tuple[int, str, RunArray]]:
        """A room's writes: (our TP rank, the decode rank's backend id, runs) per head slice."""
        out = []
        for part in decode.plan:
            src, dst = self.ranks[part.prefill_rank], decode.ranks[part.decode_rank]
            runs = head_runs(
                src.layout,
                dst.layout,
                src.heads,
                dst.heads,
                part,
                self.spec.page_size,
                page_ids,
                dst_pages,
            )
            out.append((part.prefill_rank, dst.backend_id, runs))
        return out

    def submit_remote(
        self, sender: KVSender, rank: int, peer_id: str, runs: RunArray, note: bytes
    ) -> int:
        """Lock held: have follower `rank`'s agent write `runs` from its pool."""
        assert self.link is not None
        key = next(self._keys)
        self.remote[key] = sender
        raw = runs.astype("<u8").tobytes()
        self.link.send(
            rank, "submit", key=key, peer_id=peer_id, room=sender.room, runs=raw, note=note
        )
        return key

    def _on_rank(self, rank: int, msg: dict[str, Any]) -> None:
        """I/O thread: a follower rank's agent reports a write's end."""
        if msg["type"] != "state":
            return
        with self.lock:
            self.rank_inflight[rank] = int(msg.get("inflight") or 0)
            sender = self.remote.pop(int(msg["key"]), None)
            if sender is not None:
                reason = msg.get("reason")
                sender._on_sent(
                    BatchState(BatchStatus.DONE)
                    if msg.get("ok")
                    else BatchState(BatchStatus.FAILED, f"TP rank {rank}: {reason}")
                )

    def create_sender(self, room: int) -> KVSender:
        with self.lock:
            sender = KVSender(self, room)
            old = self.senders.get(room)
            if old is not None and not old.state.finished:
                self.fail(old, f"room {room} was reused by a new request")
            self.senders[room] = sender
            tomb = self._tombstones.pop(room, None)
            pending = self._pending.pop(room, None)
            if tomb is not None:
                sender._finish(KVPoll.Failed, tomb[0])
            elif pending is not None:
                self._bind(sender, pending[0], pending[1])
            return sender

    def _bind(self, sender: KVSender, decode: _Decode, pages: list[int]) -> None:
        sender.decode, sender.dst_pages = decode, pages
        sender.state = KVPoll.WaitingForInput

    def fail(self, sender: KVSender, reason: str, *, tell_decode: bool = True) -> None:
        """Lock held. Fail a room; decode hears of it now, or when its page list comes."""
        if sender.state.finished:
            return
        sender._finish(KVPoll.Failed, reason)
        if not tell_decode:
            return
        if sender.decode is not None:
            self._send(sender.decode.identity, pack("abort", room=sender.room, reason=reason))
        else:
            self._tombstones[sender.room] = (reason, time.monotonic())

    def _send(self, identity: bytes, frame: bytes) -> None:
        frame = self.auth.seal(TO_DECODE, frame)
        self.io.call(lambda: self._router.send_multipart([identity, frame], flags=zmq.NOBLOCK))

    def _refused(self, what: str, exc: AuthError) -> None:
        """A message or query that failed authentication: dropped, counted, logged."""
        self.stats.count("auth_refusals")
        logger.warning("PD control plane: refused %s: %s", what, exc)

    # --- I/O thread -----------------------------------------------------------------------

    def _on_router(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                identity, frame = sock.recv_multipart(flags=zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:
                continue  # not two frames: not ours
            try:  # before the message is even parsed: nothing from a stranger is used
                frame = self.auth.open(TO_PREFILL, frame)
            except AuthError as exc:
                self._refused(f"a control message from decode {identity.hex()}", exc)
                # Unsigned, so a decode without the token can read why and fail clearly.
                reason = f"prefill refused an unauthenticated control message: {exc}"
                with contextlib.suppress(zmq.ZMQError):
                    sock.send_multipart(
                        [identity, pack("registered", ok=False, reason=reason)],
                        flags=zmq.NOBLOCK,
                    )
                continue
            try:
                msg = unpack(frame)
            except MessageError as exc:
                logger.warning("PD control plane: %s", exc)
                continue
            with self.lock:
                try:
                    self._handle(identity, msg)
                except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # a bad field
                    logger.warning(
                        "PD control plane: refused a %r message: %s", msg["type"][:40], exc
                    )

    def _handle(self, identity: bytes, msg: dict[str, Any]) -> None:
        kind, now = msg["type"], time.monotonic()
        decode = self._decodes.get(identity)
        if decode is not None:
            decode.last_seen = now
        if kind == "register":
            self._register(identity, msg)
        elif kind == "ping":
            self._send(identity, pack("pong", instance=self.instance))
        elif kind == "abort":  # also from a decode we refused: its rooms fail here too
            # "aborted on decode": /metrics counts it as `aborted` (a client that went away)
            # unless the reason names a cause (heartbeat, waiting timeout, restart)
            reason = f"aborted on decode: {wire.reason(msg.get('reason'))}"
            room = wire.room(msg.get("room"))
            sender = self.senders.get(room)
            self._pending.pop(room, None)
            if sender is not None:
                self.fail(sender, reason, tell_decode=False)
            else:
                self._tombstones[room] = (reason, now)
        elif decode is None:
            reason = "this prefill does not know the decode instance (restarted?)"
            self._send(identity, pack("abort", room=msg.get("room"), reason=reason))
        elif kind == "done":  # decode: every one of its ranks has this room's KV
            sender = self.senders.get(wire.room(msg.get("room")))
            if sender is not None and sender.decode is decode:
                sender.confirm()
        elif kind == "prealloc":
            room = wire.room(msg.get("room"))
            pages = wire.pages(msg.get("pages"), decode.layout.num_pages)
            sender = self.senders.get(room)
            tomb = self._tombstones.pop(room, None)
            if tomb is not None:
                self._send(identity, pack("abort", room=room, reason=tomb[0]))
            elif sender is not None and sender.state == KVPoll.Bootstrapping:
                self._bind(sender, decode, pages)
            else:  # the request has not reached this prefill yet
                self._pending[room] = (decode, pages, now)

    def _register(self, identity: bytes, msg: dict[str, Any]) -> None:
        spec = msg.get("spec")
        reason = (
            self.spec.mismatch(spec)
            if isinstance(spec, dict)
            else "malformed registration: spec must be an object"
        )
        if msg.get("protocol") != PROTOCOL_VERSION:
            reason = (
                f"control protocol {wire.reason(msg.get('protocol'))[:40]}, prefill speaks "
                f"{PROTOCOL_VERSION}"
            )
        if reason is None:
            try:  # every field checked before the backend sees the peer's regions
                layout = wire.layout(msg.get("layout"))
                decode_id = wire.text(msg.get("decode_id"), "decode_id")
                blob = wire.blob(msg.get("blob"))
            except WireError as exc:
                reason = f"malformed registration: {exc}"
        ranks: dict[int, RankEndpoint] = {}
        plan: list[HeadSlice] = []
        if reason is None:
            try:  # the decode's TP ranks (just its rank 0 without TP), each checked
                ranks, plan = self._decode_ranks(msg, decode_id, blob, layout, spec or {})
            except (WireError, TypeError, KeyError, ValueError) as exc:
                reason = f"malformed registration: {exc}"
            except _Mismatch as exc:
                reason = str(exc)
        if reason is None:
            try:
                self._connect_ranks(ranks, plan)
            except (TransferError, TypeError, KeyError, ValueError) as exc:
                reason = f"prefill cannot connect to the decode's transfer backend: {exc}"
        if reason is not None:
            logger.warning(
                "PD: refused decode %s: %s", wire.reason(msg.get("decode_id"))[:80], reason
            )
            self._send(identity, pack("registered", ok=False, reason=reason))
            return
        self._decodes[identity] = _Decode(
            identity, decode_id, layout, time.monotonic(), ranks, plan
        )
        self._send(identity, pack("registered", ok=True, instance=self.instance))

    def _decode_ranks(
        self,
        msg: dict[str, Any],
        decode_id: str,
        blob: bytes,
        layout: KVLayout,
        spec: dict[str, Any],
    ) -> tuple[dict[int, RankEndpoint], list[HeadSlice]]:
        """The registering decode's TP ranks and the head slices our ranks send them.
        _Mismatch names both sides' values when a rank's KV cannot be bridged."""
        raw = msg.get("ranks")
        if raw is None:  # a decode without TP
            ranks = {0: RankEndpoint(0, decode_id, blob, layout, spec)}
        else:
            if not isinstance(raw, list) or not 0 < len(raw) <= 4096:
                raise WireError("ranks must be a non-empty list")
            ranks = {}
            for item in raw:
                if not isinstance(item, dict) or not isinstance(item.get("spec"), dict):
                    raise WireError("each rank must be an object with a spec")
                r = RankEndpoint(
                    int(item["rank"]),
                    wire.text(item.get("backend_id"), "backend_id"),
                    wire.blob(item.get("blob")),
                    wire.layout(item.get("layout")),
                    dict(item["spec"]),
                )
                ranks[r.rank] = r
        for r in ranks.values():
            why = self.spec.mismatch(r.spec)
            if why is not None:
                raise _Mismatch(f"decode TP rank {r.rank}: {why}")
        try:
            plan = transfer_plan(
                [p.heads for p in self.ranks.values()], [d.heads for d in ranks.values()]
            )
        except ValueError as exc:
            tp = max(int(r.spec.get("tp_size") or 1) for r in ranks.values())
            pp = max(int(r.spec.get("pp_size") or 1) for r in ranks.values())
            raise _Mismatch(
                f"prefill and decode KV heads do not meet ({exc}; prefill tp "
                f"{self.place.tp_size} pp {self.place.pp_size}, decode tp {tp} pp {pp})"
            ) from exc
        return ranks, plan

    def _connect_ranks(self, ranks: dict[int, RankEndpoint], plan: list[HeadSlice]) -> None:
        """Each of our ranks in the plan connects to the decode ranks it writes to; a
        follower that cannot fails its writes to that peer (with the reason) later."""
        for src, dst in sorted({(p.prefill_rank, p.decode_rank) for p in plan}):
            peer = ranks[dst]
            if src == 0:
                self.backend.connect(peer.backend_id, peer.blob)
            else:
                assert self.link is not None
                self.link.send(src, "connect", peer_id=peer.backend_id, blob=peer.blob)

    def _tick(self) -> None:
        """Timeouts, silent decodes (missed heartbeats), and stale-entry cleanup."""
        s, now = self.settings, time.monotonic()
        silent = s.disaggregation_heartbeat_interval * (s.disaggregation_heartbeat_max_failure + 1)
        dead: set[str] = set()  # decodes found silent in this tick (counted once each)
        with self.lock:
            for sender in list(self.senders.values()):
                if sender.state == KVPoll.Bootstrapping:
                    if now - sender.created > s.disaggregation_bootstrap_timeout:
                        self.fail(
                            sender,
                            f"no page list from a decode instance within "
                            f"{s.disaggregation_bootstrap_timeout:g} s (bootstrap timeout)",
                        )
                    continue
                if sender.state == KVPoll.Transferring:
                    sender.poll()
                if sender.decode is not None and now - sender.decode.last_seen > silent:
                    if sender.decode.decode_id not in dead:
                        dead.add(sender.decode.decode_id)
                        self.stats.count("heartbeat_failures")
                    self.fail(
                        sender,
                        f"decode {sender.decode.decode_id} silent for {silent:g} s "
                        "(missed heartbeats; is it dead?)",
                    )
            if now - self._last_cleanup >= s.disaggregation_bootstrap_entry_cleanup_interval:
                self._last_cleanup = now
                self._cleanup(now)

    def _cleanup(self, now: float) -> None:
        """Drop page lists whose request never came, old records of failed rooms, and
        decodes that have not pinged for the bootstrap timeout (restarted or gone)."""
        limit = self.settings.disaggregation_bootstrap_timeout
        for room, (decode, _, t) in list(self._pending.items()):
            if now - t > limit:
                del self._pending[room]
                reason = f"the request never reached this prefill within {limit:g} s"
                self._send(decode.identity, pack("abort", room=room, reason=reason))
        for room, (_, t) in list(self._tombstones.items()):
            if now - t > limit:
                del self._tombstones[room]
        bound = {id(x.decode) for x in self.senders.values()}
        for identity, decode in list(self._decodes.items()):
            if now - decode.last_seen > limit and id(decode) not in bound:  # gone for good
                del self._decodes[identity]
                for src, dst in {(p.prefill_rank, p.decode_rank) for p in decode.plan}:
                    peer_id = decode.ranks[dst].backend_id
                    if src == 0:
                        self.queues.forget(peer_id)
                        self.backend.disconnect(peer_id)
                    elif self.link is not None:
                        self.link.send(src, "disconnect", peer_id=peer_id)

    # --- engine-facing --------------------------------------------------------------------

    def tick(self) -> None:
        """Engine thread, every iteration: report ended rooms to observation hooks (the I/O
        thread runs the timeouts)."""
        self.stats.emit_events()

    def metrics(self, drain_samples: bool = False) -> dict[str, Any]:
        return self.stats.snapshot(drain_samples)

    def transfers_by_rank(self) -> dict[int, int]:
        """Writes in flight per TP rank: rank 0's rooms still sending, and each follower's
        writes as its agent last reported them (and as rank 0 has asked for since)."""
        with self.lock:
            counts = dict.fromkeys(self.ranks, 0)
            counts[0] = sum(s.state == KVPoll.Transferring for s in self.senders.values())
            for rank in self.rank_inflight:
                counts[rank] = max(self.rank_inflight[rank], 0)
            for sender in self.remote.values():
                for rank, key in sender._remote:
                    if key in self.remote:
                        counts[rank] = max(counts[rank], 1)
            return counts

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        with self.lock:
            for sender in list(self.senders.values()):
                self.fail(sender, "prefill instance shutting down")
        self.io.close()
        self.queues.close()
        self.backend.close()
