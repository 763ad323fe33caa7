"""Router -> prefill -> nixl -> decode, all real processes: greedy outputs equal
transformers' (and so unified mode's), and nothing is left held afterwards."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdcore.model.tokenizer import load_tokenizer
from pdcore.plugins import get_registry
from tests.conftest import free_port
from tests.parity import assert_matches_hf, run_parity_requests
from tests.server_helpers import ManagedProcess, ServerProcess, wait_until
from tests.test_router_helpers import RouterProcess, pd_flags

nixl_available = "nixl" in get_registry("transfer_backend") and all(
    info.available for info in get_registry("transfer_backend").describe() if info.name == "nixl"
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not nixl_available, reason="the nixl transfer backend is not installed"),
]

# Keep PD's own settings out of whatever the caller's environment says.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}


class SglangRouterProcess(RouterProcess):
    """SGLang's own router (the `sglang-router` package) in PD mode: the real client our
    servers must stay wire-compatible with."""

    def __init__(self, log_path: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
        ManagedProcess.__init__(self, [*args, "--port", str(self.port), *flags], log_path, ENV)


class PDDeployment:
    """One prefill and one decode `pdcore serve` (tiny model, fp32) and a router."""

    def __init__(
        self,
        model: Path,
        tmp: Path,
        backend: str = "nixl",
        router=RouterProcess,
        decode_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        common_args: tuple[str, ...] = (),
        router_args: tuple[str, ...] = (),
        router_env: dict[str, str] | None = None,
    ) -> None:
        self.router_cls = router
        self.router_args, self.router_env = router_args, router_env or {"PDCORE_PLUGINS": ""}
        self.boot_port = free_port()
        env = env or ENV
        common = ["--backend", backend, *common_args]
        self.prefill = ServerProcess(
            model,
            tmp / "prefill.log",
            *common,
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(self.boot_port),
            env=env,
        )
        self.decode = ServerProcess(
            model,
            tmp / "decode.log",
            *common,
            "--disaggregation-mode",
            "decode",
            *decode_args,
            env=env,
        )
        self.router: RouterProcess | None = None
        self.tmp = tmp

    def start(self) -> PDDeployment:
        self.prefill.wait_ready()
        self.decode.wait_ready()
        flags = pd_flags([(self.prefill.url, self.boot_port)], [self.decode.url], *self.router_args)
        self.router = self.router_cls(self.tmp / "router.log", *flags, env=self.router_env)
        self.router.wait_ready()
        return self

    def stop(self) -> None:
        for proc in (self.router, self.decode, self.prefill):
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def pd(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDDeployment]:
    deployment = PDDeployment(tiny_llama_dir, tmp_path_factory.mktemp("pd"))
    try:
        yield deployment.start()
    finally:
        deployment.stop()


def _idle_tokens(url: str) -> int:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert wait_until(lambda: client.get("/get_load").json()[0]["num_reqs"] == 0, 30)
        assert client.post("/flush_cache").status_code == 200
        return client.get("/get_load").json()[0]["num_tokens"]


def test_pd_greedy_outputs_equal_transformers(pd: PDDeployment, tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_llama_dir))
    results = run_parity_requests(pd.router.url, tok)
    assert_matches_hf(results, str(tiny_llama_dir), tok)
    assert _idle_tokens(pd.prefill.url) == 0
    assert _idle_tokens(pd.decode.url) == 0
    for url in (pd.prefill.url, pd.decode.url):
        text = httpx.get(url + "/metrics").text
        assert 'pdcore_kv_transfer_bytes{backend="nixl"}' in text
        assert 'pdcore_kv_transfer_latency_seconds_count{backend="nixl"}' in text
    sent = httpx.get(pd.prefill.url + "/metrics").text
    line = next(x for x in sent.splitlines() if x.startswith("pdcore_kv_transfers{"))
    assert float(line.split()[-1]) >= 48  # one transfer per request of the parity run


def test_pd_server_info_names_the_mode(pd: PDDeployment) -> None:
    assert httpx.get(pd.prefill.url + "/server_info").json()["disaggregation_mode"] == "prefill"
    assert httpx.get(pd.decode.url + "/server_info").json()["disaggregation_mode"] == "decode"


def test_request_without_bootstrap_is_a_clear_400(pd: PDDeployment) -> None:
    r = httpx.post(pd.decode.url + "/generate", json={"text": "hi"}, timeout=30)
    assert r.status_code == 400
    assert "bootstrap" in r.json()["error"]["message"]


def test_bootstrap_host_pointing_nowhere_fails_in_bounded_time(pd: PDDeployment) -> None:
    body = {
        "text": "hello",
        "sampling_params": {"max_new_tokens": 4},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": free_port(),  # nothing listens there
        "bootstrap_room": 12345,
    }
    r = httpx.post(pd.decode.url + "/generate", json=body, timeout=120)
    assert r.status_code >= 500
    assert r.json()["error"]["message"]
    assert _idle_tokens(pd.decode.url) == 0


@pytest.mark.skipif(
    importlib.util.find_spec("sglang_router") is None, reason="sglang-router is not installed"
)
def test_sglang_router_drives_our_pd_servers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    deployment = PDDeployment(tiny_llama_dir, tmp_path, router=SglangRouterProcess)
    try:
        deployment.start()
        tok = load_tokenizer(str(tiny_llama_dir))
        results = run_parity_requests(deployment.router.url, tok)
        assert_matches_hf(results, str(tiny_llama_dir), tok)
        assert _idle_tokens(deployment.prefill.url) == 0
        assert _idle_tokens(deployment.decode.url) == 0
    finally:
        deployment.stop()


def test_client_disconnect_mid_stream_frees_both_sides(pd: PDDeployment) -> None:
    body = {
        "text": "Tell me a long story.",
        "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", pd.router.url + "/generate", json=body) as r,
    ):
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break  # leave mid-stream: closing the connection is the disconnect
    assert _idle_tokens(pd.decode.url) == 0
    assert _idle_tokens(pd.prefill.url) == 0
