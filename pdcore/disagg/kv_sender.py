"""Prefill's half of the control plane: the bootstrap server, decode registrations, and one
KVSender per room (DESIGN.md §3; every transfer backend shares it).

A decode registers once (its backend blob and KV layout; a layout that differs from ours is
refused here, naming both values), then sends each room's page list. The engine's KVSender
sees the page list (WaitingForInput), sends the prompt's pages straight into decode's, and
polls the write without blocking. Timeouts, silent decodes and aborts fail rooms on the I/O
thread, and every failure is told to the decode so neither side waits for the other.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq

from pdcore.disagg.bootstrap import BootstrapServer
from pdcore.disagg.kv_poll import KVPoll
from pdcore.disagg.messages import PROTOCOL_VERSION, MessageError, pack, pack_done, unpack
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.transfer import (
    BatchState,
    BatchStatus,
    KVLayout,
    TransferError,
    kv_page_runs,
)
from pdcore.disagg.transfer_queues import SendJob, TransferQueues
from pdcore.disagg.transfer_side import TransferSide
from pdcore.model.kv_pool import KVPool

logger = logging.getLogger(__name__)


@dataclass
class _Decode:
    identity: bytes
    decode_id: str
    layout: KVLayout
    last_seen: float


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
                runs = kv_page_runs(m.layout, self.decode.layout, page_ids, self.dst_pages)
                done = pack_done(self.room, first_token, first_logprob)
                job = SendJob(
                    self.decode.decode_id,
                    self.room,
                    runs,
                    done,
                    self._on_sent,
                    lambda: self.state != KVPoll.Transferring,
                )
                self.state = KVPoll.Transferring
                self._bytes = int(runs[:, 2].sum()) if len(runs) else 0
                self._sent_at = time.monotonic()
                m.queues.put(job)
            except (TransferError, ValueError) as exc:
                self.state = KVPoll.WaitingForInput  # so fail() sees an unfinished room
                m.fail(self, f"cannot send room {self.room}: {exc}")
                return

    def _on_sent(self, state: BatchState) -> None:
        """The transfer queue's thread: the write ended."""
        with self._m.lock:
            if self.state != KVPoll.Transferring:
                return  # failed meanwhile (timeout, abort): already reported
            if state.status is BatchStatus.DONE:
                self._finish(KVPoll.Success, None)
            else:
                self._m.fail(self, f"KV write to decode failed: {state.reason}")

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
        ok = state == KVPoll.Success
        latency = time.monotonic() - self._sent_at if self._sent_at else 0.0
        m.stats.record(self.room, "prefill", ok, self._bytes if ok else 0, latency, reason)


class PrefillKVManager:
    """See the module docstring. `host`: the address this side binds and advertises."""

    def __init__(self, settings: DisaggSettings, pool: KVPool, host: str) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        side = TransferSide.open("prefill", settings, pool, host)
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
        from pdcore.disagg.io_loop import IOLoop

        self.io = IOLoop("pd-prefill-control", self._tick, tick_s=0.05)
        try:
            self.backend.register_memory(self.layout.regions())
            self._router = self.io.ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 200)  # let aborts sent at close() leave
            self.io.add_socket(self._router, self._on_router)
            port = self._router.bind_to_random_port(f"tcp://{host}")
            self.endpoint = f"tcp://{host}:{port}"
            self.io.start()
            self._http = BootstrapServer(host, settings.disaggregation_bootstrap_port, self.route)
        except BaseException:
            self.close()
            raise
        self.bootstrap_port = self._http.port

    def route(self) -> dict[str, Any]:
        """What GET /route tells a decode: where to register, and what we expect of it."""
        return {
            "protocol": PROTOCOL_VERSION,
            "endpoint": self.endpoint,
            "instance": self.instance,
            "backend_id": self.backend.local_id,
            "spec": self.spec.to_wire(),
        }

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
        self.io.call(lambda: self._router.send_multipart([identity, frame], flags=zmq.NOBLOCK))

    # --- I/O thread -----------------------------------------------------------------------

    def _on_router(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                identity, frame = sock.recv_multipart(flags=zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:
                continue  # not two frames: not ours
            try:
                msg = unpack(frame)
            except MessageError as exc:
                logger.warning("PD control plane: %s", exc)
                continue
            with self.lock:
                try:
                    self._handle(identity, msg)
                except (KeyError, TypeError, ValueError) as exc:  # a malformed field
                    logger.warning("PD control plane: bad %r message: %r", msg["type"], exc)

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
            room, reason = int(msg["room"]), f"decode: {msg.get('reason')}"
            sender = self.senders.get(room)
            self._pending.pop(room, None)
            if sender is not None:
                self.fail(sender, reason, tell_decode=False)
            else:
                self._tombstones[room] = (reason, now)
        elif decode is None:
            reason = "this prefill does not know the decode instance (restarted?)"
            self._send(identity, pack("abort", room=msg.get("room"), reason=reason))
        elif kind == "prealloc":
            room, pages = int(msg["room"]), [int(p) for p in msg["pages"]]
            sender = self.senders.get(room)
            tomb = self._tombstones.pop(room, None)
            if tomb is not None:
                self._send(identity, pack("abort", room=room, reason=tomb[0]))
            elif sender is not None and sender.state == KVPoll.Bootstrapping:
                self._bind(sender, decode, pages)
            else:  # the request has not reached this prefill yet
                self._pending[room] = (decode, pages, now)

    def _register(self, identity: bytes, msg: dict[str, Any]) -> None:
        reason = self.spec.mismatch(msg.get("spec") or {})
        if msg.get("protocol") != PROTOCOL_VERSION:
            reason = f"control protocol {msg.get('protocol')}, prefill speaks {PROTOCOL_VERSION}"
        if reason is None:
            try:
                layout = KVLayout(**msg["layout"])
                self.backend.connect(str(msg["decode_id"]), bytes(msg["blob"]))
            except (TransferError, TypeError, KeyError) as exc:
                reason = f"prefill cannot connect to the decode's transfer backend: {exc}"
        if reason is not None:
            logger.warning("PD: refused decode %s: %s", msg.get("decode_id"), reason)
            self._send(identity, pack("registered", ok=False, reason=reason))
            return
        decode_id = str(msg["decode_id"])
        self._decodes[identity] = _Decode(identity, decode_id, layout, time.monotonic())
        self._send(identity, pack("registered", ok=True, instance=self.instance))

    def _tick(self) -> None:
        """Timeouts, silent decodes (missed heartbeats), and stale-entry cleanup."""
        s, now = self.settings, time.monotonic()
        silent = s.disaggregation_heartbeat_interval * (s.disaggregation_heartbeat_max_failure + 1)
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
                self.queues.forget(decode.decode_id)
                self.backend.disconnect(decode.decode_id)

    # --- engine-facing --------------------------------------------------------------------

    def tick(self) -> None:
        """Engine thread, every iteration: report ended rooms to observation hooks (the I/O
        thread runs the timeouts)."""
        self.stats.emit_events()

    def metrics(self, drain_samples: bool = False) -> dict[str, Any]:
        return self.stats.snapshot(drain_samples)

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
