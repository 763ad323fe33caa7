"""The transfer contract: what a KV transfer backend implements (the data plane only).

A backend moves bytes and nothing else. The control plane in `pdcore.disagg` (bootstrap,
handshake, KVPoll states, timeouts, heartbeat, abort) is written once and drives every
backend through this interface, so each backend gets the same fault handling (DESIGN.md §3).

The life of one transfer::

    decode (receiver)                          prefill (sender)
    b.register_memory(regions)                 b.register_memory(regions)
    blob = b.describe()  --- control plane --> b.connect(peer_id, blob)
                                               batch = b.submit(peer_id, runs, b"room 7")
    ... data lands in decode's pages ...       b.poll(batch) -> pending ... done | failed
    b.fetch_notifications() -> [(sender, b"room 7")]    b.release(batch)

Only the sender calls `connect`: the receiver learns who wrote from the notification's
`sender` (the sender's `local_id`). Notifications arrive only after the batch's data is in
place. A dead or unreachable peer makes `connect` raise or `poll` report failed within the
backend's `timeout_s`, never a hang, so the control plane can free pages and fail rooms.

The contract carries a version: a backend states the version it implements in
`contract_version`, and `create_transfer_backend` refuses a mismatch instead of letting a
plugin built for another pdcore fail in odd ways mid-request.
"""

from __future__ import annotations

import abc
import enum
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

from pdcore.disagg.kv_runs import (
    KVLayout,
    MemoryRegion,
    RegionTable,
    RunArray,
    RunsLike,
    TransferError,
    as_runs,
    checked_runs,
    coalesce_runs,
    kv_page_runs,
    parse_device,
)
from pdcore.registry import PluginError

if TYPE_CHECKING:
    from pdcore.registry import Registry

__all__ = [
    "DONE",
    "PENDING",
    "TRANSFER_CONTRACT_VERSION",
    "BatchState",
    "BatchStatus",
    "ContractVersionError",
    "KVLayout",
    "MemoryRegion",
    "Notification",
    "RegionTable",
    "RunArray",
    "RunsLike",
    "TransferBackend",
    "TransferConfig",
    "TransferError",
    "as_runs",
    "check_contract",
    "checked_runs",
    "coalesce_runs",
    "create_transfer_backend",
    "default_local_id",
    "failed",
    "kv_page_runs",
    "parse_device",
]

TRANSFER_CONTRACT_VERSION = 1


class ContractVersionError(TransferError, PluginError):
    """The backend implements another version of this contract than pdcore speaks."""


def default_local_id() -> str:
    """Unique per process and per backend, because receivers tell senders apart by it."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class TransferConfig:
    """What the control plane hands every backend's factory (`factory(config=...)`).

    A dataclass rather than loose kwargs so that adding a field never breaks a plugin's
    signature. Backend-specific settings live in the backend's own plugin (env vars).
    """

    local_id: str = field(default_factory=default_local_id)
    host: str = "127.0.0.1"
    ib_device: str | None = None
    timeout_s: float = 60.0
    """A batch still pending after this long is reported failed (and a connect gives up)."""


class BatchStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class BatchState:
    """What `poll` returns; `reason` says why a batch failed (None otherwise)."""

    status: BatchStatus
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.status is not BatchStatus.PENDING


PENDING = BatchState(BatchStatus.PENDING)
DONE = BatchState(BatchStatus.DONE)


def failed(reason: str) -> BatchState:
    return BatchState(BatchStatus.FAILED, reason)


@dataclass(frozen=True)
class Notification:
    """A batch's completion message as the receiver sees it."""

    sender: str
    payload: bytes


# --- the contract -------------------------------------------------------------------------


class TransferBackend(abc.ABC):
    """The data plane one plugin provides. Every method is non-blocking (bounded by
    `config.timeout_s` at worst), because the engine loop calls them between forward passes.

    Subclasses set `contract_version = TRANSFER_CONTRACT_VERSION` explicitly (not inherited),
    so a plugin states the version it was written against.
    """

    contract_version: ClassVar[int]

    def __init__(self, config: TransferConfig) -> None:
        self.config = config

    @property
    def local_id(self) -> str:
        """How receivers name this endpoint in `Notification.sender`."""
        return self.config.local_id

    @abc.abstractmethod
    def register_memory(self, regions: Sequence[MemoryRegion]) -> None:
        """Make regions usable: as sources on a sender, as destinations on a receiver.
        Call before `describe()`; a blob handed out earlier does not cover later regions."""

    @abc.abstractmethod
    def describe(self) -> bytes:
        """An opaque blob that lets a peer `connect` to this endpoint and write into it."""

    @abc.abstractmethod
    def connect(self, peer_id: str, blob: bytes) -> None:
        """Prepare to write to the peer that produced `blob`. Idempotent per `peer_id`; a new
        blob for a known `peer_id` (a restarted peer) replaces the old connection. Raises
        TransferError for a malformed blob or an unreachable peer."""

    @abc.abstractmethod
    def submit(self, peer_id: str, runs: RunsLike, notification: bytes) -> int:
        """Start writing `runs` to the connected peer; returns a batch id for `poll`.
        `notification` reaches the peer's `fetch_notifications` only after all the data is in
        place (an empty `runs` sends just the notification). Raises TransferError for caller
        errors (unknown peer, ranges outside registered memory); transport failures show up
        as a failed `poll` instead, so the control plane has one failure path."""

    @abc.abstractmethod
    def poll(self, batch: int) -> BatchState:
        """Pending, done, or failed with a reason; never blocks. Pending past `timeout_s`
        becomes failed."""

    @abc.abstractmethod
    def fetch_notifications(self) -> list[Notification]:
        """Notifications that arrived since the last call (receiver side). Call it every
        engine-loop iteration: a transport without a progress thread of its own may move
        incoming data only while it is called."""

    @abc.abstractmethod
    def release(self, batch: int) -> None:
        """Forget a batch (cancelling it if still pending). Unknown ids are ignored."""

    @abc.abstractmethod
    def disconnect(self, peer_id: str) -> None:
        """Drop a peer; unknown ids are ignored."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything; safe to call twice."""

    def __enter__(self) -> TransferBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def check_contract(backend: object, name: str) -> None:
    """Raise ContractVersionError unless `backend` implements this version of the contract."""
    version = getattr(type(backend), "contract_version", None)
    if not isinstance(backend, TransferBackend) or version != TRANSFER_CONTRACT_VERSION:
        got = "no TransferBackend" if not isinstance(backend, TransferBackend) else version
        raise ContractVersionError(
            f"transfer backend {name!r} implements transfer contract {got}, but this pdcore "
            f"speaks version {TRANSFER_CONTRACT_VERSION}; install a matching plugin version"
        )


def create_transfer_backend(
    name: str,
    config: TransferConfig | None = None,
    *,
    registry: Registry[TransferBackend] | None = None,
) -> TransferBackend:
    """Build the named backend through the plugin registry and check its contract version.
    Unknown or unavailable names fail with the registry's message (what is installed, why
    a backend cannot run here)."""
    if registry is None:
        from pdcore.plugins import get_registry

        registry = get_registry("transfer_backend")
    backend = registry.create(name, config=config or TransferConfig())
    try:
        check_contract(backend, name)
    except ContractVersionError:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
        raise
    return backend
