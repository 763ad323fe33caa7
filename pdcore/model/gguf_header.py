"""A GGUF file's header read directly: chosen metadata values and every tensor's place.

`gguf.GGUFReader` builds a numpy view of every metadata item -- each of the vocabulary's
~50k token strings included -- before anything can be read: ~3 s of CPU for the 135M default
model, paid by every engine (and TP rank) start that serves its Q4_1 blocks as they are. The
header is a flat list; walking it with struct and seeks takes milliseconds.

Layout (GGUF v2/v3): magic "GGUF", version u32, tensor count u64, metadata count u64; each
metadata item is a string key, a u32 value type and the value; then per tensor its name, the
number of dims (u32), the dims (u64 each, innermost first), the ggml type (u32) and the
offset (u64) of its data from the data section, which starts at the next multiple of
`general.alignment` (default 32) after the header.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# GGUF value types -> struct formats (8: string, 9: array, 7: bool are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q"}
_SCALARS[12] = "<d"
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # innermost (row length) first, as GGUF stores them
    ggml_type: int
    offset: int  # absolute, in bytes from the file's start


@dataclass
class GGUFHeader:
    metadata: dict[str, Any] = field(default_factory=dict)  # only the keys asked for
    tensors: list[GGUFTensorInfo] = field(default_factory=list)


def read_gguf_header(
    path: Path, keys: Collection[str] = (), with_tensors: bool = True
) -> GGUFHeader:
    """The scalar and string metadata values named in `keys`, and (unless `with_tensors` is
    False) every tensor's name, dims, type and absolute data offset."""
    header = GGUFHeader()
    with open(path, "rb") as f:
        magic, version = f.read(4), _read(f, "<I")
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a GGUF v2/v3 file")
        n_tensors = _read(f, "<Q")
        alignment = _DEFAULT_ALIGNMENT
        for _ in range(_read(f, "<Q")):
            key = _read_str(f)
            kind = _read(f, "<I")
            if key == "general.alignment" and kind in _SCALARS:
                alignment = int(_read(f, _SCALARS[kind]))
                if key in keys:
                    header.metadata[key] = alignment
            elif key in keys and kind in _SCALARS:
                header.metadata[key] = _read(f, _SCALARS[kind])
            elif key in keys and kind == 8:
                header.metadata[key] = _read_str(f)
            elif key in keys and kind == 7:
                header.metadata[key] = bool(_read(f, "<B"))
            else:
                _skip_value(f, kind)
        if not with_tensors:
            return header
        infos = []
        for _ in range(n_tensors):
            name = _read_str(f)
            dims = tuple(_read(f, "<Q") for _ in range(_read(f, "<I")))
            infos.append((name, dims, _read(f, "<I"), _read(f, "<Q")))
        start = -(-f.tell() // alignment) * alignment
    header.tensors = [GGUFTensorInfo(n, d, t, start + off) for n, d, t, off in infos]
    return header


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_str(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]), 1)
    elif kind == 7:  # bool
        f.seek(1, 1)
    elif kind == 8:  # string
        f.seek(_read(f, "<Q"), 1)
    elif kind == 9:  # array: element type, count, elements
        elem, count = _read(f, "<I"), _read(f, "<Q")
        if elem in _SCALARS or elem == 7:
            f.seek(count * (1 if elem == 7 else struct.calcsize(_SCALARS[elem])), 1)
        else:
            for _ in range(count):
                _skip_value(f, elem)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")
