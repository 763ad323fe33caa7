"""Pure parts of the Ascend backend: NPU device names, registered regions, run checks and the
peer blob. No transport, no NPU: all of it is tested on any machine.

Regions are pdcore's `RegionTable` (which knows "npu:N", the device torch_npu gives NPU
tensors) restricted to "cpu" and "npu:N": "cuda:N" is refused, no Ascend transport moves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from pdcore.disagg.kv_runs import (
    RegionTable,
    RunArray,
    TransferError,
)

BLOB_TAG = "pd-ascend"
BLOB_VERSION = 1
MAX_RUNS_PER_CALL = 1024
"""Runs handed to one batch_transfer_sync_write call; a larger batch takes several calls."""


def parse_ascend_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("npu", N); ValueError for anything else (cuda:N included)."""
    if device == "cpu":
        return "cpu", 0
    kind, _, index = device.partition(":")
    if kind == "npu" and index.isdigit():
        return "npu", int(index)
    raise ValueError(f"the ascend backend moves 'cpu' or 'npu:N' memory, not {device!r}")


@dataclass(frozen=True)
class Region:
    addr: int
    length: int
    device: str

    @classmethod
    def of(cls, region: Any) -> Region:
        """From a pdcore MemoryRegion (or anything with addr, length, device)."""
        r = cls(int(region.addr), int(region.length), str(getattr(region, "device", "cpu")))
        if r.addr <= 0 or r.length <= 0:
            raise ValueError(f"memory region needs addr > 0 and length > 0, got {r}")
        parse_ascend_device(r.device)
        return r


class Regions(RegionTable):
    """Registered regions of one side (pdcore's table: overlap refusal, bounds checks that
    cannot wrap, one device per batch), restricted to the memory an Ascend transport moves."""

    def add(self, regions: Iterable[Any]) -> None:
        super().add([Region.of(r) for r in regions])

    @classmethod
    def from_wire(cls, data: Any) -> Regions:
        try:
            return cls(Region(int(a), int(n), str(d)) for a, n, d in data)
        except (TypeError, ValueError) as exc:
            raise TransferError(f"peer blob has malformed memory regions: {exc}") from exc


def split_calls(runs: RunArray, per_call: int = MAX_RUNS_PER_CALL) -> list[RunArray]:
    """Runs in slices of at most `per_call`, in order."""
    return [runs[i : i + per_call] for i in range(0, len(runs), per_call)]


@dataclass(frozen=True)
class PeerInfo:
    """What one endpoint tells a peer in its describe() blob."""

    transport: str  # "memfabric" or "mooncake"
    protocol: str  # memfabric: sdma / device_rdma; mooncake: ascend
    session: str  # the transport's name for this endpoint: "host:port"
    notify: str  # zmq endpoint of the notification inbox
    regions: Regions


def encode_blob(info: PeerInfo) -> bytes:
    return msgpack.packb(
        {
            "tag": BLOB_TAG,
            "version": BLOB_VERSION,
            "transport": info.transport,
            "protocol": info.protocol,
            "session": info.session,
            "notify": info.notify,
            "regions": info.regions.to_wire(),
        }
    )


def decode_blob(blob: bytes) -> PeerInfo:
    """A peer's blob; TransferError if it is not one of ours (msgpack only, never pickle)."""
    try:
        data = msgpack.unpackb(blob, raw=False)
        if not isinstance(data, dict) or data.get("tag") != BLOB_TAG:
            raise ValueError("missing pd-ascend tag")
        if data.get("version") != BLOB_VERSION:
            raise ValueError(f"blob version {data.get('version')}, expected {BLOB_VERSION}")
        fields = [data[k] for k in ("transport", "protocol", "session", "notify")]
        if not all(isinstance(v, str) and v for v in fields):
            raise ValueError("transport, protocol, session or notify missing or not a string")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise TransferError(
            f"not a pd-ascend peer blob ({exc}); is the peer using the ascend backend?"
        ) from exc
    return PeerInfo(*fields, Regions.from_wire(data.get("regions", [])))


def check_peer_matches(ours: PeerInfo, peer: PeerInfo, peer_id: str) -> None:
    """Both sides must use the same transport and data path; say which setting differs."""
    if peer.transport != ours.transport:
        raise TransferError(
            f"peer {peer_id!r} moves KV with {peer.transport}, this side with {ours.transport}: "
            "set ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE the same on prefill and decode"
        )
    if peer.protocol != ours.protocol:
        raise TransferError(
            f"peer {peer_id!r} uses data path {peer.protocol}, this side {ours.protocol}: "
            "set ASCEND_MF_TRANSFER_PROTOCOL the same on prefill and decode"
        )
