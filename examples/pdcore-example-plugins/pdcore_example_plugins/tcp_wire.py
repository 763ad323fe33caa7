"""The wire format of the "tcp" backend: its describe() blob and its framing.

Blob (msgpack, never pickle: a peer's blob is untrusted input):
    {"tag": "pdcore-example-tcp", "version": 1, "host": str, "port": int,
     "regions": [[addr, length, device], ...]}

One batch on a connection, sender -> receiver, then the reply:
    u32 length | msgpack {"sender": str, "note": bytes, "runs": bytes}
    the bytes of every run, in run order
    u32 length | msgpack {"ok": bool, "error": str | None}          (receiver -> sender)

`runs` holds the (destination address, length) pairs as little-endian uint64.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, BinaryIO

import msgpack

from pdcore.disagg.transfer import RegionTable, TransferError

BLOB_TAG = "pdcore-example-tcp"
BLOB_VERSION = 1
LENGTH = struct.Struct("!I")
MAX_HEADER = 64 << 20  # a header bigger than this is not one of ours: drop the connection


def read_exact(rfile: BinaryIO, view: memoryview) -> None:
    while view:
        n = rfile.readinto(view)
        if not n:
            raise EOFError("the peer closed the connection")
        view = view[n:]


def read_message(rfile: BinaryIO) -> Any:
    head = bytearray(LENGTH.size)
    read_exact(rfile, memoryview(head))
    (size,) = LENGTH.unpack(head)
    if size > MAX_HEADER:
        raise ValueError(f"message of {size} B announced: not a pdcore-example-tcp peer")
    body = bytearray(size)
    read_exact(rfile, memoryview(body))
    return msgpack.unpackb(body, raw=False)


def message(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


def memory(addr: int, length: int) -> memoryview:
    """A view of `length` bytes of this process's memory at `addr` (no copy)."""
    return memoryview((ctypes.c_ubyte * length).from_address(addr)).cast("B")


def make_blob(host: str, port: int, regions: RegionTable) -> bytes:
    wire = {"tag": BLOB_TAG, "version": BLOB_VERSION, "host": host, "port": port}
    return msgpack.packb({**wire, "regions": regions.to_wire()})


def parse_blob(blob: bytes) -> tuple[str, int, RegionTable]:
    """(host, port, regions) from a receiver's blob; TransferError if it is not one."""
    try:
        data = msgpack.unpackb(blob, raw=False)
        if not isinstance(data, dict) or data.get("tag") != BLOB_TAG:
            raise ValueError(f"no {BLOB_TAG!r} tag")
        if data.get("version") != BLOB_VERSION:
            raise ValueError(f"blob version {data.get('version')}, expected {BLOB_VERSION}")
        host, port = data["host"], data["port"]
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError("host/port malformed")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise TransferError(f"not a tcp peer blob ({exc}); is the peer using tcp?") from exc
    return host, port, RegionTable.from_wire(data.get("regions", []))
