"""The Mooncake data plane: pdcore's transfer contract on a `mooncake.engine.TransferEngine`.

One engine per backend, started in P2PHANDSHAKE mode (no etcd): a peer is named by the
"host:rpc_port" session id its engine listens on. Mooncake binds its RPC and TCP ports on
all interfaces (0.0.0.0), whatever `--host` says.

Each coalesced run is posted as its own one-run `batch_transfer_async_write` and polled
with `transfer_check_status`, at most MAX_RUNS_IN_FLIGHT at a time. Not one multi-run batch:
measured here (0.3.13.post1, TCP), the status of a multi-run batch turns "done" while later
runs are still in flight, which would let a notification overtake its data; one-run batches
report truthfully and cost no more (46 MB in 60 runs: ~1 GB/s either way).

Mooncake has no notification channel, so the receiver also binds a zmq PULL socket on
`config.host` and advertises it in its blob next to its session id and region table. When
`poll` sees a batch's write return, the sender pushes the notification over zmq, so the
receiver learns of a batch only after its data is in place. The PUSH socket queues only to
a live connection (ZMQ_IMMEDIATE): a dead receiver leaves the notification unsent and the
batch pending, and a batch pending past `config.timeout_s` is reported failed; Mooncake's
own failures (a refused connection, its MC_TRANSFER_TIMEOUT) fail the batch at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from pd_mooncake.settings import MooncakeSettings
from pdcore.disagg.notify_channel import NotificationChannel, advertised_host
from pdcore.disagg.transfer import (
    DONE,
    PENDING,
    TRANSFER_CONTRACT_VERSION,
    BatchState,
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

logger = logging.getLogger(__name__)

BLOB_TAG = "pd-mooncake"
BLOB_VERSION = 1
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PROTOCOLS = {"NVLINK": "nvlink", "INTRA_NODE_NVLINK": "nvlink", "BAREX": "barex"}
MAX_RUNS_IN_FLIGHT = 512
"""Runs posted and not yet complete, per batch. Mooncake's TCP transport rejects requests
beyond its lane queue ("TCP lane queue-full rejection", seen here with 7,500 runs at once, a
batch that then never completed), so a larger batch is posted as earlier runs finish."""


@dataclass
class _Peer:
    session: str
    notify: zmq.Socket[Any]
    blob: bytes
    regions: RegionTable


@dataclass
class _Batch:
    peer_id: str
    runs: RunArray
    posted: int  # runs[:posted] have been handed to Mooncake
    in_flight: list[int]  # Mooncake batch ids of posted runs not yet complete
    notification: bytes
    deadline: float
    state: BatchState
    data_done: bool = False


def _import_engine() -> Any:
    try:
        from mooncake.engine import TransferEngine
    except Exception as exc:  # a broken install surfaces here, not deep in a request
        raise TransferError(
            "mooncake cannot be imported: install pd-mooncake[cpu] (CPU) or "
            f"pd-mooncake[cuda]: {type(exc).__name__}: {exc}"
        ) from exc
    return TransferEngine


def choose_protocol(custom_mem_pool: str, ib_device: str | None) -> tuple[str, str]:
    """(Mooncake protocol, device filter) from SGLang's settings: a custom memory pool picks
    its transport; an IB device that exists here picks RDMA; anything else is TCP."""
    if custom_mem_pool:
        return _PROTOCOLS[custom_mem_pool], ib_device or ""
    if ib_device:
        missing = [
            d
            for d in ib_device.split(",")
            if not os.path.exists(f"/sys/class/infiniband/{d.strip()}")
        ]
        if not missing:
            return "rdma", ib_device
        logger.warning(
            "--disaggregation-ib-device %s: no such RDMA device here (%s); Mooncake uses TCP",
            ib_device,
            ", ".join(missing),
        )
    return "tcp", ""


def parse_blob(blob: bytes) -> tuple[str, str, RegionTable]:
    """(Mooncake session id, zmq notify endpoint, regions) from a peer blob; TransferError
    if it is not one."""
    try:
        data = msgpack.unpackb(blob, raw=False)
        if not isinstance(data, dict) or data.get("tag") != BLOB_TAG:
            raise ValueError("missing pd-mooncake tag")
        if data.get("version") != BLOB_VERSION:
            raise ValueError(f"blob version {data.get('version')}, expected {BLOB_VERSION}")
        session, notify = data["session"], data["notify"]
        if not isinstance(session, str) or not isinstance(notify, str):
            raise ValueError("session or notify endpoint of the wrong type")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise TransferError(
            f"not a pd-mooncake peer blob ({exc}); is the peer using mooncake?"
        ) from exc
    return session, notify, RegionTable.from_wire(data.get("regions", []))


class MooncakeBackend(TransferBackend):
    """See the module docstring. Thread-safe: one lock guards the engine and the tables."""

    contract_version = TRANSFER_CONTRACT_VERSION

    def __init__(self, config: TransferConfig, settings: MooncakeSettings | None = None) -> None:
        super().__init__(config)
        engine_cls = _import_engine()
        settings = settings or MooncakeSettings()
        self.protocol, device = choose_protocol(settings.mooncake_custom_mem_pool, config.ib_device)
        host = advertised_host(config.host)
        if config.host in _LOOPBACK:
            logger.warning(
                "Mooncake listens on all interfaces (0.0.0.0), not only on --host %s: "
                "anyone who can reach this machine can reach its transfer engine port",
                config.host,
            )
        self._engine = engine_cls()
        ret = self._engine.initialize(host, "P2PHANDSHAKE", self.protocol, device)
        if ret != 0:
            raise TransferError(
                f"Mooncake failed to start ({self.protocol}, device {device or 'any'}): "
                f"initialize returned {ret}"
            )
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._lock = threading.Lock()
        self._channel = NotificationChannel.for_host(config.host)
        self.notify_endpoint = self._channel.endpoint
        self._regions = RegionTable()
        self._registered: list[int] = []
        self._peers: dict[str, _Peer] = {}
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._closed = False

    # --- memory and peers ---------------------------------------------------------------

    def register_memory(self, regions: Sequence[MemoryRegion]) -> None:
        with self._lock:
            RegionTable([*self._regions, *regions])  # refuses overlaps before Mooncake sees any
            for r in regions:
                ret = self._engine.register_memory(r.addr, r.length)
                if ret != 0:
                    raise TransferError(f"Mooncake could not register {r}: returned {ret}")
                self._registered.append(r.addr)
                self._regions.add([r])

    def describe(self) -> bytes:
        with self._lock:
            return msgpack.packb(
                {
                    "tag": BLOB_TAG,
                    "version": BLOB_VERSION,
                    "session": self.session,
                    "notify": self.notify_endpoint,
                    "regions": self._regions.to_wire(),
                }
            )

    def connect(self, peer_id: str, blob: bytes) -> None:
        session, notify, regions = parse_blob(blob)
        with self._lock:
            old = self._peers.get(peer_id)
            if old is not None and old.blob == blob:
                return
            if old is not None:
                self._drop_peer(peer_id)
            host, _, port = session.rpartition(":")
            try:  # Mooncake connects lazily on the first write; refuse a dead peer now
                socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            except (OSError, ValueError) as exc:
                raise TransferError(
                    f"cannot connect to peer {peer_id!r} (Mooncake session {session}): {exc}; "
                    "is it running and reachable?"
                ) from exc
            sock = self._channel.open_outbox(peer_id, notify)
            self._peers[peer_id] = _Peer(session, sock, blob, regions)

    def disconnect(self, peer_id: str) -> None:
        with self._lock:
            self._drop_peer(peer_id)

    def _drop_peer(self, peer_id: str) -> None:
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.notify.close(linger=0)

    # --- batches --------------------------------------------------------------------------

    def submit(self, peer_id: str, runs: RunsLike, notification: bytes) -> int:
        with self._lock:
            peer = self._peers.get(peer_id)
            if peer is None:
                raise TransferError(f"peer {peer_id!r} is not connected; call connect() first")
            arr = checked_runs(runs, self._regions, peer.regions)
            batch_id = next(self._ids)
            b = _Batch(
                peer_id,
                arr,
                0,
                [],
                bytes(notification),
                time.monotonic() + self.config.timeout_s,
                PENDING,
                data_done=not len(arr),
            )
            self._batches[batch_id] = b
            self._advance(b)
            return batch_id

    def _advance(self, b: _Batch) -> None:
        """Move a pending batch on: data complete -> notification pushed -> done."""
        if not b.data_done:
            peer = self._peers.get(b.peer_id)
            if peer is None:
                b.state = failed(f"peer {b.peer_id!r} was disconnected mid-batch")
                return
            error = self._progress_writes(b, peer)
            if error:
                b.state = failed(f"write to peer {b.peer_id!r} failed: {error}")
                return
            b.data_done = b.posted == len(b.runs) and not b.in_flight
        if b.data_done:
            peer = self._peers.get(b.peer_id)
            if peer is None:
                b.state = failed(f"peer {b.peer_id!r} was disconnected before notification")
                return
            try:
                if self._channel.send(peer.notify, self.local_id, b.notification):
                    b.state = DONE
                    return
                # else no live connection to the receiver (yet): retry until the deadline
            except TransferError as exc:
                b.state = failed(f"notifying peer {b.peer_id!r} failed: {exc}")
                return
        if time.monotonic() > b.deadline:
            stage = "notification" if b.data_done else "write"
            b.state = failed(
                f"{stage} to peer {b.peer_id!r} still pending after {self.config.timeout_s} s"
            )

    def _progress_writes(self, b: _Batch, peer: _Peer) -> str | None:
        """Reap completed runs, post more up to MAX_RUNS_IN_FLIGHT; why it failed, or None."""
        still = []
        for mc in b.in_flight:
            try:
                status = self._engine.transfer_check_status(mc)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            if status < 0:
                what = "timed out in Mooncake" if status == -2 else "failed in Mooncake"
                return f"a run {what} (status {status}; peer gone?)"
            if status == 0:
                still.append(mc)
        b.in_flight = still
        while b.posted < len(b.runs) and len(b.in_flight) < MAX_RUNS_IN_FLIGHT:
            local, remote, length = (int(x) for x in b.runs[b.posted])
            try:
                mc = self._engine.batch_transfer_async_write(
                    peer.session, [local], [remote], [length]
                )
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            if mc <= 0:  # Mooncake answers 0 (or < 0) when it cannot post, e.g. refused
                return f"Mooncake could not post a run (returned {mc}; peer gone?)"
            b.posted += 1
            b.in_flight.append(mc)
        return None

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
            # Runs not yet posted are dropped; Mooncake cannot cancel a posted one.
            self._batches.pop(batch, None)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._batches.clear()
            for peer_id in list(self._peers):
                self._drop_peer(peer_id)
            for addr in self._registered:
                try:
                    self._engine.unregister_memory(addr)
                except Exception as exc:
                    logger.warning("Mooncake unregister failed: %s", exc)
            self._registered.clear()
            self._channel.close()
            self._engine = None
