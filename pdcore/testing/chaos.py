"""A load and chaos harness for a real PD deployment: `pdcore router` in front of real
`pdcore serve` prefill and decode processes on 127.0.0.1, concurrent streaming clients that
cancel at random moments, kill -9 and SIGSTOP of instances (restarted on the same ports, the
router's health checks take them back), and the end-of-run invariants of
docs/reliability.md:

1. every request either completed with exactly the tokens it asked for (greedy requests:
   the same prompt's known-good output, taken through the healthy deployment before the
   chaos and, for an HF folder, checked against transformers) or got a clear error -- none
   hung, none ended without `[DONE]` or an error;
2. nothing is left open: the router has no request in flight on any worker, every server's
   `/get_load` says `num_reqs: 0`;
3. after `/flush_cache` every server holds 0 KV tokens;
4. no page stayed in decode's quarantine past its timeout (beyond a slack, and the time the
   instance was SIGSTOPped);
5. the RSS of each instance that was never restarted is, after the run, within
   `rss_tolerance` of its RSS after warm-up (both measured idle, after `/flush_cache`).

`run_chaos(ChaosConfig(...))` returns a ChaosReport (numbers as JSON, `violations` empty when
every invariant held). Used by tests/test_chaos.py (CI) and bench/chaos_soak.py (>= 10 min).
Nothing in pdcore's serving path imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdcore.launch import free_port
from pdcore.testing.processes import child_pids, pid_alive

PDCORE = [sys.executable, "-m", "pdcore.cli"]

# Faster failure detection than the default (5 s x 2) for a chaos run: decode <-> prefill
# heartbeats every second, three missed ones declare the peer dead (0.5 s x 2 gives false
# alarms on a loaded 2-core machine).
FAST_HEARTBEAT = {
    "PDCORE_DISAGGREGATION_HEARTBEAT_INTERVAL": "1.0",
    "PDCORE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "3",
}
# The router: health checks every 0.5 s (2 failures out, 1 success back), short retry
# pauses, breakers that let a restarted worker back after 2 s.
ROUTER_FLAGS = (
    *("--health-check-interval-secs", "0.5", "--health-failure-threshold", "2"),
    *("--health-success-threshold", "1", "--health-check-timeout-secs", "2"),
    *("--retry-initial-backoff-ms", "20", "--retry-max-backoff-ms", "500"),
    *("--cb-timeout-duration-secs", "2", "--request-timeout-secs", "30"),
    *("--worker-startup-timeout-secs", "0", "--log-level", "warning"),
)
# /metrics counters the report shows (failures, retries, transfers).
COUNTERS = (
    "pdcore_pd_heartbeat_failures_total",
    "pdcore_kv_transfer_failures_by_reason_total",
    "pdcore_kv_transfers{",
    "pdcore_router_retries_total",
    "pdcore_router_retries_exhausted_total",
    "pdcore_router_leg_failures_total",
    "pdcore_router_no_available_worker_total",
)
SERVER_FLAGS = ("--dtype", "float32", "--max-total-tokens", "16384", "--log-level", "warning")


# -- the deployment ---------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Instance:
    """One `pdcore serve` (or `pdcore router`) process on a fixed port, so a restart keeps
    its URL (and a prefill its bootstrap port); its log goes to `<name>.<start>.log`."""

    def __init__(
        self, name: str, role: str, argv: list[str], logdir: Path, env: dict[str, str]
    ) -> None:
        self.name, self.role, self.logdir, self.env = name, role, logdir, env
        self.port = free_port()
        self.boot_port = free_port() if role == "prefill" else None
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*argv, "--port", str(self.port)]
        if self.boot_port is not None:
            self.argv += ["--disaggregation-bootstrap-port", str(self.boot_port)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopped_s = 0.0  # total time SIGSTOPped

    def spawn(self) -> Instance:
        self.starts += 1
        log = open(self.logdir / f"{self.name}.{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()  # the child has its own copy
        return self

    def wait_ready(self, timeout: float = 300.0, path: str = "/health") -> Instance:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout:g} s: {self.log()}")

    def log(self, tail: int = 3000) -> str:
        path = self.logdir / f"{self.name}.{self.starts}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def pids(self) -> list[int]:
        """The server and its engine process(es) (multiprocessing's spawn children; not
        its resource tracker)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        pids = [self.proc.pid]
        for child in child_pids(self.proc.pid):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    pids.append(child)
        return pids

    def rss_mib(self) -> float:
        return round(sum(_rss_kib(p) for p in self.pids()) / 1024, 1)

    def rss_parts_mib(self) -> list[float]:
        """RSS of the server process, then of each engine process."""
        return [round(_rss_kib(p) / 1024, 1) for p in self.pids()]

    def cpu_s(self) -> float:
        return sum(_cpu_s(p) for p in self.pids())

    def kill9(self) -> None:
        """SIGKILL the server and its engine at once (a machine or OOM kill)."""
        assert self.proc is not None
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        for pid in pids[1:]:
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = self.pids()
        self.signal_all(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in pids[1:]:
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class Deployment:
    """`prefills` + `decodes` servers and a router over them."""

    def __init__(self, cfg: ChaosConfig, logdir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}
        env.update(FAST_HEARTBEAT)
        env.update(cfg.env)
        common = [*PDCORE, "serve", "--model-path", cfg.model, "--backend", cfg.backend]
        common += [*SERVER_FLAGS, *cfg.server_args]
        self.servers: list[Instance] = []
        for role, n in (("prefill", cfg.prefills), ("decode", cfg.decodes)):
            for i in range(n):
                argv = [*common, "--disaggregation-mode", role]
                self.servers.append(Instance(f"{role[0].upper()}{i}", role, argv, logdir, env))
        flags = ["--pd-disaggregation"]
        for s in self.servers:
            if s.role == "prefill":
                flags += ["--prefill", s.url, str(s.boot_port)]
        flags += ["--decode", *(s.url for s in self.servers if s.role == "decode")]
        router_env = {**env, "PDCORE_PLUGINS": ""}
        argv = [*PDCORE, "router", *flags, *ROUTER_FLAGS, *cfg.router_args]
        self.router = Instance("router", "router", argv, logdir, router_env)
        self.start_timeout = cfg.start_timeout_s

    def start(self) -> Deployment:
        for s in self.servers:  # all load at once
            s.spawn()
        for s in self.servers:
            s.wait_ready(self.start_timeout)
        self.router.spawn().wait_ready(60)
        return self

    def stop(self) -> None:
        for inst in (self.router, *self.servers):
            inst.stop()

    def role(self, role: str) -> list[Instance]:
        return [s for s in self.servers if s.role == role]


# -- the plan ---------------------------------------------------------------------------


@dataclass
class Fault:
    """At `at_s` into the chaos phase: `kind` "kill9" (SIGKILL the server and its engine,
    restart on the same port after `down_s`) or "stop" (SIGSTOP both for `down_s`, then
    SIGCONT) of instance `target` (a name such as "P0"), or of a random instance of
    `role`."""

    at_s: float
    kind: str = "kill9"
    role: str = "prefill"
    target: str | None = None
    down_s: float = 1.0


def random_faults(
    rng: random.Random,
    duration_s: float,
    every_s: tuple[float, float],
    targets: dict[str, list[str]],
    down_s: tuple[float, float] = (0.5, 4.0),
) -> list[Fault]:
    """A fault every `every_s` (uniform) seconds over `duration_s`, leaving the last 10% of
    the run quiet; its kind drawn from `targets` (kind -> instance names it may hit, e.g.
    `{"kill9": ["P1", "D1"], "stop": ["P0", "P1", "D0", "D1"]}`), then its target."""
    kinds = sorted(targets)
    out, t = [], rng.uniform(*every_s)
    while t < duration_s * 0.9:
        kind = rng.choice(kinds)
        target = rng.choice(targets[kind])
        out.append(Fault(round(t, 1), kind, "", target, round(rng.uniform(*down_s), 1)))
        t += rng.uniform(*every_s)
    return out


@dataclass
class ChaosConfig:
    """One chaos run: the deployment (`prefills` + `decodes` servers of `model` over
    `backend`, extra `server_args` / `router_args` / `env`), the load (`clients` concurrent
    clients; request mix: `greedy_fraction`, `stream_fraction`, `max_tokens` and
    `prompt_tokens` ranges, `cancel_fraction`), the `faults`, and the bounds the invariants
    use (`request_timeout_s`, `rss_tolerance`, `quarantine_slack_s`)."""

    model: str
    prefills: int = 1
    decodes: int = 1
    backend: str = "nixl"
    clients: int = 32  # concurrent streams
    # The load runs until at least `requests` were sent and at least `duration_s` passed
    # (either may be None), every fault is over, and one more round of `clients` requests
    # went out after the last one healed; never longer than `max_duration_s`.
    requests: int | None = None
    duration_s: float | None = None
    max_duration_s: float | None = None
    cancel_fraction: float = 0.3
    greedy_fraction: float = 0.8  # the rest sample (temperature 1): only their length is checked
    stream_fraction: float = 0.9
    max_tokens: tuple[int, int] = (2, 12)
    prompt_tokens: tuple[int, int] = (4, 60)
    num_prompts: int = 24
    faults: list[Fault] = field(default_factory=list)
    seed: int = 0
    request_timeout_s: float = 90.0  # a request still open after this long hung
    error_pause_s: float = 0.2  # a client pauses this long after an error (no hot loop)
    warmup_rounds: int = 2  # rounds of `clients` concurrent requests before the baseline
    sample_interval_s: float = 5.0
    drain_timeout_s: float = 60.0
    rss_tolerance: float = 0.10
    quarantine_slack_s: float = 2.0
    hf_check: bool = True  # also compare the greedy reference with transformers (HF folder)
    server_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 300.0
    workdir: Path | None = None  # logs; a temp folder when None
    progress: Callable[[str], None] | None = None


@dataclass
class Outcome:
    """One request as the client saw it."""

    kind: str  # ok | error | cancelled | violation
    detail: str  # the error code / the cancel phase / what went wrong
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    started: float = 0.0  # time.monotonic() when sent


@dataclass
class ChaosReport:
    config: dict[str, Any]
    requests: dict[str, Any]
    faults: list[dict[str, Any]]
    durations_s: dict[str, float]
    rss_mib: dict[str, Any]
    invariants: dict[str, Any]
    counters: dict[str, dict[str, float]]
    samples: list[dict[str, Any]]
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self, samples: bool = True) -> str:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        return json.dumps(d, indent=1)


