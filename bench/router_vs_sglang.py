"""pdcore router vs sglang-router (Rust), in front of the same stub workers, in one run.

Two stub workers -- a prefill and a decode -- answer every request at once with a small
fixed JSON body (a raw asyncio HTTP/1.1 server with keep-alive, uvloop when installed), so
what is measured is the router: its HTTP parsing, the two legs it sends per request and
the response it relays. Each router runs with round_robin and no health checks, one after
the other, on the same stubs -- pdcore once per `--router-processes` count (1 and 2 by
default), then sglang-router; a raw keep-alive client (one connection per concurrent
stream) sends non-streaming `/generate` requests for a fixed time at each concurrency, and
the same straight to the decode stub gives the "direct" baseline.

Reported per target and concurrency: requests/s, p50/p99 latency, for the routers the
latency they add over direct, and the router's CPU per request: utime + stime of all its
processes (the supervisor and its router processes for pdcore with N > 1; every thread,
from /proc/<pid>/stat) over the run, divided by the requests answered -- a figure that
does not depend on how busy the machine is. For pdcore with N > 1 the requests each
router process answered are recorded too (how evenly SO_REUSEPORT spread the
connections). The machine's load average is recorded: on a shared 2-core machine client,
routers and stubs compete for the same cores, so run it when quiet.

    .venv/bin/python bench/router_vs_sglang.py > docs/router_vs_sglang.json   # ~2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deploy import PDCORE, Proc, cpu_model, free_port, tree_cpu_seconds  # noqa: E402

STUB_BODY = json.dumps(
    {
        "text": " ok",
        "output_ids": [1],
        "meta_info": {
            "id": "stub",
            "finish_reason": {"type": "length", "length": 1},
            "prompt_tokens": 4,
            "completion_tokens": 1,
            "cached_tokens": 0,
        },
    }
).encode()
REQUEST_BODY = json.dumps(
    {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 1}}
).encode()


def _content_length(head: bytes) -> int:
    """Content-Length of a lower-cased HTTP head (0 when absent)."""
    i = head.find(b"content-length:")
    if i < 0:
        return 0
    end = head.find(b"\r\n", i)
    return int(head[i + 15 : end if end > 0 else len(head)].strip())


# --- the stub worker ---------------------------------------------------------------------


class StubProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive: read head + Content-Length body, answer 200 with STUB_BODY."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = _content_length(head)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            path = head.split(b" ", 2)[1] if b" " in head else b"/"
            body = STUB_BODY
            if path.startswith(b"/get_load"):
                body = b'[{"dp_rank":0,"num_reqs":0,"num_waiting_reqs":0,"num_tokens":0}]'
            elif path.startswith((b"/health", b"/flush_cache")):
                body = b""
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )


def run_stub(port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(StubProtocol, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


# --- the client --------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    low = head.lower()
    if b"transfer-encoding: chunked" in low:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(_content_length(low[:-2]))
    if status != 200:
        raise RuntimeError(f"HTTP {status}")


async def load(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop: `concurrency` connections each sending the next request on answer."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /generate HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(REQUEST_BODY)}\r\n\r\n"
    ).encode() + REQUEST_BODY
    latencies: list[float] = []
    answered = 0  # warm-up included: what the router's CPU time is divided by
    errors = 0
    deadline = time.perf_counter() + seconds
    warm = time.perf_counter() + min(1.0, seconds / 5)

    async def stream() -> None:
        nonlocal errors, answered
        reader, writer = await asyncio.open_connection(host, int(port))
        while (now := time.perf_counter()) < deadline:
            writer.write(request)
            try:
                await _read_response(reader)
            except Exception:
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
                continue
            answered += 1
            if now >= warm:
                latencies.append(time.perf_counter() - now)
        writer.close()

    await asyncio.gather(*(stream() for _ in range(concurrency)))
    measured = deadline - warm  # the window whose answers are counted
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "answered": answered,
        "errors": errors,
        "req_per_s": round(len(latencies) / measured, 1),
        "p50_ms": round(q[49] * 1000, 3),
        "p99_ms": round(q[98] * 1000, 3),
    }


def measure(
    url: str,
    concurrencies: list[int],
    seconds: float,
    pid: int | None = None,
    processes: bool = False,
) -> list[dict[str, Any]]:
    """One load per concurrency; with `pid` (a router), its CPU per request too; with
    `processes` (pdcore with N > 1), the requests each router process answered."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out = []
    for c in concurrencies:
        counts = per_process_requests(url) if processes else {}
        before = tree_cpu_seconds(pid) if pid else 0.0
        r = asyncio.run(load(url, c, seconds))
        if pid:
            used = tree_cpu_seconds(pid) - before
            r["router_cpu_s"] = round(used, 2)
            r["router_cpu_us_per_req"] = round(used / max(1, r["answered"]) * 1e6, 1)
        if processes:
            after = per_process_requests(url)
            r["per_process_answered"] = {k: v - counts.get(k, 0) for k, v in after.items()}
        out.append(r)
    return out


