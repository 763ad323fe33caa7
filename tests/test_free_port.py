"""free_port (pdcore.model.dist_addr): ports for the processes we start come from below the
kernel's ephemeral range, so an outgoing connection can never have taken one between the
pick and the server's bind (the "address already in use" flake of bind(0) ports)."""

from __future__ import annotations

import socket

import pytest

from pdcore.model import dist_addr
from pdcore.model.dist_addr import free_port


def test_ports_are_free_and_below_the_ephemeral_range() -> None:
    low = dist_addr._ephemeral_low()
    if low <= 11000:
        pytest.skip(f"no room below this kernel's ephemeral range (starts at {low})")
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # random, not one fixed port
    for port in ports:
        assert 10000 <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: binds


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        picks = iter([taken, taken])
        monkeypatch.setattr(dist_addr, "_ephemeral_low", lambda: 65000)
        monkeypatch.setattr(dist_addr._rng, "randrange", lambda a, b: next(picks, 12345))
        assert free_port() != taken


def test_falls_back_to_the_kernel_choice_without_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist_addr, "_ephemeral_low", lambda: 1024)
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