# -- the clients ------------------------------------------------------------------------


@dataclass
class _Job:
    prompt: int  # index into the prompts
    max_tokens: int
    greedy: bool
    stream: bool
    cancel: str | None  # None | "delay" | "events"
    cancel_after: float  # seconds ("delay") or events ("events")


class _Progress:
    def __init__(self) -> None:
        self.phase = "sent"  # sent -> headers -> tokens
        self.events = 0


class _Clients:
    def __init__(self, cfg: ChaosConfig, url: str, prompts: list[list[int]]) -> None:
        self.cfg, self.url, self.prompts = cfg, url, prompts
        self.reference: dict[int, list[int]] = {}
        self.ttft_estimate = 0.2
        # keep-alive shorter than the router's (uvicorn: 5 s): never reuse a connection the
        # router is closing (that race is the client's, not a fault of the router)
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=cfg.clients + 8, keepalive_expiry=2.0
        )
        timeout = httpx.Timeout(cfg.request_timeout_s, connect=10)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout)

    def job(self, rng: random.Random, cancels: bool = True) -> _Job:
        cfg = self.cfg
        k = rng.randint(*cfg.max_tokens)
        stream = rng.random() < cfg.stream_fraction
        cancel, after = None, 0.0
        if cancels and rng.random() < cfg.cancel_fraction:
            if stream and k >= 2 and rng.random() < 0.5:
                cancel, after = "events", float(rng.randint(1, k - 1))  # mid-decode
            else:  # before the first token: bootstrap, the KV transfer, or just after
                cancel, after = "delay", rng.uniform(0.0, 1.5 * self.ttft_estimate)
        greedy = rng.random() < cfg.greedy_fraction
        return _Job(rng.randrange(len(self.prompts)), k, greedy, stream, cancel, after)

    def body(self, job: _Job) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": job.max_tokens, "ignore_eos": True}
        params["temperature"] = 0.0 if job.greedy else 1.0
        return {
            "input_ids": self.prompts[job.prompt],
            "sampling_params": params,
            "stream": job.stream,
        }

    async def run(self, job: _Job) -> Outcome:
        t0 = time.monotonic()
        prog = _Progress()
        task = asyncio.ensure_future(self._send(job, prog, t0))
        timeout = self.cfg.request_timeout_s
        if job.cancel == "delay":
            done, _ = await asyncio.wait({task}, timeout=job.cancel_after)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return Outcome("cancelled", prog.phase, time.monotonic() - t0)
        try:
            return await asyncio.wait_for(task, timeout)
        except asyncio.TimeoutError:
            return Outcome("violation", f"hung: no end after {timeout:g} s ({prog.phase})", timeout)

    async def _send(self, job: _Job, prog: _Progress, t0: float) -> Outcome:
        try:
            if job.stream:
                return await self._stream(job, prog, t0)
            r = await self.client.post("/generate", json=self.body(job))
            prog.phase = "headers"
            if r.status_code != 200:
                return self._http_error(r.status_code, r.content, t0)
            return self._check(job, [r.json()], t0, None)
        except httpx.HTTPError as exc:
            return Outcome("violation", f"transport ({prog.phase}): {exc!r}", time.monotonic() - t0)
        except (ValueError, KeyError, TypeError) as exc:  # a malformed body or event
            return Outcome("violation", f"malformed answer: {exc!r}", time.monotonic() - t0)

    async def _stream(self, job: _Job, prog: _Progress, t0: float) -> Outcome:
        events: list[Any] = []
        ttft = None
        async with self.client.stream("POST", "/generate", json=self.body(job)) as r:
            prog.phase = "headers"
            if r.status_code != 200:
                return self._http_error(r.status_code, await r.aread(), t0)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    events.append(data)
                    break
                events.append(json.loads(data))
                if ttft is None:
                    ttft = time.monotonic() - t0
                    prog.phase = "tokens"
                prog.events += 1
                if job.cancel == "events" and prog.events >= job.cancel_after:
                    return Outcome("cancelled", "mid_decode", time.monotonic() - t0, ttft)
        if events[-1:] != ["[DONE]"]:
            return Outcome(
                "violation",
                f"stream ended without [DONE] after {len(events)} events",
                time.monotonic() - t0,
            )
        chunks = events[:-1]
        errors = [e for e in chunks if isinstance(e, dict) and "error" in e]
        if errors:
            err = errors[-1]["error"]
            code = (err.get("code") or err.get("type")) if isinstance(err, dict) else None
            return Outcome("error", f"event:{code}", time.monotonic() - t0, ttft)
        return self._check(job, chunks, t0, ttft)

    def _http_error(self, status: int, content: bytes, t0: float) -> Outcome:
        latency = time.monotonic() - t0
        try:
            err = json.loads(content)["error"]
            ok = isinstance(err["message"], str) and bool(err["message"])
            code = err.get("code") or err.get("type")
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            detail = f"HTTP {status} without an OpenAI-style error body: {content[:200]!r}"
            return Outcome("violation", detail, latency)
        return Outcome("error", f"{status}:{code}", latency)

    def _check(self, job: _Job, chunks: list[Any], t0: float, ttft: float | None) -> Outcome:
        latency = time.monotonic() - t0
        if not chunks:
            return Outcome("violation", "no output event", latency)
        prev: list[int] = []
        for c in chunks:  # each event carries the output so far
            ids = c.get("output_ids") if isinstance(c, dict) else None
            if not isinstance(ids, list) or ids[: len(prev)] != prev:
                return Outcome("violation", f"events not cumulative: {prev} then {ids}", latency)
            prev = ids
        final = chunks[-1]
        reason = final.get("meta_info", {}).get("finish_reason")
        reason = reason.get("type") if isinstance(reason, dict) else reason
        if len(prev) != job.max_tokens or reason != "length":
            return Outcome(
                "violation",
                f"asked {job.max_tokens} tokens, got {len(prev)} (finish_reason {reason})",
                latency,
            )
        if job.greedy:
            want = self.reference[job.prompt][: job.max_tokens]
            if prev != want:
                return Outcome(
                    "violation", f"wrong tokens for prompt {job.prompt}: {prev} != {want}", latency
                )
        return Outcome("ok", "greedy" if job.greedy else "sampled", latency, ttft, len(prev))


