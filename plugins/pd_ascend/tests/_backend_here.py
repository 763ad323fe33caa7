"""Run by test_pd_ascend_check.py in a child process (the transport libraries load shared
objects globally and log to stdout): build the real AscendBackend on this machine, drive it
until its transport refuses to start, and print what happened as one JSON line."""

from __future__ import annotations

import json
import sys

from pd_ascend.backend import AscendBackend
from pd_ascend.wire import Region

from pdcore.disagg.transfer import MemoryRegion, TransferConfig, TransferError

out: dict[str, str] = {}


def attempt(name: str, fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
        out[name] = "ok"
    except TransferError as exc:
        out[name] = f"TransferError: {exc}"


b = AscendBackend(TransferConfig(local_id="prefill-test", timeout_s=2.0))
attempt("describe", b.describe)
attempt("connect_garbage", lambda: b.connect("p", b"garbage"))
attempt("submit_unknown", lambda: b.submit("nobody", [(1, 2, 3)], b""))
attempt("register_cpu", lambda: b.register_memory([MemoryRegion(4096, 4096)]))
attempt("register_npu", lambda: b.register_memory([Region(1 << 32, 2 << 20, "npu:0")]))
b.close()
b.close()
out["closed"] = "ok"
sys.stdout.flush()
print("RESULT " + json.dumps(out), flush=True)
