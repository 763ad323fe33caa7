"""A transfer backend that moves nothing: every batch is done as soon as its notification is
handed to the peer, over a zmq PUSH/PULL pair on `config.host`.

Runs are still checked against both sides' registered memory, so a control-plane bug (a
page outside the pool, a batch spanning devices) shows up on one node just as it would with
a real transport. The PUSH socket queues only to a live connection (ZMQ_IMMEDIATE), so a
dead or absent peer leaves the batch pending, and pending past `config.timeout_s` is failed.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from pdcore.disagg.notify_channel import NotificationChannel
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
    checked_runs,
    failed,
)

BLOB_TAG = "pd-fake"
BLOB_VERSION = 1


@dataclass
class _Peer:
    socket: zmq.Socket[Any]
    blob: bytes
    regions: RegionTable


@dataclass
class _Batch:
    peer_id: str
    payload: bytes  # the notification to send
    deadline: float
    state: BatchState


def parse_blob(blob: bytes) -> tuple[str, RegionTable]:
    """(zmq endpoint, regions) from a peer blob; TransferError if it is not one."""
    try:
        data = msgpack.unpackb(blob, raw=False)
        if not isinstance(data, dict) or data.get("tag") != BLOB_TAG:
            raise ValueError("missing pd-fake tag")
        if data.get("version") != BLOB_VERSION:
            raise ValueError(f"blob version {data.get('version')}, expected {BLOB_VERSION}")
        endpoint = data["endpoint"]
        if not isinstance(endpoint, str):
            raise ValueError("endpoint is not a string")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise TransferError(f"not a pd-fake peer blob ({exc}); is the peer using fake?") from exc
    return endpoint, RegionTable.from_wire(data.get("regions", []))


class FakeBackend(TransferBackend):
    """See the module docstring. Thread-safe: zmq sockets are not, so one lock guards all."""

    contract_version = TRANSFER_CONTRACT_VERSION
    moves_bytes = False  # the conformance kit skips its byte checks for this backend

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._channel = NotificationChannel.for_host(config.host)
        self.endpoint = self._channel.endpoint
        self._regions = RegionTable()
        self._peers: dict[str, _Peer] = {}
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._closed = False

    def register_memory(self, regions: Sequence[MemoryRegion]) -> None:
        with self._lock:
            self._regions.add(regions)

    def describe(self) -> bytes:
        with self._lock:
            return msgpack.packb(
                {
                    "tag": BLOB_TAG,
                    "version": BLOB_VERSION,
                    "endpoint": self.endpoint,
                    "regions": self._regions.to_wire(),
                }
            )

    def connect(self, peer_id: str, blob: bytes) -> None:
        endpoint, regions = parse_blob(blob)
        with self._lock:
            old = self._peers.get(peer_id)
            if old is not None and old.blob == blob:
                return
            if old is not None:
                self._drop_peer(peer_id)
            sock = self._channel.open_outbox(peer_id, endpoint)
            self._peers[peer_id] = _Peer(sock, blob, regions)

    def disconnect(self, peer_id: str) -> None:
        with self._lock:
            self._drop_peer(peer_id)

    def _drop_peer(self, peer_id: str) -> None:
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.socket.close()

    def submit(self, peer_id: str, runs: RunsLike, notification: bytes) -> int:
        with self._lock:
            peer = self._peers.get(peer_id)
            if peer is None:
                raise TransferError(f"peer {peer_id!r} is not connected; call connect() first")
            checked_runs(runs, self._regions, peer.regions)
            batch = _Batch(
                peer_id, bytes(notification), time.monotonic() + self.config.timeout_s, PENDING
            )
            batch_id = next(self._ids)
            self._batches[batch_id] = batch
            self._advance(batch)
            return batch_id

    def _advance(self, batch: _Batch) -> None:
        """Try to hand the notification over; fail once the deadline has passed."""
        peer = self._peers.get(batch.peer_id)
        if peer is None:
            batch.state = failed(f"peer {batch.peer_id!r} was disconnected")
            return
        try:
            sent = self._channel.send(peer.socket, self.local_id, batch.payload)
        except TransferError as exc:
            batch.state = failed(f"peer {batch.peer_id!r}: {exc}")
            return
        if sent:
            batch.state = DONE
        elif time.monotonic() > batch.deadline:
            batch.state = failed(
                f"peer {batch.peer_id!r} unreachable for {self.config.timeout_s} s"
            )

    def poll(self, batch: int) -> BatchState:
        with self._lock:
            b = self._batches.get(batch)
            if b is None:
                raise TransferError(f"unknown batch {batch}")
            if not b.state.finished and not self._closed:
                self._advance(b)
            return b.state

    def fetch_notifications(self) -> list[Notification]:
        with self._lock:
            return [] if self._closed else self._channel.drain()

    def release(self, batch: int) -> None:
        with self._lock:
            self._batches.pop(batch, None)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for peer_id in list(self._peers):
                self._drop_peer(peer_id)
            self._batches.clear()
            self._channel.close()
