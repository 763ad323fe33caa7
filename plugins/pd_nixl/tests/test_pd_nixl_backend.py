"""pd_nixl against a real peer process: byte-exact scattered writes with notifications, many
batches at once, a dead peer failing in bounded time, bad blobs refused.

The receiver is pdcore.testing.backend_peer in its own process; this process is the sender. Every wait
has a timeout and every peer is killed in a finalizer, so a broken transport fails a test
instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import numpy as np
import pytest

from pdcore.disagg.transfer import (
    BatchStatus,
    KVLayout,
    MemoryRegion,
    TransferBackend,
    TransferConfig,
    TransferError,
    create_transfer_backend,
    kv_page_runs,
)
from pdcore.testing.backend_harness import SIZE, Peer, make_sender, wait

pytest.importorskip("nixl")


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer("nixl")
    yield p
    p.kill()


@pytest.fixture
def sender() -> Iterator[TransferBackend]:
    backend = make_sender("nixl")
    yield backend
    backend.close()


def test_scattered_kv_pages_arrive_byte_exact(peer: Peer, sender: TransferBackend) -> None:
    # A small KV pool on each side: K then V in one buffer, 4 layers x 64 pages x 1 KiB.
    layers, pages, page_bytes = 4, 64, 1024
    half = layers * pages * page_bytes
    src = np.random.default_rng(0).integers(0, 256, 2 * half, dtype=np.uint8)
    sender.register_memory([MemoryRegion(src.ctypes.data, src.nbytes)])
    sender.connect("decode-0", peer.blob)
    local = KVLayout(src.ctypes.data, src.ctypes.data + half, layers, pages, page_bytes)
    remote = KVLayout(peer.addr, peer.addr + half, layers, pages, page_bytes)
    local_pages, remote_pages = [3, 4, 5, 9, 40], [10, 11, 12, 2, 63]  # some runs coalesce
    runs = kv_page_runs(local, remote, local_pages, remote_pages)
    assert len(runs) == 2 * layers * 3  # 3,4,5 -> 10,11,12 is one run per layer and K/V
    payload = b"room-7\x00\xff"  # binary payloads survive
    [state] = wait(sender, [sender.submit("decode-0", runs, payload)])
    assert state.status is BatchStatus.DONE, state.reason
    assert peer.notifs(1) == [("sender", payload)]

    expected = np.zeros(SIZE, dtype=np.uint8)
    for base in (0, half):
        for layer in range(layers):
            for lp, rp in zip(local_pages, remote_pages):
                s = base + (layer * pages + lp) * page_bytes
                d = base + (layer * pages + rp) * page_bytes
                expected[d : d + page_bytes] = src[s : s + page_bytes]
    assert peer.ask(op="digest")["sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()


def test_many_concurrent_batches(peer: Peer, sender: TransferBackend) -> None:
    src = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8)
    sender.register_memory([MemoryRegion(src.ctypes.data, src.nbytes)])
    sender.connect("decode-0", peer.blob)
    n, chunk = 64, SIZE // 64
    batches = []
    for i in range(n):  # each batch: 16 scattered 1 KiB runs inside its own chunk, reversed
        offs = [i * chunk + j * 4096 for j in range(16)]
        runs = [(src.ctypes.data + o, peer.addr + o + 2048, 1024) for o in reversed(offs)]
        batches.append(sender.submit("decode-0", runs, f"b{i}".encode()))
    states = wait(sender, batches)
    assert all(s.status is BatchStatus.DONE for s in states), states
    got = peer.notifs(n)
    assert sorted(p for _, p in got) == sorted(f"b{i}".encode() for i in range(n))
    expected = np.zeros(SIZE, dtype=np.uint8)
    for i in range(n):
        for j in range(16):
            o = i * chunk + j * 4096
            expected[o + 2048 : o + 3072] = src[o : o + 1024]
    assert peer.ask(op="digest")["sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
    for b in batches:
        sender.release(b)


def test_dead_peer_fails_in_bounded_time(peer: Peer, sender: TransferBackend) -> None:
    src = np.ones(SIZE, dtype=np.uint8)
    sender.register_memory([MemoryRegion(src.ctypes.data, src.nbytes)])
    sender.connect("decode-0", peer.blob)
    runs = [(src.ctypes.data, peer.addr, SIZE)]
    in_flight = [sender.submit("decode-0", runs, b"x") for _ in range(8)]
    peer.kill()  # SIGKILL: some writes may have landed, the rest must fail, none may hang
    t0 = time.monotonic()
    wait(sender, in_flight, limit_s=10.0)
    after = sender.submit("decode-0", runs, b"after")
    [state] = wait(sender, [after], limit_s=10.0)
    assert state.status is BatchStatus.FAILED and state.reason
    assert time.monotonic() - t0 < 10.0
    # Connecting anew to the dead peer: refused, or (NIXL keeps the agent it already knew)
    # accepted and the write fails.
    fresh = create_transfer_backend("nixl", TransferConfig(local_id="sender-2", timeout_s=5.0))
    try:
        with pytest.raises(TransferError, match="cannot connect"):
            fresh.connect("decode-0", peer.blob)
    finally:
        fresh.close()
    sender.connect("decode-1", peer.blob)
    [state] = wait(sender, [sender.submit("decode-1", runs, b"again")], limit_s=10.0)
    assert state.status is BatchStatus.FAILED


def test_bad_blobs_and_bad_runs_are_clear_errors(peer: Peer, sender: TransferBackend) -> None:
    with pytest.raises(TransferError, match="not a pd-nixl peer blob"):
        sender.connect("x", b"garbage")
    with pytest.raises(TransferError, match="not connected"):
        sender.submit("nobody", [(1, 2, 3)], b"")
    src = np.ones(4096, dtype=np.uint8)
    sender.register_memory([MemoryRegion(src.ctypes.data, src.nbytes)])
    sender.connect("decode-0", peer.blob)
    sender.connect("decode-0", peer.blob)  # idempotent
    with pytest.raises(TransferError, match="remote range .* outside"):
        sender.submit("decode-0", [(src.ctypes.data, peer.addr + SIZE - 8, 16)], b"")
    with pytest.raises(TransferError, match="local range .* outside"):
        sender.submit("decode-0", [(src.ctypes.data + 4090, peer.addr, 16)], b"")
    # No runs: the notification alone still arrives (a request with nothing to move).
    [state] = wait(sender, [sender.submit("decode-0", [], b"only")])
    assert state.status is BatchStatus.DONE
    assert peer.notifs(1) == [("sender", b"only")]


def test_plugin_is_registered_and_available() -> None:
    import pd_nixl

    from pdcore.plugins import build_plugin_manager

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(pd_nixl, name="nixl")
    [info] = [i for i in pm.registry("transfer_backend").describe() if i.name == "nixl"]
    assert info.available, info.reason
