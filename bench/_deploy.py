"""Start and stop real pdcore processes for the benches (pinned to cores where asked), and
what the benches record about the machine (CPU model, a process tree's CPU time)."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pdcore.launch import free_port

PDCORE = [sys.executable, "-m", "pdcore.cli"]


class Proc:
    """One `pdcore ...` process, optionally pinned to `cores`; its log goes to a file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        url: str,
        cores: set[int] | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        self.proc = subprocess.Popen(
            [*PDCORE, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,  # children (the engine process) inherit the affinity
        )

    def wait_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not healthy after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def serve(name: str, log_dir: Path, serve_args: list[str], cores: set[int] | None = None) -> Proc:
    port = free_port()
    args = ["serve", "--port", str(port), *serve_args]
    return Proc(name, args, log_dir, f"http://127.0.0.1:{port}", cores)


def router(log_dir: Path, prefill: Proc, boot_port: int, decode: Proc) -> Proc:
    port = free_port()
    args = [
        "router",
        "--pd-disaggregation",
        "--port",
        str(port),
        "--prefill",
        prefill.url,
        str(boot_port),
        "--decode",
        decode.url,
    ]
    return Proc("router", args, log_dir, f"http://127.0.0.1:{port}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the JSON of a run."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for f in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in f.read_text().split()]
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants, every thread (ended threads too: a
    process's /proc/<pid>/stat sums them), in seconds."""
    ticks = 0
    for p in _process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")
