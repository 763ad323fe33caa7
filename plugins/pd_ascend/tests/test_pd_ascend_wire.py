"""The pure parts: NPU device names, region checks, coalesced runs, the msgpack blob."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest
from pd_ascend.backend import npu_index_of
from pd_ascend.wire import (
    PeerInfo,
    Region,
    Regions,
    check_peer_matches,
    decode_blob,
    encode_blob,
    parse_ascend_device,
    split_calls,
)

from pdcore.disagg.transfer import MemoryRegion, TransferError, checked_runs

NPU = 0x1_0000_0000  # addresses only: nothing is dereferenced


def _regions(*spans: tuple[int, int, str]) -> Regions:
    return Regions(Region.of(Region(a, n, d)) for a, n, d in spans)


def test_devices() -> None:
    assert parse_ascend_device("cpu") == ("cpu", 0)
    assert parse_ascend_device("npu:3") == ("npu", 3)
    for bad in ("cuda:0", "npu", "npu:x", "NPU:0", ""):
        with pytest.raises(ValueError, match="'cpu' or 'npu:N'"):
            parse_ascend_device(bad)
    assert Region.of(MemoryRegion(4096, 8192)) == Region(4096, 8192, "cpu")
    with pytest.raises(ValueError, match="addr > 0"):
        Region.of(Region(0, 10, "npu:0"))


def test_one_npu_per_backend_and_no_cpu() -> None:
    assert npu_index_of([Region(NPU, 10, "npu:1"), Region(NPU + 64, 10, "npu:1")]) == 1
    with pytest.raises(TransferError, match="moves NPU memory"):
        npu_index_of([Region(4096, 10, "cpu")])
    with pytest.raises(TransferError, match="one NPU"):
        npu_index_of([Region(NPU, 10, "npu:0"), Region(NPU + 64, 10, "npu:1")])


def test_runs_are_coalesced_and_checked_on_both_sides() -> None:
    local = _regions((NPU, 4096, "npu:0"))
    remote = _regions((2 * NPU, 4096, "npu:1"))
    runs = [
        (NPU, 2 * NPU + 1024, 100),
        (NPU + 100, 2 * NPU + 1124, 50),  # continues both: merged
        (NPU + 200, 2 * NPU + 1174, 50),  # continues remote only: kept apart
        (NPU + 250, 2 * NPU + 3000, 8),
    ]
    out = checked_runs(runs, local, remote)
    assert out.dtype == np.uint64
    assert out.tolist() == [
        [NPU, 2 * NPU + 1024, 150],
        [NPU + 200, 2 * NPU + 1174, 50],
        [NPU + 250, 2 * NPU + 3000, 8],
    ]
    assert checked_runs([], local, remote).shape == (0, 3)
    with pytest.raises(TransferError, match=r"remote range .* outside"):
        checked_runs([(NPU, 2 * NPU + 4090, 16)], local, remote)
    with pytest.raises(TransferError, match=r"remote range .* outside"):
        checked_runs([(NPU, 2 * NPU - 8, 16)], local, remote)
    with pytest.raises(TransferError, match=r"local range .* outside"):
        checked_runs([(NPU + 4090, 2 * NPU, 16)], local, remote)
    with pytest.raises(TransferError, match="length 0"):
        checked_runs([(NPU, 2 * NPU, 0)], local, remote)
    with pytest.raises(TransferError, match="remote side has no registered memory"):
        checked_runs([(NPU, 2 * NPU, 8)], local, Regions())


def test_regions_refuse_overlap_and_device_spanning_batches() -> None:
    with pytest.raises(ValueError, match="overlap"):
        _regions((NPU, 100, "npu:0"), (NPU + 50, 100, "npu:0"))
    two = _regions((NPU, 100, "npu:0"), (NPU + 100, 100, "cpu"))
    with pytest.raises(TransferError, match="one local device"):
        two.device_of(np.array([NPU, NPU + 100], np.uint64), np.array([10, 10], np.uint64), "local")


def test_split_calls_keeps_order() -> None:
    runs = np.arange(2500 * 3, dtype=np.uint64).reshape(2500, 3)
    parts = split_calls(runs, 1024)
    assert [len(p) for p in parts] == [1024, 1024, 452]
    assert np.array_equal(np.concatenate(parts), runs)


def _info(**kw: object) -> PeerInfo:
    base: dict[str, object] = {
        "transport": "memfabric",
        "protocol": "sdma",
        "session": "10.0.0.1:40001",
        "notify": "tcp://10.0.0.1:5555",
        "regions": _regions((NPU, 1 << 20, "npu:0")),
    }
    base.update(kw)
    return PeerInfo(**base)  # type: ignore[arg-type]


def test_blob_round_trip_is_msgpack() -> None:
    info = _info()
    blob = encode_blob(info)
    assert msgpack.unpackb(blob)["tag"] == "pd-ascend"
    back = decode_blob(blob)
    assert (back.transport, back.protocol, back.session, back.notify) == (
        "memfabric",
        "sdma",
        "10.0.0.1:40001",
        "tcp://10.0.0.1:5555",
    )
    assert back.regions.to_wire() == [[NPU, 1 << 20, "npu:0"]]


@pytest.mark.parametrize(
    "blob",
    [
        b"garbage",
        pickle.dumps({"tag": "pd-ascend", "version": 1}),
        msgpack.packb({"tag": "pd-mooncake", "version": 1}),
        msgpack.packb({"tag": "pd-ascend", "version": 2}),
        msgpack.packb({"tag": "pd-ascend", "version": 1, "transport": "memfabric"}),
        msgpack.packb(
            {
                "tag": "pd-ascend",
                "version": 1,
                "transport": "memfabric",
                "protocol": "sdma",
                "session": "h:1",
                "notify": "tcp://h:2",
                "regions": [[1, 2, "cuda:0"]],
            }
        ),
    ],
)
def test_bad_blobs_are_refused(blob: bytes) -> None:
    with pytest.raises(TransferError, match="pd-ascend peer blob|malformed memory regions"):
        decode_blob(blob)


def test_both_sides_must_agree() -> None:
    check_peer_matches(_info(), _info(), "p")
    with pytest.raises(TransferError, match="ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE"):
        check_peer_matches(_info(), _info(transport="mooncake", protocol="ascend"), "p")
    with pytest.raises(TransferError, match="ASCEND_MF_TRANSFER_PROTOCOL"):
        check_peer_matches(_info(), _info(protocol="device_rdma"), "p")
