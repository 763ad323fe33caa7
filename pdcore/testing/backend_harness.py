"""Test harness for transfer-backend authors: a receiving peer in its own process and a
sender in this one, with every wait bounded so a broken transport fails instead of hanging.

    peer = Peer("nixl")                    # python -m pdcore.testing.backend_peer nixl SIZE
    sender = make_sender("nixl")
    sender.register_memory(...); sender.connect("decode-0", peer.blob)
    [state] = wait(sender, [sender.submit("decode-0", runs, b"room-7")])
    assert peer.notifs(1) == [("sender", b"room-7")]
    assert peer.ask(op="digest")["sha256"] == ...
"""

from __future__ import annotations

import base64
import json
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from pdcore.disagg.transfer import TransferBackend, TransferConfig, create_transfer_backend

SIZE = 8 << 20
TIMEOUT_S = 20.0


class Peer:
    """A peer process; replies are read on a thread so no read can block the test."""

    def __init__(self, backend: str, size: int = SIZE) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdcore.testing.backend_peer", backend, str(size)],
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


def make_sender(backend: str, local_id: str = "sender") -> TransferBackend:
    return create_transfer_backend(backend, TransferConfig(local_id=local_id, timeout_s=5.0))


def wait(backend: TransferBackend, batches: list[int], limit_s: float = TIMEOUT_S) -> list[Any]:
    deadline = time.monotonic() + limit_s
    states = [backend.poll(b) for b in batches]
    while not all(s.finished for s in states):
        assert time.monotonic() < deadline, "batches still pending past the test's limit"
        time.sleep(0.001)
        states = [backend.poll(b) for b in batches]
    return states