def make_prompts(rng: random.Random, n: int, lengths: tuple[int, int]) -> list[list[int]]:
    """Random token ids (from the low ids every tokenizer has), a few sharing a prefix so
    the prefix cache is used too."""
    out: list[list[int]] = []
    for i in range(n):
        if out and i % 4 == 3:
            base = rng.choice(out)
            cut = rng.randint(1, len(base))
            out.append(
                base[:cut] + [rng.randrange(100, 5000) for _ in range(rng.randint(*lengths))]
            )
        else:
            out.append([rng.randrange(100, 5000) for _ in range(rng.randint(*lengths))])
    return out


def transformers_greedy(model: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens per prompt from transformers, eos not special (as `ignore_eos`)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            tokens: list[int] = []
            step = hf(torch.tensor([ids]), use_cache=True)
            for _ in range(n):
                tokens.append(int(step.logits[0, -1].argmax()))
                past = step.past_key_values
                step = hf(torch.tensor([tokens[-1:]]), past_key_values=past, use_cache=True)
            out.append(tokens)
    return out


# -- the run ----------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


class _Run:
    def __init__(self, cfg: ChaosConfig, dep: Deployment) -> None:
        self.cfg, self.dep = cfg, dep
        self.rng = random.Random(cfg.seed)
        self.violations: list[str] = []
        self.fault_log: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.chaos_t0 = 0.0
        self.healed_at: float | None = None  # when the last fault's instance was back

    def say(self, msg: str) -> None:
        if self.cfg.progress:
            self.cfg.progress(f"[{time.monotonic() - self.t0:7.1f}s] {msg}")

    # state of the servers -------------------------------------------------------------

    async def _get(self, url: str, timeout: float = 10) -> Any:
        async with httpx.AsyncClient(timeout=timeout) as c:
            r = await c.get(url)
            r.raise_for_status()
            return r.json() if "json" in r.headers.get("content-type", "") else r.text

    async def quiet(self) -> dict[str, Any]:
        """Wait until neither the router nor any server has a request open, then flush
        every server's cache; the state found, for the invariants."""
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        state: dict[str, Any] = {}
        while True:
            workers = (await self._get(self.dep.router.url + "/workers"))["workers"]
            active = _metric(
                await self._get(self.dep.router.url + "/metrics"), "pdcore_router_requests_active"
            )
            loads = {s.name: (await self._get(s.url + "/get_load"))[0] for s in self.dep.servers}
            state = {
                "router_in_flight": {w["url"]: w["in_flight"] for w in workers},
                "router_requests_active": active,
                "num_reqs": {n: ld["num_reqs"] for n, ld in loads.items()},
                "unavailable": [w["url"] for w in workers if not w["available"]],
            }
            idle = (
                not any(state["router_in_flight"].values())
                and not active
                and not any(state["num_reqs"].values())
                and not state["unavailable"]
            )
            if idle or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        state["drained"] = idle
        flushed, tokens = {}, {}
        async with httpx.AsyncClient(timeout=30) as c:
            for s in self.dep.servers:
                flushed[s.name] = (await c.post(s.url + "/flush_cache")).status_code
                tokens[s.name] = (await c.get(s.url + "/get_load")).json()[0]["num_tokens"]
        state["flush_status"], state["num_tokens"] = flushed, tokens
        return state

    async def quarantine(self, skip_down: bool = False) -> dict[str, dict[str, float]]:
        """Each decode's quarantined pages and the longest a page overstayed (since its
        start); with `skip_down`, a decode that does not answer (killed, stopped) is left
        out."""
        out = {}
        for s in self.dep.role("decode"):
            try:
                text = await asyncio.wait_for(self._get(s.url + "/metrics", 2), 3)
            except (httpx.HTTPError, OSError):  # OSError: asyncio.TimeoutError too
                if skip_down:
                    continue
                raise
            out[s.name] = {
                "pages": _metric(text, "pdcore_num_quarantined_pages"),
                "max_overdue_s": _metric(text, "pdcore_quarantine_max_overdue_seconds"),
            }
        return out

    async def responsiveness(self) -> dict[str, float | None]:
        """How long each server takes to answer /get_load (a round trip through its engine
        loop), in ms; None when it does not answer within 5 s."""
        out: dict[str, float | None] = {}
        async with httpx.AsyncClient(timeout=5) as c:
            for s in self.dep.servers:
                t = time.monotonic()
                try:
                    (await c.get(s.url + "/get_load")).raise_for_status()
                    out[s.name] = round((time.monotonic() - t) * 1000, 1)
                except httpx.HTTPError:
                    out[s.name] = None
        return out

    async def counters(self) -> dict[str, dict[str, float]]:
        """The fault counters of every server and of the router (non-zero ones)."""
        out = {}
        for inst in (*self.dep.servers, self.dep.router):
            text = await self._get(inst.url + "/metrics")
            out[inst.name] = {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(COUNTERS) and not line.endswith(" 0.0")
            }
        return out

    def rss(self) -> dict[str, float]:
        return {i.name: i.rss_mib() for i in (*self.dep.servers, self.dep.router)}

    async def sampler(self, stop: asyncio.Event, outcomes: list[Outcome]) -> None:
        while not stop.is_set():
            sample: dict[str, Any] = {"t_s": round(time.monotonic() - self.chaos_t0, 1)}
            sample["rss_mib"] = self.rss()
            sample["rss_parts_mib"] = {i.name: i.rss_parts_mib() for i in self.dep.servers}
            sample["done"] = dict(Counter(o.kind for o in outcomes))
            sample["get_load_ms"] = await self.responsiveness()
            q = await self.quarantine(skip_down=True)
            sample["quarantined_pages"] = {n: v["pages"] for n, v in q.items()}
            sample["quarantine_max_overdue_s"] = {n: v["max_overdue_s"] for n, v in q.items()}
            self.samples.append(sample)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.sample_interval_s)

    # faults ---------------------------------------------------------------------------

    async def faults(self, stop: asyncio.Event) -> None:
        for f in sorted(self.cfg.faults, key=lambda f: f.at_s):
            delay = self.chaos_t0 + f.at_s - time.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            await self.fault(f)

    async def fault(self, f: Fault) -> None:
        pool = [
            s for s in self.dep.servers if (s.name == f.target if f.target else s.role == f.role)
        ]
        victim = self.rng.choice(pool)
        entry: dict[str, Any] = {
            "at_s": round(time.monotonic() - self.chaos_t0, 1),
            "kind": f.kind,
            "target": victim.name,
            "down_s": f.down_s,
        }
        self.say(f"fault: {f.kind} {victim.name} for {f.down_s:g} s")
        t = time.monotonic()
        if f.kind == "kill9":
            await asyncio.to_thread(victim.kill9)
            await asyncio.sleep(f.down_s)
            await asyncio.to_thread(victim.spawn)
            await asyncio.to_thread(victim.wait_ready, self.cfg.start_timeout_s)
            entry["restart_s"] = round(time.monotonic() - t, 1)
        elif f.kind == "stop":
            victim.signal_all(signal.SIGSTOP)
            await asyncio.sleep(f.down_s)
            victim.signal_all(signal.SIGCONT)
            victim.stopped_s += time.monotonic() - t
        else:
            raise ValueError(f"unknown fault kind {f.kind!r}")
        # back in the router's rotation
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                workers = (await self._get(self.dep.router.url + "/workers"))["workers"]
                if next(w for w in workers if w["url"] == victim.url)["available"]:
                    break
            await asyncio.sleep(0.2)
        else:
            self.violations.append(f"{victim.name} not back in the router 60 s after {f.kind}")
        entry["back_in_rotation_s"] = round(time.monotonic() - t, 1)
        self.healed_at = time.monotonic()
        self.fault_log.append(entry)
        self.say(f"fault: {victim.name} back after {entry['back_in_rotation_s']} s")

    # load -----------------------------------------------------------------------------

    async def load(
        self, clients: _Clients, outcomes: list[Outcome], faults_done: Callable[[], bool]
    ) -> None:
        cfg = self.cfg
        started = 0
        after_faults = 0  # requests started once every fault was over (and healed)
        t0 = self.chaos_t0

        def more() -> bool:
            now = time.monotonic()
            if cfg.max_duration_s is not None and now >= t0 + cfg.max_duration_s:
                return False
            if cfg.requests is not None and started < cfg.requests:
                return True
            if cfg.duration_s is not None and now < t0 + cfg.duration_s:
                return True
            if not faults_done():
                return True
            # a full round after the last fault healed: the deployment serves again
            return bool(cfg.faults) and after_faults < cfg.clients

        async def client(n: int) -> None:
            nonlocal started, after_faults
            rng = random.Random(cfg.seed * 1000003 + n)
            errors = 0  # in a row: the pause after an error doubles, up to 2 s
            while more():
                started += 1
                after_faults += faults_done()
                t = time.monotonic()
                o = await clients.run(clients.job(rng))
                o.started = t
                outcomes.append(o)
                if o.kind == "violation":
                    self.say(f"violation: {o.detail}")
                errors = errors + 1 if o.kind == "error" else 0
                if errors:
                    pause = min(cfg.error_pause_s * 2 ** (errors - 1), 2.0)
                    await asyncio.sleep(pause * (0.5 + rng.random()))

        await asyncio.gather(*(client(n) for n in range(cfg.clients)))

    async def main(self) -> ChaosReport:
        cfg, dep = self.cfg, self.dep
        t_start = time.monotonic()
        prompts = make_prompts(self.rng, cfg.num_prompts, cfg.prompt_tokens)
        clients = _Clients(cfg, dep.router.url, prompts)
        hi = cfg.max_tokens[1]
        # the known-good outputs: through the healthy deployment (all at once)
        params = {"max_new_tokens": hi, "ignore_eos": True, "temperature": 0.0}
        answers = await asyncio.gather(
            *(
                clients.client.post("/generate", json={"input_ids": p, "sampling_params": params})
                for p in prompts
            )
        )
        for i, r in enumerate(answers):
            r.raise_for_status()
            clients.reference[i] = r.json()["output_ids"]
        hf_mismatch: list[int] = []
        if cfg.hf_check and Path(cfg.model).is_dir():
            hf = await asyncio.to_thread(transformers_greedy, cfg.model, prompts, hi)
            hf_mismatch = [i for i, ids in enumerate(hf) if ids != clients.reference[i]]
            if hf_mismatch:
                self.violations.append(
                    f"the healthy deployment's greedy output differs from transformers' for "
                    f"prompts {hf_mismatch}"
                )
        # warm-up: full concurrency, no cancels, no faults
        warm: list[Outcome] = []
        for _ in range(cfg.warmup_rounds):
            warm += await asyncio.gather(
                *(clients.run(clients.job(self.rng, cancels=False)) for _ in range(cfg.clients))
            )
        bad = [o.detail for o in warm if o.kind != "ok"]
        if bad:
            self.violations.append(f"warm-up requests failed on a healthy deployment: {bad[:5]}")
        ttfts = [o.ttft_s for o in warm if o.ttft_s is not None]
        if ttfts:
            clients.ttft_estimate = statistics.median(ttfts)
        warm_state = await self.quiet()
        rss_before = self.rss()
        t_warm = time.monotonic()
        self.say(
            f"warm: {len(warm)} requests, median TTFT {clients.ttft_estimate:.3f} s, RSS {rss_before}"
        )

        # chaos
        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        instances = (*dep.servers, dep.router)
        cpu_before = {i.name: i.cpu_s() for i in instances}
        cpu_before["harness"] = sum(os.times()[:2])
        self.chaos_t0 = time.monotonic()
        faults = asyncio.ensure_future(self.faults(stop))
        sampler = asyncio.ensure_future(self.sampler(stop, outcomes))
        await self.load(clients, outcomes, faults.done)
        t_load = time.monotonic()
        cpu = {i.name: round(i.cpu_s() - cpu_before[i.name], 1) for i in instances}
        cpu["harness"] = round(sum(os.times()[:2]) - cpu_before["harness"], 1)
        stop.set()
        await faults
        await sampler
        await clients.client.aclose()
        # the end state
        end_state = await self.quiet()
        quarantine = await self.quarantine()
        counters = await self.counters()
        rss_after = self.rss()
        t_end = time.monotonic()
        self.samples.append(
            {"t_s": round(t_end - self.chaos_t0, 1), "rss_mib": rss_after, "idle": True}
        )
        self.check(warm_state, end_state, quarantine, rss_before, rss_after, outcomes)

        kinds = Counter(o.kind for o in outcomes)
        ok = [o for o in outcomes if o.kind == "ok"]
        requests = {
            "total": len(outcomes),
            "ok": kinds["ok"],
            "ok_greedy_checked": sum(o.detail == "greedy" for o in ok),
            "error": kinds["error"],
            "cancelled": kinds["cancelled"],
            "violations": kinds["violation"],
            "errors_by_code": dict(Counter(o.detail for o in outcomes if o.kind == "error")),
            "cancelled_by_phase": dict(
                Counter(o.detail for o in outcomes if o.kind == "cancelled")
            ),
            "tokens_ok": sum(o.tokens for o in ok),
            "latency_ok_p50_s": _pct([o.latency_s for o in ok], 50),
            "latency_ok_p99_s": _pct([o.latency_s for o in ok], 99),
            "ttft_ok_p50_s": _pct([o.ttft_s for o in ok if o.ttft_s is not None], 50),
            "req_per_s": round(len(outcomes) / max(t_load - self.chaos_t0, 1e-9), 1),
            "warmup": len(warm),
            # errors of requests sent over 1 s after the last faulty instance was back in
            # the router's rotation (the deployment should serve as before by then)
            "errors_after_healed": None
            if self.healed_at is None
            else sum(o.kind == "error" and o.started > self.healed_at + 1.0 for o in outcomes),
            # CPU seconds each process used during the chaos phase (a restarted instance:
            # its last incarnation only)
            "cpu_s": cpu,
            "hf_checked_prompts": len(prompts) if cfg.hf_check and Path(cfg.model).is_dir() else 0,
        }
        restarted = {f["target"] for f in self.fault_log if f["kind"] == "kill9"}
        cfg_d = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "env", "faults")}
        cfg_d["workdir"] = str(cfg.workdir)
        return ChaosReport(
            config=cfg_d,
            requests=requests,
            faults=self.fault_log,
            durations_s={
                "total": round(t_end - t_start, 1),
                "reference_and_warmup": round(t_warm - t_start, 1),
                "chaos": round(t_load - self.chaos_t0, 1),
                "drain_and_checks": round(t_end - t_load, 1),
            },
            rss_mib={
                "after_warmup": rss_before,
                "after_run": rss_after,
                "restarted": sorted(restarted),
                "growth": {
                    n: round(rss_after[n] / rss_before[n] - 1, 4)
                    for n in rss_before
                    if n not in restarted and rss_before[n]
                },
            },
            invariants={"warm": warm_state, "end": end_state, "quarantine": quarantine},
            counters=counters,
            samples=self.samples,
            violations=self.violations,
        )

    def check(
        self,
        warm: dict[str, Any],
        end: dict[str, Any],
        quarantine: dict[str, dict[str, float]],
        rss_before: dict[str, float],
        rss_after: dict[str, float],
        outcomes: list[Outcome],
    ) -> None:
        v = self.violations
        for o in outcomes:
            if o.kind == "violation" and len(v) < 50:
                v.append(f"request: {o.detail}")
        for name, state in (("after warm-up", warm), ("at the end", end)):
            if not state["drained"]:
                v.append(f"{name}: requests still open or workers out of rotation: {state}")
            bad = {n: s for n, s in state["flush_status"].items() if s != 200}
            if bad:
                v.append(f"{name}: /flush_cache refused: {bad}")
            held = {n: t for n, t in state["num_tokens"].items() if t}
            if held:
                v.append(f"{name}: KV tokens still held after /flush_cache: {held}")
        for s in self.dep.role("decode"):
            q = quarantine[s.name]
            if q["pages"]:
                v.append(f"{s.name}: {q['pages']:g} pages still quarantined when idle")
            bound = self.cfg.quarantine_slack_s + s.stopped_s
            if q["max_overdue_s"] > bound:
                v.append(
                    f"{s.name}: a page stayed quarantined {q['max_overdue_s']:.2f} s past its "
                    f"timeout (bound {bound:.1f} s)"
                )
        restarted = {f["target"] for f in self.fault_log if f["kind"] == "kill9"}
        for name, before in rss_before.items():
            if name in restarted or not before:
                continue
            after = rss_after[name]
            if after > before * (1 + self.cfg.rss_tolerance):
                v.append(
                    f"{name}: RSS {before:.0f} MiB after warm-up, {after:.0f} MiB after the run "
                    f"(> +{self.cfg.rss_tolerance:.0%})"
                )


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * p / 100))], 4)


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Start the deployment, run the plan, check the invariants, stop everything."""
    import tempfile

    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="pdcore-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg.workdir = workdir
    dep = Deployment(cfg, workdir)
    try:
        t = time.monotonic()
        dep.start()
        if cfg.progress:
            cfg.progress(f"deployment up in {time.monotonic() - t:.1f} s (logs in {workdir})")
        return asyncio.run(_Run(cfg, dep).main())
    finally:
        dep.stop()
