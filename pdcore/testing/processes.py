"""What a test or harness asks of a process tree on Linux, read from /proc: is a pid alive
(a zombie is not), its children, and which of them `multiprocessing` spawned (pdcore's
engine, TP followers and pipeline stages -- not the resource tracker)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (none once it is gone)."""
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out += [int(c) for c in f.read_text().split()]
    return out


def spawned_children(pid: int) -> list[int]:
    """The children of `pid` started by multiprocessing's spawn (`spawn_main` in their
    command line), which is how `pdcore serve` starts its engine-side processes."""
    out: list[int] = []
    for child in child_pids(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
    return out
