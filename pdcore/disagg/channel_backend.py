"""`ChannelBackend`: the skeleton shared by transfer backends whose transport only writes.

Most transports (Mooncake, memfabric, a plain socket) can put bytes into a peer's memory and
say when that is done, but cannot tell the peer about it. The contract needs more: a batch
table, a notification that reaches the receiver only after the data is in place, a deadline
after which a pending batch is failed, peers that come and go, release, close. Written once
per backend, that logic drifted apart (a backend whose peer restarted kept writing the old
peer's batches into the new one; after `close()` one backend reported batches failed, the
others forgot them), and DESIGN.md §3 says a backend is the data plane only. So this class
owns all of it, and a subclass says just::

    _open_peer(peer_id, blob) -> P    reach the peer described by its (parsed) blob
    _start_write(peer, runs) -> W     start writing these checked, coalesced runs to it
    _write_state(write) -> state      PENDING, DONE (every byte in place) or failed(reason)

plus, where its transport needs them, `_register` (hand memory to the library),
`_blob_fields`/`blob_schema` (what a peer needs to reach this endpoint), `_cancel_write`,
`_close_peer` and `_close_transport`. Backends with native notifications (NIXL) keep their
own implementation.

How one batch moves: `submit` checks the runs against both sides' registered memory
(`checked_runs`), calls `_start_write`, and files the batch. Every `poll` asks
`_write_state`; once it says DONE, the notification goes out over the shared zmq side
channel (`notify_channel.NotificationChannel`), which queues only to a live connection,
and the batch is DONE when the notification was handed over. A batch still pending after
`config.timeout_s` (its data or its notification) is failed and its write cancelled.
A dropped or replaced peer fails its pending batches at once.

The blob (`describe()`) is msgpack, never pickle (it comes from the network)::

    {"tag": blob_tag, "version": blob_version, **_blob_fields(), "notify": endpoint,
     "regions": [[addr, length, device], ...]}

Threading: one lock (`self._lock`) guards the tables and the zmq sockets, which are not
thread-safe. Hooks run under it unless their docstring says otherwise, so they must not
take it and should return promptly; `_open_peer`, `_close_peer` and `_close_transport` run
outside it, because dialling a peer or joining a thread may take a while.
"""

from __future__ import annotations

import abc
import itertools
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, cast

import msgpack
import zmq

from pdcore.disagg.notify_channel import NotificationChannel
from pdcore.disagg.transfer import (
    DONE,
    PENDING,
    BatchState,
    BatchStatus,
    MemoryRegion,
    Notification,
    RegionTable,
    RunArray,
    RunsLike,
    TransferBackend,
    TransferConfig,
    TransferError,
    checked_runs,
    failed,
)

__all__ = ["ChannelBackend", "PeerBlob", "check_reachable"]

PeerT = TypeVar("PeerT")
"""What `_open_peer` returns: the transport's handle on one peer (a session id, a socket)."""
WriteT = TypeVar("WriteT")
"""What `_start_write` returns: the transport's handle on one batch's writes."""


@dataclass(frozen=True)
class PeerBlob:
    """A peer's `describe()` blob, parsed: its notification inbox, its registered regions,
    and `fields`, the transport's own part (the blob's `blob_schema` keys by default)."""

    notify: str
    regions: RegionTable
    fields: Mapping[str, Any]


@dataclass
class _Peer(Generic[PeerT]):
    blob: bytes  # to tell a reconnect with the same blob (a no-op) from a restarted peer
    regions: RegionTable
    outbox: zmq.Socket[Any]
    transport: PeerT
    unsent: deque[_Batch[PeerT, Any]] = field(default_factory=deque)
    """Batches whose data is in place, in the order it landed, waiting for their
    notification: sent strictly in this order, so a receiver hears of its rooms in order."""


@dataclass
class _Batch(Generic[PeerT, WriteT]):
    peer_id: str
    peer: _Peer[PeerT]  # by identity: a replaced peer's batches never reach its successor
    notification: bytes
    deadline: float
    write: WriteT | None = None  # set by _start_write unless there are no runs (data_done)
    data_done: bool = False
    queued: bool = False  # in its peer's `unsent` line
    state: BatchState = PENDING


def check_reachable(peer_id: str, endpoint: str, timeout_s: float) -> None:
    """Open and close a TCP connection to `endpoint` ("host:port" or "tcp://host:port").
    For transports that connect lazily on the first write: a dead peer is refused at
    `connect`, naming it, instead of failing its first batch later."""
    host, _, port = endpoint.split("://", 1)[-1].rpartition(":")
    try:
        if not host or not port.isdigit():
            raise ValueError(f"not host:port: {endpoint!r}")
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise TransferError(
            f"cannot connect to peer {peer_id!r} at {endpoint}: {exc}; is it running and reachable?"
        ) from exc


