"""The wire format of the "tcp" backend: its describe() blob and its framing.

Blob (msgpack, never pickle: a peer's blob is untrusted input), built and checked by
pdcore's ChannelBackend from `blob_tag`, `blob_version` and the backend's own fields:
    {"tag": "pdcore-example-tcp", "version": 2, "host": str, "port": int,
     "notify": "tcp://host:port" (the zmq inbox), "regions": [[addr, length, device], ...]}

One batch on a connection, sender -> receiver, then the reply:
    u32 length | msgpack {"runs": bytes}
    the bytes of every run, in run order
    u32 length | msgpack {"ok": bool, "error": str | None}          (receiver -> sender)

`runs` holds the (destination address, length) pairs as little-endian uint64. The
notification is not in the frame: ChannelBackend sends it over its zmq side channel once the
reply said "ok". (Version 1 carried it in the header.)
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, BinaryIO

import msgpack

BLOB_TAG = "pdcore-example-tcp"
BLOB_VERSION = 2
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
