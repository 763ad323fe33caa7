"""pd_fake: notifications arrive, nothing moves, runs are checked, dead peers fail in time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pd_fake
import pytest

from pdcore.disagg.transfer import (
    BatchStatus,
    MemoryRegion,
    Notification,
    TransferBackend,
    TransferConfig,
    TransferError,
    create_transfer_backend,
)
from pdcore.plugins import Registry, build_plugin_manager

T = TypeVar("T")
Pair = tuple[TransferBackend, TransferBackend, np.ndarray, np.ndarray]


@pytest.fixture
def registry() -> Registry[Any]:
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(pd_fake, name="fake")
    return pm.registry("transfer_backend")


@pytest.fixture
def pair(registry: Registry[Any]) -> Iterator[Pair]:
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    cfg = TransferConfig(local_id="prefill-0", timeout_s=0.5)
    sender = create_transfer_backend("fake", cfg, registry=registry)
    receiver = create_transfer_backend(
        "fake", TransferConfig(local_id="decode-0"), registry=registry
    )
    sender.register_memory([MemoryRegion(src.ctypes.data, src.nbytes)])
    receiver.register_memory([MemoryRegion(dst.ctypes.data, dst.nbytes)])
    sender.connect("decode-0", receiver.describe())
    yield sender, receiver, src, dst
    sender.close()
    receiver.close()
    sender.close()  # twice is fine


def until(pred: Callable[[], T | None], limit_s: float = 5.0) -> T:
    deadline = time.monotonic() + limit_s
    while not (value := pred()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)
    return value


def test_batches_finish_and_notify_but_move_nothing(pair: Pair) -> None:
    sender, receiver, src, dst = pair
    runs = [(src.ctypes.data + i * 512, dst.ctypes.data + i * 512, 256) for i in range(8)]
    ids = [sender.submit("decode-0", runs, f"room-{i}".encode()) for i in range(20)]
    states = until(lambda: [s for s in map(sender.poll, ids) if s.finished] or None)
    assert all(s.status is BatchStatus.DONE for s in states)
    got: list[Notification] = []
    until(lambda: got.extend(receiver.fetch_notifications()) or len(got) == 20)
    assert got == [Notification("prefill-0", f"room-{i}".encode()) for i in range(20)]
    assert not dst.any()  # meaningless tokens: nothing was copied
    for i in ids:
        sender.release(i)
    with pytest.raises(TransferError, match="unknown batch"):
        sender.poll(ids[0])


def test_runs_are_checked_against_registered_memory(pair: Pair) -> None:
    sender, _, src, dst = pair
    with pytest.raises(TransferError, match="remote range"):
        sender.submit("decode-0", [(src.ctypes.data, dst.ctypes.data + 4000, 200)], b"")
    with pytest.raises(TransferError, match="not connected"):
        sender.submit("elsewhere", [], b"")
    with pytest.raises(TransferError, match="not a pd-fake peer blob"):
        sender.connect("x", b"\x81\xa3tag\xa4nixl")


def test_dead_peer_fails_within_timeout(pair: Pair) -> None:
    sender, receiver, _, _ = pair
    until(lambda: sender.poll(sender.submit("decode-0", [], b"warm")).finished)
    receiver.close()
    # Death is seen when the TCP connection drops; a notification sent in the instant before
    # that is reported done (and lost), which is why decode also has a heartbeat.
    time.sleep(0.2)
    t0 = time.monotonic()
    batch = sender.submit("decode-0", [], b"lost")
    state = until(lambda: (s := sender.poll(batch)).finished and s)
    assert state.status is BatchStatus.FAILED and "unreachable" in (state.reason or "")
    assert time.monotonic() - t0 < 3.0
