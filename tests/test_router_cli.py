"""`pdcore router`'s flags, env vars and start-up errors; the round_robin policy; the
router's pure helpers; and that the router never imports torch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdcore.plugins import reset_plugin_manager
from pdcore.router.pd import batch_size, with_bootstrap
from pdcore.router.policies import RoundRobinPolicy, RouteRequest, Worker
from pdcore.router.settings import PrefillWorker, RouterSettings, parse_router_args
from pdcore.settings_docs import update_doc
from tests.conftest import free_port
from tests.test_router_helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]
P, D = "http://127.0.0.1:30000", "http://127.0.0.1:30001"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch):
    for key in list(os.environ):
        if key.upper().startswith(("PDCORE_", "SGLANG_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PDCORE_PLUGINS", "")
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def router_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdcore.cli", "router", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(**env),
    )


# --- flags and env vars ------------------------------------------------------------------


def test_sglang_style_flags() -> None:
    s = parse_router_args(
        ["--pd-disaggregation", "--prefill", P, "8998", "--prefill", "http://h2:1/", "none"]
        + ["--decode", D, "--decode", "http://h3:2", "--host", "0.0.0.0", "--port", "8001"]
    )
    assert s.prefill == [
        PrefillWorker(url=P, bootstrap_port=8998),
        PrefillWorker(url="http://h2:1"),
    ]
    assert s.decode == [D, "http://h3:2"]
    assert (s.host, s.port, s.policy) == ("0.0.0.0", 8001, "round_robin")


def test_every_setting_is_also_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDCORE_ROUTER_PD_DISAGGREGATION", "true")
    monkeypatch.setenv("PDCORE_ROUTER_PREFILL", f"{P} 9000,http://h2:1")
    monkeypatch.setenv("PDCORE_ROUTER_DECODE", f'["{D}"]')
    monkeypatch.setenv("PDCORE_ROUTER_PORT", "8123")
    monkeypatch.setenv("PDCORE_ROUTER_REQUEST_TIMEOUT_SECS", "5")
    s = parse_router_args([])
    assert [(p.url, p.bootstrap_port) for p in s.prefill] == [(P, 9000), ("http://h2:1", None)]
    assert (s.decode, s.port, s.request_timeout_secs) == ([D], 8123, 5.0)
    monkeypatch.setenv("PDCORE_ROUTER_PREFILL", f'[["{P}", 7000]]')
    assert parse_router_args(["--port", "9"]).prefill[0].bootstrap_port == 7000
    assert parse_router_args(["--port", "9"]).port == 9  # a flag beats its env var


@pytest.mark.parametrize(
    "args, env, expected",
    [
        ([], {}, "--pd-disaggregation is required"),
        (["--pd-disaggregation", "--decode", D], {}, "--prefill is missing"),
        (["--pd-disaggregation", "--prefill", P], {}, "--decode is missing"),
        (["--pd-disaggregation", "--prefill", "localhost:30000", "--decode", D], {}, "--prefill:"),
        (["--pd-disaggregation", "--prefill", P, "99999", "--decode", D], {}, "bootstrap port"),
        (["--pd-disaggregation", "--prefill", P, "1", "2", "--decode", D], {}, "--prefill:"),
        (["--pd-disaggregation", "--prefill", P, "--decode", "ftp://x"], {}, "--decode:"),
        (
            ["--pd-disaggregation", "--prefill", P, "--decode", D, "--policy", "round_robbin"],
            {},
            "--policy: unknown routing policy 'round_robbin'; installed: ",
        ),
        (
            ["--pd-disaggregation", "--prefill", P, "--decode", D, "--decode-policy", "rr"],
            {},
            "--decode-policy: unknown routing policy 'rr'; installed: ",
        ),
        (["--pd-disaggregation", "--prefill", "8998", P, "--decode", D], {}, "before any URL"),
        (
            ["--pd-disaggregation", "--prefill", P, "--decode", D],
            {"PDCORE_ROUTER_PORT": "0"},
            "--port (env PDCORE_ROUTER_PORT)",
        ),
        (["--pd-disaggregation", "--prefill", P, "--decode", D, "--bogus"], {}, "--bogus"),
        (
            ["--pd-disaggregation", "--prefill", P, "--decode", D, "--router-processes", "0"],
            {},
            "--router-processes: Input should be greater than or equal to 1",
        ),
        (
            ["--pd-disaggregation", "--prefill", P, "--decode", D],
            {"PDCORE_ROUTER_ROUTER_PROCESSES": "-2"},
            "--router-processes (env PDCORE_ROUTER_ROUTER_PROCESSES): Input should be greater",
        ),
    ],
)
def test_bad_flags_exit_naming_the_flag(args, env, expected) -> None:
    r = router_cli(*args, **env)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(("pdcore router: error:", "pdcore: error:")), r.stderr
    assert expected in last, r.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_unhealthy_worker_at_start_names_it(processes: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = router_cli(
        *("--pd-disaggregation", "--prefill", dead, "--decode", dead),
        *("--port", str(free_port()), "--worker-startup-timeout-secs", "0.5"),
        *("--router-processes", processes),
    )
    assert r.returncode == 1
    assert "workers not healthy after 0.5s (--worker-startup-timeout-secs)" in r.stderr
    assert f"prefill {dead}" in r.stderr and f"decode {dead}" in r.stderr
    assert "spawn_main" not in r.stderr  # with 2: the supervisor waited, before any process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_signal_during_the_start_up_wait_is_a_clean_stop(processes: str, sig: int) -> None:
    """SIGTERM/Ctrl-C while the router still waits for its workers: exit 0 at once (not a
    traceback, not the wait running to its timeout)."""
    dead = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pdcore.cli", "router", "--pd-disaggregation"),
            *("--prefill", dead, "--decode", dead, "--port", str(free_port())),
            *("--worker-startup-timeout-secs", "60", "--router-processes", processes),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        deadline = time.monotonic() + 30
        seen = ""
        while "waiting up to" not in seen and time.monotonic() < deadline:
            assert proc.stderr is not None
            seen += proc.stderr.readline()
        assert "waiting up to" in seen, seen
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "router stopped" in err and "Traceback" not in err


@pytest.mark.parametrize("processes", ["1", "2"])
def test_busy_port_is_reported(processes: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = router_cli(
            *("--pd-disaggregation", "--prefill", P, "--decode", D, "--port", str(port)),
            *("--router-processes", processes),
        )
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_help_lists_the_worker_flags() -> None:
    r = router_cli("--help")
    assert r.returncode == 0
    for flag in ("--prefill URL [BOOTSTRAP_PORT", "--decode URL", "--pd-disaggregation"):
        assert flag in r.stdout
    assert "PDCORE_ROUTER_REQUEST_TIMEOUT_SECS" in r.stdout


def test_router_doc_is_in_step_with_the_settings() -> None:
    text = (ROOT / "docs" / "router.md").read_text(encoding="utf-8")
    assert update_doc(text) == text, "run `python -m pdcore.settings_docs docs/router.md`"
    assert "<!-- BEGIN RouterSettings -->" in text


# --- the router stays light ------------------------------------------------------------


def test_router_modules_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import pdcore.cli, pdcore.router.app, pdcore.router.launch, pdcore.router.pd\n"
        "import pdcore.router.supervisor, pdcore.router.cluster\n"
        "from pdcore.plugins import get_registry\n"
        "get_registry('routing_policy').create('round_robin')\n"
        "light = ('pdcore.disagg', 'pdcore.disagg.settings')  # settings models only\n"
        "heavy = [m for m in sys.modules if m in ('torch', 'transformers', 'numpy')\n"
        "         or (m.startswith(('pdcore.model', 'pdcore.disagg', 'pdcore.server.engine'))\n"
        "             and m not in light)]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env()
    )
    assert r.returncode == 0, r.stderr


# --- policy and wire helpers -------------------------------------------------------------


def test_round_robin_is_registered_and_cycles() -> None:
    from pdcore.plugins import get_registry

    reg = get_registry("routing_policy")
    assert "round_robin" in reg
    policy = reg.create("round_robin", role="decode", settings=None)
    assert isinstance(policy, RoundRobinPolicy)
    decodes = [Worker(f"http://d{i}:1", "decode") for i in range(3)]
    picks = [policy.select(decodes, RouteRequest({})) for _ in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]
    rand = reg.create("random", role="prefill", settings=None)
    assert {rand.select(decodes, RouteRequest({})) for _ in range(60)} == {0, 1, 2}


def test_batch_size_follows_sglang() -> None:
    assert batch_size({"text": "a"}) is None
    assert batch_size({"text": ["a", "b"]}) == 2
    assert batch_size({"input_ids": [1, 2]}) is None
    assert batch_size({"input_ids": [[1], [2], [3]]}) == 3
    assert batch_size({"prompt": ["a", "b"]}) is None  # OpenAI routes: never a batch
    assert batch_size({"input_ids": []}) is None


def test_with_bootstrap_does_not_touch_the_original() -> None:
    body = {"text": ["a", "b"], "bootstrap_room": "client's"}
    out = with_bootstrap(body, Worker("http://10.1.2.3:30000", "prefill", 8998))
    assert body == {"text": ["a", "b"], "bootstrap_room": "client's"}
    assert out["bootstrap_host"] == ["10.1.2.3"] * 2 and out["bootstrap_port"] == [8998] * 2
    assert len(set(out["bootstrap_room"])) == 2


def test_settings_model_checks_itself() -> None:
    s = RouterSettings(pd_disaggregation=True, prefill=[P], decode=[D])
    assert s.prefill[0].bootstrap_port is None
    with pytest.raises(ValueError, match="--decode is missing"):
        RouterSettings(pd_disaggregation=True, prefill=[P])
