"""Time from `pdcore serve` to a healthy server: first start (GGUF conversion) and a later one.

Uses a fresh PDCORE_CACHE_DIR so the first start really converts. Prints JSON.

    .venv/bin/python bench/startup.py [--model-path PATH] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from pdcore.launch import free_port


def time_to_healthy(cache_dir: str, model_args: list[str], timeout: float = 300.0) -> float:
    port = free_port()
    cmd = [sys.executable, "-m", "pdcore.cli", "serve", "--port", str(port), *model_args]
    env = {**os.environ, "PDCORE_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server did not become healthy")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--runs", type=int, default=2, help="later starts to time")
    args = parser.parse_args()
    model_args = ["--model-path", args.model_path] if args.model_path else []
    with tempfile.TemporaryDirectory(prefix="pdcore-cache-") as cache:
        first = time_to_healthy(cache, model_args)
        later = [time_to_healthy(cache, model_args) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "model": args.model_path or "default (SmolLM2-135M-Instruct GGUF)",
                "first_start_s": round(first, 2),
                "later_starts_s": [round(t, 2) for t in later],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
