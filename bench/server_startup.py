"""How long `pdcore serve` takes to become healthy, and the CPU its processes spend on it.

Every test that starts a server pays this, and so does every restart in production. The
script starts the server `--repeats` times on a free port, polls /health until 200, sends
one chat request (the first one loads the chat renderer), stops it with SIGTERM and
prints JSON: seconds until healthy, until the first chat answer, to stop, and the CPU
seconds of the server's whole process tree (frontend, engine, multiprocessing's helper).

    .venv/bin/python bench/server_startup.py                      # the default model
    .venv/bin/python bench/server_startup.py --model-path DIR     # e.g. a tiny HF folder
    .venv/bin/python bench/server_startup.py --fresh-cache        # + a first start that
                                                                  # converts the GGUF
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_start(extra: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cpu0 = _children_cpu()
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pdcore.server.launch", "--port", str(port), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            healthy = time.monotonic() - t0
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            httpx.post(url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()
            first_chat = time.monotonic() - t0
            t1 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            stop = time.monotonic() - t1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {
        "healthy_s": round(healthy, 2),
        "first_chat_s": round(first_chat, 2),
        "stop_s": round(stop, 2),
        "cpu_s": round(_children_cpu() - cpu0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--fresh-cache",
        action="store_true",
        help="an empty PDCORE_CACHE_DIR: the first start converts the GGUF (reported apart)",
    )
    args, extra = ap.parse_known_args()
    flags = ["--dtype", "float32", "--max-total-tokens", "4096", *extra]
    if args.model_path:
        flags += ["--model-path", args.model_path]
    runs = []
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PDCORE_CACHE_DIR": str(Path(tmp) / "cache")}
        if args.fresh_cache:
            first = one_start(flags, Path(tmp) / "first.log", env)
        for i in range(args.repeats):
            runs.append(one_start(flags, Path(tmp) / f"server{i}.log", env if first else None))
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        json.dumps(
            {
                "model": args.model_path or "default (SmolLM2-135M Q4_1 GGUF)",
                "flags": flags,
                "cpu": cpu or platform.processor(),
                "first_start_fresh_cache": first,
                "median": summary,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