# --- the deployment ----------------------------------------------------------------------


def start_stub(name: str, log: Path) -> Proc:
    port = free_port()
    proc = Proc.__new__(Proc)
    proc.name, proc.url = name, f"http://127.0.0.1:{port}"
    proc.log_path = log / f"{name}.log"
    proc._log = open(proc.log_path, "wb")  # noqa: SIM115 - closed in stop()
    proc.proc = subprocess.Popen(
        [sys.executable, __file__, "--stub", str(port)], stdout=proc._log, stderr=subprocess.STDOUT
    )
    proc.wait_healthy(30)
    return proc


def start_router(kind: str, log: Path, prefill: Proc, decode: Proc, processes: int = 1) -> Proc:
    port = free_port()
    workers = ["--prefill", prefill.url, "none", "--decode", decode.url]
    common = [
        "--pd-disaggregation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--policy",
        "round_robin",
        "--disable-health-check",
        *workers,
    ]
    if kind == "pdcore":
        args = [*PDCORE, "router", *common, "--log-level", "warning"]
        args += ["--router-processes", str(processes)]
        name = f"pdcore_{processes}p"
    else:
        args = [sys.executable, "-m", "sglang_router.launch_router", *common, "--log-level", "warn"]
        name = kind
    proc = Proc.__new__(Proc)
    proc.name, proc.url = name, f"http://127.0.0.1:{port}"
    proc.log_path = log / f"router-{name}.log"
    proc._log = open(proc.log_path, "wb")  # noqa: SIM115 - closed in stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}
    proc.proc = subprocess.Popen(args, stdout=proc._log, stderr=subprocess.STDOUT, env=env)
    proc.wait_healthy(60)
    # Each new connection lands on one router process (SO_REUSEPORT hashes it); one still
    # starting answers once it serves, so after these every process is up.
    for _ in range(8 * processes):
        httpx.get(proc.url + "/health", timeout=60)
    return proc


def per_process_requests(url: str) -> dict[str, float]:
    """pdcore_router_process_requests by pid, from the router's merged /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(r'^pdcore_router_process_requests\{pid="(\d+)"\} (\S+)$', text, re.M)
    return {pid: float(v) for pid, v in found}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stub", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--routers", nargs="+", default=["pdcore", "sglang"])
    ap.add_argument(
        "--router-processes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="pdcore router's --router-processes: one run per count (default: 1 2)",
    )
    args = ap.parse_args()
    if args.stub:
        run_stub(args.stub)
        return
    log = Path(tempfile.mkdtemp(prefix="router-vs-sglang-"))
    prefill, decode = start_stub("prefill-stub", log), start_stub("decode-stub", log)
    results: dict[str, Any] = {
        "load_average_before": os.getloadavg(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
    }
    targets: list[str] = []
    try:
        results["direct"] = measure(decode.url, args.concurrency, args.seconds)
        for kind in args.routers:
            for n in args.router_processes if kind == "pdcore" else [1]:
                router = start_router(kind, log, prefill, decode, n)
                try:
                    pid, several = router.proc.pid, kind == "pdcore" and n > 1
                    results[router.name] = measure(
                        router.url, args.concurrency, args.seconds, pid, several
                    )
                finally:
                    router.stop()
                targets.append(router.name)
        results["direct_after"] = measure(decode.url, args.concurrency, args.seconds)
    finally:
        prefill.stop()
        decode.stop()
    results["load_average_after"] = os.getloadavg()
    summary = {}
    for i, c in enumerate(args.concurrency):
        direct = results["direct"][i]
        row: dict[str, Any] = {}
        for name in targets:
            r = results[name][i]
            row[name] = {
                "req_per_s": r["req_per_s"],
                "added_p50_ms": round(r["p50_ms"] - direct["p50_ms"], 3),
                "added_p99_ms": round(r["p99_ms"] - direct["p99_ms"], 3),
                "cpu_us_per_req": r["router_cpu_us_per_req"],
            }
            if "per_process_answered" in r:  # how evenly the kernel spread the connections
                row[name]["per_process_answered"] = sorted(r["per_process_answered"].values())
        if "sglang" in targets:
            s = row["sglang"]
            for name in [t for t in targets if t.startswith("pdcore")]:
                p = row[name]
                row[f"{name}_vs_sglang"] = {
                    "req_per_s_ratio": round(p["req_per_s"] / s["req_per_s"], 3),
                    "added_p50_ratio": _ratio(p["added_p50_ms"], s["added_p50_ms"]),
                    "cpu_per_req_ratio": _ratio(p["cpu_us_per_req"], s["cpu_us_per_req"]),
                }
        summary[f"concurrency_{c}"] = row
    print(json.dumps({"summary": summary, **results, "logs": str(log)}, indent=2))


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


if __name__ == "__main__":
    main()
