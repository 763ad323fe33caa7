"""PD faults end in a clear error in bounded time, with nothing left held on the survivor."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_pd_e2e import ENV, PDDeployment, _idle_tokens, nixl_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not nixl_available, reason="the nixl transfer backend is not installed"),
]

FAST_HEARTBEAT = {
    "PDCORE_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5",
    "PDCORE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
}


def _deployment(model: Path, tmp: Path, decode_args=(), env=None) -> PDDeployment:
    d = PDDeployment(model, tmp, decode_args=decode_args, env={**ENV, **(env or {})})
    return d


def test_page_size_mismatch_is_refused_clearly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _deployment(tiny_llama_dir, tmp_path, decode_args=("--page-size", "8"))
    try:
        d.start()
        start = time.monotonic()
        r = httpx.post(d.router.url + "/generate", json={"text": "hello"}, timeout=120)
        assert time.monotonic() - start < 60
        assert r.status_code >= 500
        message = r.json()["error"]["message"]
        assert "page" in message.lower() and "16" in message and "8" in message, message
        assert _idle_tokens(d.prefill.url) == 0
        assert _idle_tokens(d.decode.url) == 0
    finally:
        d.stop()


def test_prefill_killed_fails_decode_rooms_by_heartbeat(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    d = _deployment(tiny_llama_dir, tmp_path, env=FAST_HEARTBEAT)
    try:
        d.start()
        # Straight to decode, never to prefill: decode pre-allocates and waits for KV that
        # will never come; then the prefill dies.
        body = {
            "text": "hello there",
            "sampling_params": {"max_new_tokens": 8},
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": d.boot_port,
            "bootstrap_room": 4242,
        }
        result: dict = {}

        def call() -> None:
            result["r"] = httpx.post(d.decode.url + "/generate", json=body, timeout=120)

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(d.decode.url + "/get_load").json()[0]["num_tokens"] == 0:
            assert time.monotonic() < deadline, "decode never pre-allocated"
            time.sleep(0.05)
        d.prefill.proc.kill()
        killed = time.monotonic()
        thread.join(60)
        elapsed = time.monotonic() - killed
        assert elapsed < 10, f"took {elapsed:.1f}s (heartbeat 0.5 s x 2 should be ~1-2 s)"
        assert result["r"].status_code >= 500
        assert result["r"].json()["error"]["message"]
        assert _idle_tokens(d.decode.url) == 0
    finally:
        d.stop()


def test_prefill_room_without_decode_fails_at_bootstrap_timeout(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    # A decode that died before registering its pages: prefill must not hold the room (or
    # compute for it) past the bootstrap timeout. (With a router in front, the router's
    # cancel of the prefill leg frees it sooner: tests/test_router_*.py.)
    d = _deployment(tiny_llama_dir, tmp_path, env={"PDCORE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "3"})
    try:
        d.start()
        d.decode.stop()
        body = {
            "text": "hello there",
            "sampling_params": {"max_new_tokens": 8},
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": d.boot_port,
            "bootstrap_room": 777,
        }
        start = time.monotonic()
        r = httpx.post(d.prefill.url + "/generate", json=body, timeout=120)
        elapsed = time.monotonic() - start
        assert r.status_code >= 500 and r.json()["error"]["message"]
        assert 2.5 < elapsed < 30, elapsed
        assert _idle_tokens(d.prefill.url) == 0
    finally:
        d.stop()
