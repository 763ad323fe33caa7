"""`pdcore launch`: a PD deployment on this machine in one command.

Starts N prefill and M decode `pdcore serve` processes and a `pdcore router` in front of
them, prints the URL to use, and stops every process on Ctrl-C or SIGTERM — or as soon as
any one of them dies, so a half-working deployment never keeps serving errors.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from pdcore.model.dist_addr import free_port as free_port  # tests and benches import it here

# Real backends, fastest on one machine first; "fake" moves no KV and is never picked.
PREFERRED_BACKENDS = ("nixl", "mooncake")
START_TIMEOUT_S = 600.0


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", type=int, default=1, help="prefill instances (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode instances (default 1)")
    parser.add_argument(
        "--prefill-tp",
        type=int,
        default=1,
        help="TP ranks of each prefill instance (--tp-size of its `pdcore serve`; default 1)",
    )
    parser.add_argument(
        "--decode-tp",
        type=int,
        default=1,
        help="TP ranks of each decode instance; may differ from --prefill-tp (KV moves "
        "sliced by head; default 1)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address every process binds to")
    parser.add_argument("--port", type=int, default=8000, help="the router's port (default 8000)")
    parser.add_argument("--model-path", default=None, help="model (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--backend",
        default="auto",
        help="transfer backend: auto (the best available: nixl, then mooncake) or a name",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every `pdcore serve` (repeatable), e.g. --serve-arg=--dtype=float32",
    )


def pick_backend(requested: str) -> str:
    """The transfer backend to use, or SystemExit naming --backend and what is installed."""
    from pdcore.plugins import PluginError, get_registry

    registry = get_registry("transfer_backend")
    if requested != "auto":
        try:
            registry.require(requested)  # unknown or unavailable: the registry says why
        except PluginError as exc:
            raise SystemExit(f"pdcore launch: error: --backend: {exc}") from None
        return requested
    infos = {info.name: info for info in registry.describe()}
    for name in PREFERRED_BACKENDS:
        if name in infos and infos[name].available:
            return name
    raise SystemExit(
        "pdcore launch: error: no transfer backend is available; install pd-nixl or pd-mooncake "
        "(or pass --backend fake to debug the pipelines with meaningless tokens)"
    )


@dataclass
class _Child:
    name: str
    url: str
    proc: subprocess.Popen
    extra: dict = field(default_factory=dict)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Deployment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children: list[_Child] = []
        self.backend = pick_backend(args.backend)
        for flag in ("prefill_tp", "decode_tp"):
            if getattr(args, flag) < 1:
                raise SystemExit(f"pdcore launch: error: --{flag.replace('_', '-')} must be >= 1")
        ranks = args.prefill * args.prefill_tp + args.decode * args.decode_tp
        threads = max(1, (os.cpu_count() or 2) // max(1, ranks))
        self.common = [
            *(["--model-path", args.model_path] if args.model_path else []),
            "--host",
            args.host,
            "--disaggregation-transfer-backend",
            self.backend,
            "--cpu-threads",
            str(threads),
            *args.serve_arg,
        ]

    def _spawn(self, name: str, argv: list[str], url: str, **extra: Any) -> _Child:
        cmd = [sys.executable, "-m", "pdcore.cli", *argv]
        child = _Child(name, url, subprocess.Popen(cmd), extra)
        self.children.append(child)
        return child

    def start(self) -> str:
        host = self.args.host
        prefills, decodes = [], []
        for i in range(self.args.prefill):
            port, boot = free_port(host), free_port(host)
            argv = ["serve", *self.common, "--port", str(port), "--disaggregation-mode", "prefill"]
            argv += ["--disaggregation-bootstrap-port", str(boot)]
            argv += ["--tp-size", str(self.args.prefill_tp)]
            prefills.append(self._spawn(f"prefill-{i}", argv, f"http://{host}:{port}", boot=boot))
        for i in range(self.args.decode):
            port = free_port(host)
            argv = ["serve", *self.common, "--port", str(port), "--disaggregation-mode", "decode"]
            argv += ["--tp-size", str(self.args.decode_tp)]
            decodes.append(self._spawn(f"decode-{i}", argv, f"http://{host}:{port}"))
        self._wait_healthy(prefills + decodes)
        router_argv = [
            "router",
            "--pd-disaggregation",
            "--host",
            host,
            "--port",
            str(self.args.port),
        ]
        for p in prefills:
            router_argv += ["--prefill", p.url, str(p.extra["boot"])]
        for d in decodes:
            router_argv += ["--decode", d.url]
        router = self._spawn("router", router_argv, f"http://{host}:{self.args.port}")
        self._wait_healthy([router])
        return router.url

    def _wait_healthy(self, children: list[_Child]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")
                if _healthy(child.url):
                    pending.remove(child)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not healthy after {START_TIMEOUT_S:.0f}s: {[c.name for c in pending]}"
                )
            time.sleep(0.25)

    def watch(self) -> str:
        """Block until a child exits; return its name."""
        while True:
            for child in self.children:
                if child.proc.poll() is not None:
                    return child.name
            time.sleep(0.5)

    def stop(self) -> None:
        for child in reversed(self.children):  # router first: no new requests
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 20
        for child in reversed(self.children):
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def run_launch(args: argparse.Namespace) -> int:
    deployment = Deployment(args)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    try:
        url = deployment.start()
        print(
            f"pdcore launch: ready at {url} (router) with {args.prefill} prefill (tp "
            f"{args.prefill_tp}) and {args.decode} decode (tp {args.decode_tp}) instance(s), "
            f"backend {deployment.backend}; Ctrl-C stops all",
            flush=True,
        )
        died = deployment.watch()
        print(f"pdcore launch: {died} exited; stopping everything", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"pdcore launch: error: {exc}", file=sys.stderr)
        return 1
    finally:
        deployment.stop()
