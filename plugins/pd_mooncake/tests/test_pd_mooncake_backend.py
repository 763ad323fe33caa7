"""pd_mooncake against a real peer process: a batch larger than Mooncake's queue, a dead peer
failing in bounded time, bad blobs refused (the generic checks are the conformance kit's).

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
    MemoryRegion,
    TransferBackend,
    TransferConfig,
    TransferError,
    create_transfer_backend,
)
from pdcore.testing.backend_harness import SIZE, Peer, make_sender, wait

pytest.importorskip("mooncake.engine", exc_type=ImportError)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer("mooncake")
    yield p
    p.kill()


@pytest.fixture
def sender() -> Iterator[TransferBackend]:
    backend = make_sender("mooncake")
    yield backend
    backend.close()


# Scattered byte-exact writes and many concurrent batches: the conformance kit checks those
# (test_pd_mooncake_conformance.py); here only what is particular to Mooncake.


def test_batch_larger_than_the_in_flight_cap_arrives_whole(
    peer: Peer, sender: TransferBackend
) -> None:
    # More runs than Mooncake takes at once (its TCP lane queue overflows): posted as earlier ones finish.
    from pd_mooncake.backend import MAX_RUNS_IN_FLIGHT

    n = 3 * MAX_RUNS_IN_FLIGHT + 7
    src = np.random.default_rng(2).integers(0, 256, SIZE, dtype=np.uint8)
    sender.register_memory([MemoryRegion(src.ctypes.data, src.nbytes)])
    sender.connect("decode-0", peer.blob)
    offs = np.random.default_rng(3).permutation(SIZE // 2048)[:n] * 2048
    runs = [(src.ctypes.data + int(o), peer.addr + int(o) + 1024, 512) for o in offs]
    [state] = wait(sender, [sender.submit("decode-0", runs, b"big")])
    assert state.status is BatchStatus.DONE, state.reason
    assert peer.notifs(1) == [("sender", b"big")]
    expected = np.zeros(SIZE, dtype=np.uint8)
    for o in offs:
        expected[o + 1024 : o + 1536] = src[o : o + 512]
    assert peer.ask(op="digest")["sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()


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
    # Connecting anew to the dead peer is refused at once.
    fresh = create_transfer_backend("mooncake", TransferConfig(local_id="sender-2", timeout_s=5.0))
    try:
        with pytest.raises(TransferError, match="cannot connect"):
            fresh.connect("decode-0", peer.blob)
    finally:
        fresh.close()


def test_bad_blobs_and_bad_runs_are_clear_errors(peer: Peer, sender: TransferBackend) -> None:
    with pytest.raises(TransferError, match="not a pd-mooncake peer blob"):
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
    import pd_mooncake

    from pdcore.plugins import build_plugin_manager

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(pd_mooncake, name="mooncake")
    [info] = [i for i in pm.registry("transfer_backend").describe() if i.name == "mooncake"]
    assert info.available, info.reason
