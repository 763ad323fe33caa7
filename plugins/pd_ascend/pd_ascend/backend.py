"""The Ascend data plane: pdcore's transfer contract on memfabric-hybrid or on Mooncake's
Ascend transport (engines.py picks one as SGLang does).

The transport starts at the first `register_memory`, on the NPU the regions live on
("npu:N"): both transports must know their device when they initialize, and the regions are
where pdcore says it. Every region must be NPU memory on that one device.

Both transports write with a blocking `batch_transfer_sync_write`, so each batch runs on a
small thread pool (the engine loop never waits); each worker thread makes the NPU current
first. When a batch's writes have all returned 0 the data is in place, and `poll` then pushes
the notification over pdcore's zmq side channel (neither transport has one), so a receiver
never learns of a batch before its data. A batch still pending after `config.timeout_s` is
reported failed; a blocking write cannot be cancelled, so its thread finishes on its own.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from pd_ascend.engines import (
    Engine,
    import_memfabric,
    import_mooncake,
    set_npu_device,
    start_engine,
)
from pd_ascend.settings import MOONCAKE, load_settings, mf_role
from pd_ascend.wire import (
    PeerInfo,
    Region,
    Regions,
    check_peer_matches,
    decode_blob,
    encode_blob,
    host_port,
    parse_ascend_device,
    split_calls,
)
from pdcore.disagg.notify_channel import NotificationChannel, advertised_host
from pdcore.disagg.transfer import (
    DONE,
    PENDING,
    TRANSFER_CONTRACT_VERSION,
    BatchState,
    MemoryRegion,
    Notification,
    RunArray,
    RunsLike,
    TransferBackend,
    TransferConfig,
    TransferError,
    checked_runs,
    failed,
)

logger = logging.getLogger(__name__)


def npu_index_of(regions: Sequence[Region]) -> int:
    """The one NPU all these regions are on; TransferError for CPU memory or several NPUs."""
    kinds = {parse_ascend_device(r.device) for r in regions}
    if any(kind != "npu" for kind, _ in kinds):
        raise TransferError(
            "the ascend backend moves NPU memory (npu:N): a CPU KV pool is moved by the "
            "mooncake or nixl backend"
        )
    if len(kinds) != 1:
        raise TransferError(f"one ascend backend serves one NPU, got {sorted(kinds)}")
    return next(iter(kinds))[1]


@dataclass
class _Peer:
    info: PeerInfo
    blob: bytes
    notify: zmq.Socket[Any]


@dataclass
class _Batch:
    peer_id: str
    notification: bytes
    deadline: float
    future: cf.Future[str | None] | None
    cancel: threading.Event = field(default_factory=threading.Event)
    state: BatchState = PENDING
    data_done: bool = False


class AscendBackend(TransferBackend):
    """See the module docstring. Thread-safe: one lock guards the tables and the channel."""

    contract_version = TRANSFER_CONTRACT_VERSION

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        try:
            self.settings = load_settings()
        except ValueError as exc:
            raise TransferError(f"ascend backend: {exc}") from exc
        mooncake = self.settings.transport == MOONCAKE
        if mooncake:  # a missing or broken install fails here, not at the first request
            import_mooncake()
        else:
            import_memfabric()
        self.transport = self.settings.transport
        self.protocol = "ascend" if mooncake else self.settings.ascend_mf_transfer_protocol
        self.role = mf_role(self.settings.ascend_mf_role, config.local_id)
        self.host = advertised_host(config.host)
        self._lock = threading.Lock()
        self._channel = NotificationChannel.for_host(config.host)
        self._engine: Engine | None = None
        self._device: int | None = None
        self._pool: cf.ThreadPoolExecutor | None = None
        self._regions = Regions()
        self._registered: list[int] = []
        self._peers: dict[str, _Peer] = {}
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._closed = False

    # --- memory and peers ---------------------------------------------------------------

    def register_memory(self, regions: Sequence[MemoryRegion]) -> None:
        new = [Region.of(r) for r in regions]
        with self._lock:
            Regions([*self._regions, *new])  # refuses overlaps before the transport sees any
            device = npu_index_of([*self._regions, *new])
            if self._engine is None:
                self._device = device
                self._engine = start_engine(self.settings, self.host, device, self.role)
                self._pool = cf.ThreadPoolExecutor(
                    self.settings.ascend_transfer_threads,
                    thread_name_prefix="pd-ascend",
                    initializer=set_npu_device,
                    initargs=(device,),
                )
            for r in new:
                self._engine.register(r.addr, r.length)
                self._registered.append(r.addr)
                self._regions.add([r])

    def _info(self) -> PeerInfo:
        if self._engine is None:
            raise TransferError(
                "register_memory() first: the transport starts on the NPU of the first region"
            )
        return PeerInfo(
            self.transport,
            self.protocol,
            self._engine.session,
            self._channel.endpoint,
            self._regions,
        )

    def describe(self) -> bytes:
        with self._lock:
            return encode_blob(self._info())

    def connect(self, peer_id: str, blob: bytes) -> None:
        info = decode_blob(blob)
        with self._lock:
            check_peer_matches(self._info(), info, peer_id)
            old = self._peers.get(peer_id)
            if old is not None and old.blob == blob:
                return
            self._drop_peer(peer_id)
            try:  # the transports connect lazily; refuse a dead peer now, at its inbox
                host, port = host_port(info.notify)
                socket.create_connection(
                    (host, port), timeout=min(5.0, self.config.timeout_s)
                ).close()
            except (OSError, ValueError) as exc:
                raise TransferError(
                    f"cannot connect to peer {peer_id!r} ({info.notify}): {exc}; "
                    "is it running and reachable?"
                ) from exc
            self._peers[peer_id] = _Peer(
                info, blob, self._channel.open_outbox(peer_id, info.notify)
            )

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
            arr = checked_runs(runs, self._regions, peer.info.regions)
            b = _Batch(peer_id, bytes(notification), time.monotonic() + self.config.timeout_s, None)
            if len(arr):
                assert self._pool is not None and self._engine is not None
                b.future = self._pool.submit(
                    self._write, self._engine, peer.info.session, arr, b.cancel
                )
            else:
                b.data_done = True
            batch_id = next(self._ids)
            self._batches[batch_id] = b
            self._advance(b)
            return batch_id

    @staticmethod
    def _write(engine: Engine, session: str, runs: RunArray, cancel: threading.Event) -> str | None:
        """Worker thread: every slice of runs, in order; why it failed, or None."""
        for part in split_calls(runs):
            if cancel.is_set():
                return "released before all runs were written"
            ret = engine.write(
                session, part[:, 0].tolist(), part[:, 1].tolist(), part[:, 2].tolist()
            )
            if ret != 0:
                return f"batch_transfer_sync_write to {session} returned {ret} ({len(part)} runs)"
        return None

    def _advance(self, b: _Batch) -> None:
        """Move a pending batch on: data written -> notification pushed -> done."""
        if not b.data_done and b.future is not None and b.future.done():
            try:
                error = b.future.result()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error:
                b.state = failed(f"write to peer {b.peer_id!r} failed: {error}")
                return
            b.data_done = True
        if b.data_done:
            peer = self._peers.get(b.peer_id)
            if peer is None:
                b.state = failed(f"peer {b.peer_id!r} was disconnected before notification")
                return
            try:
                if self._channel.send(peer.notify, self.local_id, b.notification):
                    b.state = DONE
                    return
            except TransferError as exc:
                b.state = failed(f"notifying peer {b.peer_id!r} failed: {exc}")
                return
        if time.monotonic() > b.deadline:
            stage = "notification" if b.data_done else "write"
            b.cancel.set()
            b.state = failed(
                f"{stage} to peer {b.peer_id!r} still pending after {self.config.timeout_s} s"
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
            b = self._batches.pop(batch, None)
            if b is not None:
                b.cancel.set()  # slices not yet written are skipped; a running one finishes
                if b.future is not None:
                    b.future.cancel()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = [b.future for b in self._batches.values() if b.future is not None]
            for b in self._batches.values():
                b.cancel.set()
            self._batches.clear()
            for peer_id in list(self._peers):
                self._drop_peer(peer_id)
            pool, engine = self._pool, self._engine
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            _, running = cf.wait(futures, timeout=min(10.0, self.config.timeout_s))
            if running:  # tearing the engine down under a blocked write could crash it
                logger.warning(
                    "%d ascend write(s) still blocked at close; engine left up", len(running)
                )
                engine = None
        if engine is not None:
            for addr in self._registered:
                try:
                    engine.unregister(addr)
                except Exception as exc:
                    logger.warning("ascend unregister failed: %s", exc)
            engine.close()
        with self._lock:
            self._registered.clear()
            self._engine = None
            self._channel.close()