class ChannelBackend(TransferBackend, Generic[PeerT, WriteT]):
    """See the module docstring. A subclass sets `contract_version` and `blob_tag`, and does
    whatever can fail in its `__init__` before calling `super().__init__`, so a failed start
    leaves no notification socket behind."""

    blob_tag: ClassVar[str]
    """Names the backend in its blob; a blob with another tag is refused at `connect`."""
    blob_version: ClassVar[int] = 1
    """Bump it when the blob or the transport's wire format changes."""
    blob_schema: ClassVar[Mapping[str, type]] = {}
    """The keys `_blob_fields` adds to the blob and their types, checked at `connect`."""
    region_table: ClassVar[type[RegionTable]] = RegionTable
    """The table registered regions go into (a subclass may restrict the devices)."""

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._regions = self.region_table()
        self._peers: dict[str, _Peer[PeerT]] = {}
        self._batches: dict[int, _Batch[PeerT, WriteT]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._channel = NotificationChannel.for_host(config.host)

    # --- what a subclass implements ---------------------------------------------------------

    @abc.abstractmethod
    def _open_peer(self, peer_id: str, blob: PeerBlob) -> PeerT:
        """Prepare to write to the peer described by `blob`; raise TransferError if it cannot
        be reached. Runs outside the lock: it may dial."""

    @abc.abstractmethod
    def _start_write(self, peer: PeerT, runs: RunArray) -> WriteT:
        """Start writing `runs` (coalesced, non-empty, inside both sides' registered memory)
        to `peer`; must not wait for them. An exception fails the batch."""

    @abc.abstractmethod
    def _write_state(self, write: WriteT) -> BatchState:
        """DONE once every byte of `write` is in the peer's memory, failed(reason) if it
        cannot be, else PENDING (this call may move the write on). An exception fails the
        batch. The deadline is the base class's business."""

    def _register(self, regions: Sequence[MemoryRegion]) -> None:
        """Hand new regions to the transport (already checked not to overlap); raise to
        refuse them."""

    def _blob_fields(self) -> dict[str, Any]:
        """What a peer needs to reach this endpoint's transport (keys of `blob_schema`)."""
        return {}

    def _cancel_write(self, write: WriteT) -> None:
        """Stop `write` where the transport can: its batch was released, timed out, lost
        its peer, or the backend is closing. Must not block."""

    def _close_peer(self, peer: PeerT) -> None:
        """Tear down what `_open_peer` set up. Runs outside the lock."""

    def _close_transport(self, unfinished: list[WriteT]) -> None:
        """Release the transport at `close()`, after every peer was closed. `unfinished`:
        writes still pending, already cancelled. Runs outside the lock, once."""

    # --- the blob ------------------------------------------------------------------------

    def _blob(self) -> bytes:
        """This endpoint's blob (see the module docstring); under the lock."""
        blob: bytes = msgpack.packb(
            {
                "tag": self.blob_tag,
                "version": self.blob_version,
                **self._blob_fields(),
                "notify": self._channel.endpoint,
                "regions": self._regions.to_wire(),
            }
        )
        return blob

    def _parse(self, blob: bytes) -> PeerBlob:
        """A peer's blob; TransferError, naming the backend expected, if it is not one."""
        try:
            data = msgpack.unpackb(blob, raw=False)
            if not isinstance(data, dict) or data.get("tag") != self.blob_tag:
                raise ValueError(f"no {self.blob_tag!r} tag")
            if data.get("version") != self.blob_version:
                raise ValueError(
                    f"blob version {data.get('version')}, expected {self.blob_version}"
                )
            for key, kind in {"notify": str, **self.blob_schema}.items():
                if not isinstance(data.get(key), kind):
                    raise ValueError(f"{key!r} missing or not a {kind.__name__}")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise TransferError(
                f"not a {self.blob_tag} peer blob ({exc}); does the peer use this backend?"
            ) from exc
        regions = self.region_table.from_wire(data.get("regions", []))
        return PeerBlob(data["notify"], regions, {k: data[k] for k in self.blob_schema})

    # --- the contract ----------------------------------------------------------------------

    def register_memory(self, regions: Sequence[MemoryRegion]) -> None:
        with self._lock:
            self._check_open()
            self.region_table([*self._regions, *regions])  # overlaps: before the transport
            self._register(regions)
            self._regions.add(regions)

    def describe(self) -> bytes:
        with self._lock:
            self._check_open()
            return self._blob()

    def connect(self, peer_id: str, blob: bytes) -> None:
        parsed = self._parse(blob)
        with self._lock:
            self._check_open()
            known = self._peers.get(peer_id)
            if known is not None and known.blob == blob:
                return
        transport = self._open_peer(peer_id, parsed)
        try:
            with self._lock:
                self._check_open()
                outbox = self._channel.open_outbox(peer_id, parsed.notify)
                old = self._drop_peer(peer_id, f"peer {peer_id!r} was replaced (new blob)")
                self._peers[peer_id] = _Peer(blob, parsed.regions, outbox, transport)
        except BaseException:
            self._close_peer(transport)
            raise
        if old is not None:
            self._close_peer(old.transport)

    def disconnect(self, peer_id: str) -> None:
        with self._lock:
            old = self._drop_peer(peer_id, f"peer {peer_id!r} was disconnected")
        if old is not None:
            self._close_peer(old.transport)

    def submit(self, peer_id: str, runs: RunsLike, notification: bytes) -> int:
        with self._lock:
            self._check_open()
            peer = self._peers.get(peer_id)
            if peer is None:
                raise TransferError(f"peer {peer_id!r} is not connected; call connect() first")
            arr = checked_runs(runs, self._regions, peer.regions)
            deadline = time.monotonic() + self.config.timeout_s
            b: _Batch[PeerT, WriteT] = _Batch(peer_id, peer, bytes(notification), deadline)
            if not len(arr):
                b.data_done = True  # nothing to move: the notification alone
            else:
                try:
                    b.write = self._start_write(peer.transport, arr)
                except Exception as exc:  # a transport failure: a failed poll, as the contract says
                    b.state = failed(f"write to peer {peer_id!r} failed: {_why(exc)}")
            batch_id = next(self._ids)
            self._batches[batch_id] = b
            self._advance(b)
            return batch_id

    def poll(self, batch: int) -> BatchState:
        with self._lock:
            b = self._batches.get(batch)
            if b is None:
                raise TransferError(f"unknown batch {batch}")
            self._advance(b)
            return b.state

    def fetch_notifications(self) -> list[Notification]:
        with self._lock:
            return [] if self._closed else self._channel.drain()

    def release(self, batch: int) -> None:
        """Forget a batch; one still pending is cancelled as far as the transport can (a
        write already under way may finish, and then no notification is sent)."""
        with self._lock:
            b = self._batches.pop(batch, None)
            if b is not None and not b.state.finished:
                self._cancel(b)
                b.state = failed("released")  # leaves its peer's notification line unsent

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unfinished = self._fail_where(lambda b: True, "the transfer backend was closed")
            peers = list(self._peers.values())
            self._peers.clear()
            for p in peers:
                p.outbox.close(linger=0)
        try:
            for p in peers:
                self._close_peer(p.transport)
            self._close_transport(unfinished)
        finally:
            with self._lock:
                self._channel.close()

    # --- internals (lock held) ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"the {self.blob_tag} transfer backend is closed")

    def _advance(self, b: _Batch[PeerT, WriteT]) -> None:
        """Move a pending batch on: data in place -> notification handed over -> DONE."""
        if b.state.finished:
            return
        if not b.data_done:
            try:
                state = self._write_state(cast(WriteT, b.write))  # set: runs were started
            except Exception as exc:
                state = failed(_why(exc))
            if state.status is BatchStatus.FAILED:
                b.state = failed(f"write to peer {b.peer_id!r} failed: {state.reason}")
                return
            b.data_done = state.status is BatchStatus.DONE
        if b.data_done:
            if not b.queued:
                b.peer.unsent.append(b)
                b.queued = True
            self._flush_notifications(b.peer)
            if b.state.finished:
                return
            # else no live connection to the receiver (yet): retry until the deadline
        if time.monotonic() > b.deadline:
            self._cancel(b)
            b.state = failed(
                f"peer {b.peer_id!r} unreachable: notification undelivered after "
                f"{self.config.timeout_s} s"
                if b.data_done
                else f"write to peer {b.peer_id!r} still pending after {self.config.timeout_s} s"
            )

    def _flush_notifications(self, peer: _Peer[PeerT]) -> None:
        """Hand over the peer's waiting notifications in order, until the channel has no
        live connection (the rest wait for the next poll). Failed or released batches are
        dropped from the line without a notification."""
        while peer.unsent:
            head = peer.unsent[0]
            if head.state.finished:
                peer.unsent.popleft()
                continue
            try:
                if not self._channel.send(peer.outbox, self.local_id, head.notification):
                    return
            except TransferError as exc:
                head.state = failed(f"notifying peer {head.peer_id!r} failed: {exc}")
            else:
                head.state = DONE
            peer.unsent.popleft()

    def _cancel(self, b: _Batch[PeerT, WriteT]) -> bool:
        """Cancel the batch's write if its data is not in place yet; whether it was."""
        if b.data_done:
            return False
        self._cancel_write(cast(WriteT, b.write))
        return True

    def _fail_where(
        self, pred: Callable[[_Batch[PeerT, WriteT]], bool], reason: str
    ) -> list[WriteT]:
        """Fail and cancel every pending batch matching `pred`; the writes cancelled."""
        cancelled: list[WriteT] = []
        for b in self._batches.values():
            if not b.state.finished and pred(b):
                if self._cancel(b):
                    cancelled.append(cast(WriteT, b.write))
                b.state = failed(reason)
        return cancelled

    def _drop_peer(self, peer_id: str, reason: str) -> _Peer[PeerT] | None:
        """Forget a peer, close its outbox and fail its pending batches with `reason`; the
        caller closes the returned peer's transport outside the lock."""
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.outbox.close(linger=0)
            self._fail_where(lambda b: b.peer is peer, reason)
        return peer


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
