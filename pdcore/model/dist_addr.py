"""Rendezvous addresses for torch.distributed groups, without importing torch.

The HTTP frontend picks the address and the engine processes join on it; keeping these two
helpers apart from pdcore.model.parallel keeps torch out of the frontend's process.
"""

from __future__ import annotations


def split_host_port(addr: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); ValueError when malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def bind_address(host: str) -> str:
    """The address this node's collectives bind to: its --host, or loopback for a
    wildcard --host on a single node."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
