"""The conformance checks themselves, in order; `run_all` records one result per check.

Each check returns a short "what passing measured" string or raises CheckFailed with what
was seen, so a failing backend's report names the broken promise of the contract.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pdcore.disagg.transfer import (
    TRANSFER_CONTRACT_VERSION,
    BatchStatus,
    ContractVersionError,
    MemoryRegion,
    TransferError,
)
from pdcore.testing._peer import CHUNK, Receiver, wait_batches
from pdcore.testing.report import DATA_CHECKS, CheckFailed
from pdcore.testing.runs import first_bad_run

if TYPE_CHECKING:
    from pdcore.testing.conformance import Conformance

PEER = "conformance-receiver"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def run_all(c: Conformance, rx: Receiver, doomed: Receiver) -> None:
    """Every check against `rx`; `doomed` is the second receiver that dead_peer kills."""
    state: dict[str, Any] = {}
    threads_before = set(threading.enumerate())

    def contract() -> str:
        try:
            c.sender = c.new_sender("conformance-sender")
        except ContractVersionError as exc:
            raise CheckFailed(str(exc)) from None
        cls = type(c.sender)
        if not getattr(cls, "moves_bytes", True):
            for name in DATA_CHECKS:
                c.skips[name] = f"skipped: {cls.__name__} declares moves_bytes = False"
        for name, why in getattr(cls, "conformance_skips", {}).items():
            c.skips[name] = f"skipped: {why}"
        hello = rx.start(30.0)
        if not hello["ok"] and "ContractVersionError" in hello["error"]:
            raise CheckFailed(f"receiver: {hello['error']}")
        return f"{cls.__name__} declares contract version {TRANSFER_CONTRACT_VERSION}"

    def register() -> str:
        assert c.sender is not None
        c.sender.register_memory([MemoryRegion(c.src.ctypes.data, c.src.nbytes)])
        hello = rx.start(30.0)
        if not hello["ok"]:
            raise CheckFailed(f"receiver could not create/register/describe: {hello['error']}")
        return f"sender {c.src.nbytes >> 20} MiB, receiver {hello['size'] >> 20} MiB registered"

    def describe() -> str:
        assert c.sender is not None
        blob, own = rx.hello["blob"], c.sender.describe()  # type: ignore[index]
        for who, b in (("receiver", blob), ("sender", own)):
            if not isinstance(b, bytes) or not b:
                raise CheckFailed(f"{who} describe() returned {type(b).__name__}, not bytes")
        return f"blob of {len(blob)} B"

    def connect() -> str:
        assert c.sender is not None
        t0 = time.monotonic()
        c.sender.connect(PEER, rx.hello["blob"])  # type: ignore[index]
        c.sender.connect(PEER, rx.hello["blob"])  # type: ignore[index]
        return f"connected twice (idempotent) in {time.monotonic() - t0:.2f} s"

    def scattered() -> str:
        assert c.sender is not None
        batch, payload, runs, want = c.submit_room(c.sender, PEER, rx.hello, 0)  # type: ignore[arg-type]
        c.batches.append(batch)
        state["scattered"] = (payload, runs, want)
        [st] = wait_batches(c.sender, [batch], c.limit_s)
        if st.status is not BatchStatus.DONE:
            raise CheckFailed(f"batch of {len(runs)} runs ended {st.status.value}: {st.reason}")
        return f"{len(runs)} runs ({int(runs[:, 2].sum())} B) done"

    def notification() -> str:
        assert c.sender is not None
        payload = state["scattered"][0]
        got = rx.notifs({payload}, c.limit_s)
        mine = [g for g in got if g[1] == payload]
        if not mine:
            raise CheckFailed(f"no notification within {c.limit_s:.0f} s (got {got!r})")
        if len(mine) > 1:
            raise CheckFailed(f"notification delivered {len(mine)} times")
        if mine[0][0] != c.sender.local_id:
            raise CheckFailed(f"sender reported as {mine[0][0]!r}, not {c.sender.local_id!r}")
        state["arrival_digest"] = mine[0][2]
        return "payload (binary) and sender exact, delivered once"

    def notify_only() -> str:
        """A batch with no runs carries just its notification (the contract says so; the
        control plane uses it for rooms whose KV is already in place)."""
        assert c.sender is not None
        payload = b"notify-only:\x00\xff"
        batch = c.sender.submit(PEER, np.empty((0, 3), dtype=np.uint64), payload)
        c.batches.append(batch)
        [st] = wait_batches(c.sender, [batch], c.limit_s)
        if st.status is not BatchStatus.DONE:
            raise CheckFailed(f"a batch with no runs ended {st.status.value}: {st.reason}")
        mine = [g for g in rx.notifs({payload}, c.limit_s) if g[1] == payload]
        if len(mine) != 1:
            raise CheckFailed(f"its notification arrived {len(mine)} times, not once")
        return "done, notification delivered once"

    def byte_exact() -> str:
        _, runs, want = state["scattered"]
        got = np.frombuffer(rx.ask("chunk", chunk=0), dtype=np.uint8)
        if not np.array_equal(got, want):
            raise CheckFailed(first_bad_run(got, want, runs, 0))
        return f"receiver chunk sha256 matches ({len(runs)} runs)"

    def after_data() -> str:
        _, _, want = state["scattered"]
        if "arrival_digest" not in state:
            raise CheckFailed("no notification arrived (see the notification check)")
        if state["arrival_digest"] != _sha(want):
            final = rx.ask("digests")[0]
            why = "the data arrived later" if final == _sha(want) else "the data never did"
            raise CheckFailed(f"notification arrived before its data ({why})")
        return "receiver's bytes were complete when it saw the notification"

    def concurrent() -> str:
        assert c.sender is not None
        rooms = [c.submit_room(c.sender, PEER, rx.hello, i) for i in range(1, c.rooms + 1)]  # type: ignore[arg-type]
        c.batches += [r[0] for r in rooms]
        states = wait_batches(c.sender, [r[0] for r in rooms], c.limit_s)
        bad = [(i + 1, s) for i, s in enumerate(states) if s.status is not BatchStatus.DONE]
        if bad:
            raise CheckFailed(f"{len(bad)} of {len(rooms)} rooms not done, first {bad[0]}")
        got = rx.notifs({r[1] for r in rooms}, c.limit_s)
        counts = {r[1]: 0 for r in rooms}
        arrival = {}
        for _, p, d in got:
            if p in counts:
                counts[p] += 1
                arrival[p] = d
        wrong = {p: n for p, n in counts.items() if n != 1}
        if wrong:
            raise CheckFailed(f"{len(wrong)} room(s) not notified exactly once: {wrong}")
        if "byte_exact" not in c.skips:
            final = rx.ask("digests")
            for i, (_, p, _, want) in enumerate(rooms, start=1):
                if final[i] != _sha(want):
                    raise CheckFailed(f"room {i}: receiver bytes differ after done + notified")
                if arrival[p] != _sha(want):
                    raise CheckFailed(f"room {i}: notified before its data was in place")
        return f"{len(rooms)} rooms in flight at once, each done and notified once"

    def abort() -> str:
        assert c.sender is not None
        victim = c.submit_room(c.sender, PEER, rx.hello, c.rooms + 1)  # type: ignore[arg-type]
        c.sender.release(victim[0])
        c.sender.release(victim[0])  # unknown by now: ignored
        batch, payload, _, want = c.submit_room(c.sender, PEER, rx.hello, c.rooms + 2)  # type: ignore[arg-type]
        [st] = wait_batches(c.sender, [batch], c.limit_s)
        c.sender.release(batch)
        if st.status is not BatchStatus.DONE:
            raise CheckFailed(f"a batch after an aborted one ended {st.status.value}: {st.reason}")
        if not any(p == payload for _, p, _ in rx.notifs({payload}, c.limit_s)):
            raise CheckFailed("a batch after an aborted one was never notified")
        if "byte_exact" not in c.skips and rx.ask("digests")[c.rooms + 2] != _sha(want):
            raise CheckFailed("a batch after an aborted one landed wrong bytes")
        return "release() of an in-flight batch; the next batch still done and notified"

    def bad_input() -> str:
        s, addr, size = c.sender, rx.hello["addr"], rx.hello["size"]  # type: ignore[index]
        assert s is not None
        src = c.src.ctypes.data
        cases = [
            ("submit to an unknown peer", lambda: s.submit("no-such-peer", [(src, addr, 8)], b"")),
            ("remote run past the end", lambda: s.submit(PEER, [(src, addr + size - 8, 16)], b"")),
            ("remote run before the start", lambda: s.submit(PEER, [(src, addr - 16, 8)], b"")),
            (
                "local run past the end",
                lambda: s.submit(PEER, [(src + c.src.nbytes - 8, addr, 16)], b""),
            ),
            ("connect with a garbage blob", lambda: s.connect("garbage-peer", b"\x00garbage")),
        ]
        for what, call in cases:
            try:
                call()
            except TransferError:
                continue
            except Exception as exc:
                raise CheckFailed(
                    f"{what}: raised {type(exc).__name__}, not TransferError"
                ) from None
            raise CheckFailed(f"{what}: accepted, should raise TransferError")
        return f"{len(cases)} caller mistakes each raised TransferError"

    def release_close() -> str:
        assert c.sender is not None
        for b in c.batches:
            c.sender.release(b)
        c.sender.release(987654321)
        c.sender.disconnect("no-such-peer")
        c.sender.disconnect(PEER)
        c.sender.close()
        c.sender.close()
        c.sender = None
        closed = rx.ask("close", limit_s=c.limit_s)
        if not closed["ok"]:
            raise CheckFailed(f"receiver close() raised {closed['error']}")
        rx.proc.join(c.limit_s)
        code = rx.proc.exitcode  # a library crashing at interpreter exit is noted, not failed
        note = "" if code == 0 else f"; receiver process then exited with code {code}"
        deadline = time.monotonic() + 3.0
        while (left := _new_threads(threads_before)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            raise CheckFailed(f"threads still running after close(): {sorted(left)}")
        return f"unknown ids ignored, close() twice on both sides, no threads left{note}"

    def dead_peer() -> str:
        hello = doomed.start(30.0)
        if not hello["ok"]:
            raise CheckFailed(f"second receiver failed: {hello['error']}")
        with c.new_sender("conformance-sender-2") as s:
            s.register_memory([MemoryRegion(c.src.ctypes.data, c.src.nbytes)])
            s.connect("doomed", hello["blob"])
            runs = [(c.src.ctypes.data, hello["addr"], CHUNK)]
            [st] = wait_batches(s, [s.submit("doomed", runs, b"room:0:alive")], c.limit_s)
            if st.status is not BatchStatus.DONE:
                raise CheckFailed(f"a batch to a live peer ended {st.status.value}: {st.reason}")
            in_flight = [s.submit("doomed", runs, b"room:0:x") for _ in range(4)]
            assert doomed.proc.pid is not None  # started by the peer fixture
            os.kill(doomed.proc.pid, signal.SIGKILL)
            doomed.proc.join(10)
            t0 = time.monotonic()
            wait_batches(s, in_flight, c.limit_s)
            # A transport learns of a peer's death asynchronously (a closed socket is
            # noticed by its I/O thread), so a batch submitted in the same instant may still
            # be handed over; the contract is that batches to a dead peer fail, within the
            # limit, from then on -- never that they keep "succeeding".
            while True:
                try:
                    after = s.submit("doomed", runs, b"room:0:after")
                except TransferError as exc:
                    raise CheckFailed(
                        f"submit raised for a dead peer ({exc}); poll must fail"
                    ) from None
                [st] = wait_batches(s, [after], c.limit_s)
                if st.status is BatchStatus.FAILED and st.reason:
                    break
                if time.monotonic() - t0 > c.limit_s:
                    raise CheckFailed(
                        f"batches to a SIGKILLed peer still ended {st.status.value} "
                        f"{c.limit_s:.0f} s after the kill"
                    )
                time.sleep(0.1)
            took = time.monotonic() - t0
        return f"failed {took:.2f} s after SIGKILL ({st.reason})"

    c.check("contract_version", contract, setup=True)
    c.check("register_memory", register, setup=True)
    c.check("describe", describe, setup=True)
    c.check("connect", connect, setup=True)
    c.check("scattered_writes", scattered, setup=True)
    c.check("notification", notification)
    c.check("notify_only", notify_only)
    c.check("byte_exact", byte_exact)
    c.check("notify_after_data", after_data)
    c.check("concurrent_rooms", concurrent)
    c.check("abort", abort)
    c.check("bad_input", bad_input)
    c.check("release_close", release_close)
    c.blocked = None if c.blocked in (None, "scattered_writes") else c.blocked
    c.check("dead_peer", dead_peer)


def _new_threads(before: set[threading.Thread]) -> set[str]:
    return {t.name for t in threading.enumerate() if t not in before and t.is_alive()}
