"""A receiving peer in its own process, driven over stdin/stdout by the tests.

Run as `python -m pdcore.testing.backend_peer BACKEND SIZE` (see backend_harness.Peer). It registers
a zeroed buffer of SIZE bytes, prints its blob, then answers JSON commands one per line:
`{"op": "notifs", "count": N, "timeout": S}`, `{"op": "digest"}`, `{"op": "exit"}`.
Replies start with `@@ ` so that transport libraries' own stdout logging cannot confuse them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time

import numpy as np

from pdcore.disagg.transfer import MemoryRegion, TransferConfig, create_transfer_backend


def reply(obj: dict[str, object]) -> None:
    print("@@ " + json.dumps(obj), flush=True)


def main() -> None:
    name, size = sys.argv[1], int(sys.argv[2])
    buf = np.zeros(size, dtype=np.uint8)
    backend = create_transfer_backend(name, TransferConfig(local_id=f"peer-{name}-{size}"))
    backend.register_memory([MemoryRegion(buf.ctypes.data, buf.nbytes)])
    reply({"blob": base64.b64encode(backend.describe()).decode(), "addr": buf.ctypes.data})
    got: list[list[str]] = []
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "notifs":
            deadline = time.monotonic() + cmd["timeout"]
            while len(got) < cmd["count"] and time.monotonic() < deadline:
                got += [
                    [n.sender, base64.b64encode(n.payload).decode()]
                    for n in backend.fetch_notifications()
                ]
                time.sleep(0.001)
            reply({"notifs": got})
            got = []
        elif cmd["op"] == "digest":
            reply({"sha256": hashlib.sha256(buf.tobytes()).hexdigest()})
        elif cmd["op"] == "exit":
            break
    backend.close()


if __name__ == "__main__":
    main()
