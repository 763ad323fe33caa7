"""pd_mooncake against a real peer process: byte-exact scattered writes with notifications, many
batches at once, a dead peer failing in bounded time, bad blobs refused.

The receiver is `mooncake_peer.py` in its own process; this process is the sender. Every wait
has a timeout and every peer is killed in a finalizer, so a broken transport fails a test
instead of hanging the suite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

pytest.importorskip("mooncake.engine", exc_type=ImportError)

PEER = Path(__file__).with_name("mooncake_peer.py")
SIZE = 8 << 20
TIMEOUT_S = 20.0


class Peer:
    """A peer process; replies are read on a thread so no read can block the test."""

    def __init__(self, size: int = SIZE) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), "mooncake", str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self.reply()
        self.blob = base64.b64decode(hello["blob"])
        self.addr: int = hello["addr"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self._replies.put(json.loads(line[3:]))

    def reply(self) -> dict[str, Any]:
        try:
            return self._replies.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"peer gave no reply in {TIMEOUT_S} s") from None

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def notifs(self, count: int) -> list[tuple[str, bytes]]:
        got = self.ask(op="notifs", count=count, timeout=TIMEOUT_S)["notifs"]
        return [(s, base64.b64decode(p)) for s, p in got]

    def kill(self) -> None:
        self.proc.kill()  # a no-op once it has exited
        self.proc.wait(timeout=TIMEOUT_S)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.kill()


@pytest.fixture
def sender() -> Iterator[TransferBackend]:
    backend = create_transfer_backend("mooncake", TransferConfig(local_id="sender", timeout_s=5.0))
    yield backend
    backend.close()


def wait(backend: TransferBackend, batches: list[int], limit_s: float = TIMEOUT_S) -> list[Any]:
    deadline = time.monotonic() + limit_s
    states = [backend.poll(b) for b in batches]
    while not all(s.finished for s in states):
        assert time.monotonic() < deadline, "batches still pending past the test's limit"
        time.sleep(0.001)
        states = [backend.poll(b) for b in batches]
    return states


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
