"""The NIXL data plane: pdcore's transfer contract on a `nixl_agent`.

One agent per backend, named after `config.local_id`; the peer blob carries the agent's
metadata (connection info and registered memory) plus our region table, so runs are checked
against the peer's memory before NIXL sees them. Each batch is one NIXL WRITE request built
from coalesced runs with the notification attached, which NIXL delivers only after the data
is in place. NIXL reports a dead peer as an error on post or poll; a request that stays in
progress past `config.timeout_s` is reported failed, so nothing waits forever.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from pd_nixl.settings import NixlSettings
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
    as_runs,
    failed,
    parse_device,
)

logger = logging.getLogger(__name__)

BLOB_TAG = "pd-nixl"
BLOB_VERSION = 1
_MEM_TYPES = {"cpu": "DRAM", "cuda": "VRAM"}


@dataclass
class _Peer:
    agent: str
    blob: bytes
    regions: RegionTable


@dataclass
class _Batch:
    peer_id: str
    handle: Any  # nixl_xfer_handle, or None when nothing was posted
    deadline: float
    state: BatchState


def _import_nixl() -> Any:
    try:
        from nixl import _api
    except Exception as exc:  # a broken install surfaces here, not deep in a request
        raise TransferError(f"nixl cannot be imported: {type(exc).__name__}: {exc}") from exc
    if not os.environ.get("NIXL_LOG_LEVEL"):  # nixl logs every agent creation to stdout
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return _api


def parse_blob(blob: bytes) -> tuple[str, bytes, RegionTable]:
    """(agent name, agent metadata, regions) from a peer blob; TransferError if it is not one."""
    try:
        data = msgpack.unpackb(blob, raw=False)
        if not isinstance(data, dict) or data.get("tag") != BLOB_TAG:
            raise ValueError("missing pd-nixl tag")
        if data.get("version") != BLOB_VERSION:
            raise ValueError(f"blob version {data.get('version')}, expected {BLOB_VERSION}")
        agent, metadata = data["agent"], data["metadata"]
        if not isinstance(agent, str) or not isinstance(metadata, bytes):
            raise ValueError("agent or metadata of the wrong type")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise TransferError(f"not a pd-nixl peer blob ({exc}); is the peer using nixl?") from exc
    return agent, metadata, RegionTable.from_wire(data.get("regions", []))


class NixlBackend(TransferBackend):
    """See the module docstring. Thread-safe: one lock guards the agent and the tables."""

    contract_version = TRANSFER_CONTRACT_VERSION

    def __init__(self, config: TransferConfig, settings: NixlSettings | None = None) -> None:
        super().__init__(config)
        api = _import_nixl()
        settings = settings or NixlSettings()
        self.nixl_backend = settings.disaggregation_nixl_backend
        self._lock = threading.Lock()
        self._agent = api.nixl_agent(
            config.local_id,
            api.nixl_agent_config(
                enable_prog_thread=settings.disaggregation_nixl_progress_thread, backends=[]
            ),
        )
        plugins = self._agent.get_plugin_list()
        if self.nixl_backend not in plugins:
            raise TransferError(
                f"NIXL backend {self.nixl_backend!r} is not available; NIXL has: "
                f"{', '.join(plugins)} (set PDCORE_DISAGGREGATION_NIXL_BACKEND)"
            )
        params: dict[str, str] = {}
        if config.ib_device and self.nixl_backend == "UCX":
            params["ucx_devices"] = config.ib_device
        try:
            self._agent.create_backend(self.nixl_backend, params)
        except Exception as exc:
            raise TransferError(
                f"NIXL backend {self.nixl_backend!r} failed to start with {params}: {exc}"
            ) from exc
        self._regions = RegionTable()
        self._registered: list[Any] = []
        self._peers: dict[str, _Peer] = {}
        self._agent_refs: Counter[str] = Counter()
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count(1)
        self._leaked: list[Any] = []
        self._inbox: list[Notification] = []
        self._stop = threading.Event()
        self._progress: threading.Thread | None = None
        interval = settings.disaggregation_nixl_progress_interval_ms / 1000
        if interval > 0:
            self._progress = threading.Thread(
                target=self._progress_loop, args=(interval,), name="pd-nixl-progress", daemon=True
            )
            self._progress.start()

    def _progress_loop(self, interval: float) -> None:
        """Without a progress thread, UCX moves a write into this process (and finishes
        one from it) only while someone calls into the agent; the engine loop may be in a
        forward pass for tens of ms. Sleeping between calls keeps this thread's CPU cost
        negligible, unlike NIXL's own progress thread, which spins."""
        while not self._stop.wait(interval):
            with self._lock:
                if self._agent is None:
                    return
                self._drain()

    def _drain(self) -> None:
        for sender, payloads in self._agent.get_new_notifs().items():
            self._inbox.extend(Notification(str(sender), bytes(p)) for p in payloads)

    # --- memory and peers ---------------------------------------------------------------

    def register_memory(self, regions: Sequence[MemoryRegion]) -> None:
        with self._lock:
            RegionTable([*self._regions, *regions])  # refuses overlaps before NIXL sees any
            for r in regions:
                kind, index = parse_device(r.device)
                try:
                    descs = self._agent.register_memory(
                        [(r.addr, r.length, index, "")],
                        _MEM_TYPES[kind],
                        backends=[self.nixl_backend],
                    )
                except Exception as exc:
                    raise TransferError(f"NIXL could not register {r}: {exc}") from exc
                self._registered.append(descs)
                self._regions.add([r])

    def describe(self) -> bytes:
        with self._lock:
            return msgpack.packb(
                {
                    "tag": BLOB_TAG,
                    "version": BLOB_VERSION,
                    "agent": self._agent.name,
                    "metadata": self._agent.get_agent_metadata(),
                    "regions": self._regions.to_wire(),
                }
            )

    def connect(self, peer_id: str, blob: bytes) -> None:
        agent, metadata, regions = parse_blob(blob)
        with self._lock:
            old = self._peers.get(peer_id)
            if old is not None and old.blob == blob:
                return
            if old is not None:
                self._drop_peer(peer_id)
            try:
                name = self._agent.add_remote_agent(metadata)
            except Exception as exc:
                raise TransferError(
                    f"cannot connect to peer {peer_id!r} (NIXL agent {agent!r}): "
                    f"{type(exc).__name__}: {exc}; is it running and reachable?"
                ) from exc
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._peers[peer_id] = _Peer(name, blob, regions)
            self._agent_refs[name] += 1

    def disconnect(self, peer_id: str) -> None:
        with self._lock:
            self._drop_peer(peer_id)

    def _drop_peer(self, peer_id: str) -> None:
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        self._agent_refs[peer.agent] -= 1
        if self._agent_refs[peer.agent] <= 0:  # another peer id may share the agent
            del self._agent_refs[peer.agent]
            try:
                self._agent.remove_remote_agent(peer.agent)
            except Exception as exc:
                logger.warning("removing NIXL agent %r failed: %s", peer.agent, exc)

    # --- batches --------------------------------------------------------------------------

    def submit(self, peer_id: str, runs: RunsLike, notification: bytes) -> int:
        arr = as_runs(runs)
        with self._lock:
            peer = self._peers.get(peer_id)
            if peer is None:
                raise TransferError(f"peer {peer_id!r} is not connected; call connect() first")
            batch_id = next(self._ids)
            deadline = time.monotonic() + self.config.timeout_s
            if len(arr) == 0:
                state = self._notify_only(peer, notification)
                self._batches[batch_id] = _Batch(peer_id, None, deadline, state)
                return batch_id
            local = self._descs(arr[:, 0], arr, self._regions, "local")
            remote = self._descs(arr[:, 1], arr, peer.regions, "remote")
            handle = None
            try:
                handle = self._agent.initialize_xfer(
                    "WRITE",
                    self._agent.get_xfer_descs(local[0], local[1]),
                    self._agent.get_xfer_descs(remote[0], remote[1]),
                    peer.agent,
                    notification,
                    backends=[self.nixl_backend],
                )
                posted = self._agent.transfer(handle)
                state = {"DONE": DONE, "PROC": PENDING}.get(posted) or failed(
                    f"NIXL refused the write to peer {peer_id!r}"
                )
            except Exception as exc:
                state = failed(f"write to peer {peer_id!r} failed: {type(exc).__name__}: {exc}")
            self._batches[batch_id] = _Batch(peer_id, handle, deadline, state)
            return batch_id

    @staticmethod
    def _descs(addrs: RunArray, arr: RunArray, table: RegionTable, side: str) -> tuple[Any, str]:
        """NIXL's (addr, len, device id) rows and memory type for one side of a batch."""
        if not len(table):
            raise TransferError(f"{side} side has no registered memory (register before describe)")
        kind, index = parse_device(table.device_of(addrs, arr[:, 2], side))
        rows = np.empty((len(arr), 3), dtype=np.uint64)
        rows[:, 0] = addrs
        rows[:, 1] = arr[:, 2]
        rows[:, 2] = index
        return rows, _MEM_TYPES[kind]

    def _notify_only(self, peer: _Peer, notification: bytes) -> BatchState:
        try:
            self._agent.send_notif(peer.agent, notification)
        except Exception as exc:
            return failed(f"notifying NIXL agent {peer.agent!r} failed: {exc}")
        return DONE

    def poll(self, batch: int) -> BatchState:
        with self._lock:
            b = self._batches.get(batch)
            if b is None:
                raise TransferError(f"unknown batch {batch}")
            if b.state.finished:
                return b.state
            try:
                status = self._agent.check_xfer_state(b.handle)
            except Exception as exc:
                b.state = failed(f"write to peer {b.peer_id!r} failed: {type(exc).__name__}: {exc}")
                return b.state
            if status == "DONE":
                b.state = DONE
            elif status != "PROC":
                b.state = failed(f"NIXL reported the write to peer {b.peer_id!r} failed")
            elif time.monotonic() > b.deadline:
                b.state = failed(
                    f"write to peer {b.peer_id!r} still pending after {self.config.timeout_s} s"
                )
            return b.state

    def fetch_notifications(self) -> list[Notification]:
        with self._lock:
            self._drain()
            out, self._inbox = self._inbox, []
        return out

    def release(self, batch: int) -> None:
        with self._lock:
            b = self._batches.pop(batch, None)
            if b is not None and b.handle is not None:
                self._release_handle(b.handle)

    def _release_handle(self, handle: Any) -> None:
        try:
            handle.release()  # cancels a write still in flight, or raises if it cannot
        except Exception as exc:
            logger.warning("NIXL could not release a transfer yet (%s); retrying at close", exc)
            self._leaked.append(handle)

    def close(self) -> None:
        self._stop.set()
        if self._progress is not None and self._progress is not threading.current_thread():
            self._progress.join(timeout=5)
        with self._lock:
            if self._agent is None:
                return
            for b in self._batches.values():
                if b.handle is not None:
                    self._release_handle(b.handle)
            self._batches.clear()
            leaked, self._leaked = self._leaked, []
            for handle in leaked:
                try:
                    handle.release()
                except Exception as exc:
                    logger.warning("NIXL transfer handle leaked at close: %s", exc)
            for peer_id in list(self._peers):
                self._drop_peer(peer_id)
            for descs in self._registered:
                try:
                    self._agent.deregister_memory(descs, backends=[self.nixl_backend])
                except Exception as exc:
                    logger.warning("NIXL deregister failed: %s", exc)
            self._registered.clear()
            self._agent = None  # the agent is torn down when its last reference goes
