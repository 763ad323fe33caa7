"""Rendezvous addresses for torch.distributed groups, and free ports, without importing torch.

The HTTP frontend picks the address and the engine processes join on it; keeping these
helpers apart from pdcore.model.parallel keeps torch out of the frontend's process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_rng = random.Random()  # seeded from os.urandom; apart from any seed a caller sets


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now, for a process we are about to start. Picked at
    random below the kernel's ephemeral range where there is room: a port from bind(0) IS
    an ephemeral one, which any outgoing connection (an HTTP client, a transfer engine) may
    take before our process binds it ("address already in use", seen in the test suite)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    for _ in range(64 if low > 11000 else 0):
        port = _rng.randrange(10000, low)
        with socket.socket(family) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
