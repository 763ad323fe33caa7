"""The `pdcore` console script, run as a real subprocess where it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pdcore import cli
from pdcore.plugins import reset_plugin_manager

PDCORE = Path(sys.executable).parent / "pdcore"

PLUG_SRC = """\
from pdcore import hookimpl

@hookimpl
def pdcore_register_transfer_backends(register):
    register("fakex", lambda: None, description="a test transfer backend")
    register("needs-lib", lambda: None, check=lambda: "somelib not installed")

@hookimpl
def pdcore_request_finished(info):
    pass
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("PDCORE_", "SGLANG_"))}
    env.update(extra)
    return env


def pdcore(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    if not PDCORE.exists():
        pytest.fail(f"{PDCORE} missing: run `{sys.executable} -m pip install -e . --no-deps`")
    return subprocess.run(
        [str(PDCORE), *args], capture_output=True, text=True, timeout=60, env=clean_env(**env)
    )


def fake_dist(root: Path, entry_point: str, module: str, source: str) -> None:
    """What pip leaves behind for a plugin package: a dist-info with entry_points.txt."""
    info = root / "pdcore_fakex-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pdcore-fakex\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text(f"[pdcore]\n{entry_point} = {module}\n")
    (root / f"{module}.py").write_text(source)


def test_plugins_lists_builtins():
    r = pdcore("plugins")
    assert r.returncode == 0, r.stderr
    assert "pdcore.builtins (built-in)" in r.stdout
    for name in ("torch", "fcfs", "lpm"):
        assert f" {name} " in r.stdout


def test_plugins_json_with_a_real_entry_point(tmp_path: Path):
    fake_dist(tmp_path, "fakex", "pdtest_cli_fakex", PLUG_SRC)
    r = pdcore("plugins", "--json", PYTHONPATH=str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    assert plugins["pdcore.builtins"]["builtin"]
    fakex = plugins["fakex"]
    assert (fakex["package"], fakex["version"]) == ("pdcore-fakex", "0.3.0")
    assert "pdcore_request_finished" in fakex["hooks"]
    provides = {i["name"]: i for i in fakex["provides"]}
    assert provides["fakex"]["kind"] == "transfer_backend" and provides["fakex"]["available"]
    assert provides["needs-lib"] == {
        "kind": "transfer_backend",
        "name": "needs-lib",
        "plugin": "fakex",
        "description": "",
        "available": False,
        "reason": "somelib not installed",
    }
    text = pdcore("plugins", PYTHONPATH=str(tmp_path)).stdout
    assert "fakex (pdcore-fakex 0.3.0)" in text
    assert "needs-lib    unavailable \u2014 somelib not installed" in text
    assert "observes           pdcore_request_finished" in text
    # The allow-list leaves it out.
    r = pdcore("plugins", "--json", PYTHONPATH=str(tmp_path), PDCORE_PLUGINS="")
    assert [p["name"] for p in json.loads(r.stdout)["plugins"]] == ["pdcore.builtins"]


def test_plugins_reports_broken_plugins(tmp_path: Path):
    fake_dist(tmp_path, "broken", "pdtest_cli_broken", "import pdtest_no_such_module\n")
    r = pdcore("plugins", PYTHONPATH=str(tmp_path))
    assert r.returncode == 1
    assert "broken (FAILED TO LOAD: ModuleNotFoundError" in r.stdout


def test_misspelled_hook_fails_the_command(tmp_path: Path):
    src = "from pdcore import hookimpl\n@hookimpl\ndef pdcore_register_routing_policy(register): pass\n"
    fake_dist(tmp_path, "typo", "pdtest_cli_typo", src)
    r = pdcore("plugins", PYTHONPATH=str(tmp_path))
    assert r.returncode == 1
    assert "pdcore plugins: error: plugin 'typo'" in r.stderr
    assert "did you mean 'pdcore_register_routing_policies'" in r.stderr


def test_serve_bad_port_names_the_flag():
    r = pdcore("serve", "--port", "99999")
    assert r.returncode != 0
    assert "pdcore serve: error: --port: Input should be less than or equal to 65535" in r.stderr


def test_serve_unknown_plugin_names_the_flag():
    r = pdcore("serve", "--schedule-policy", "nope")
    assert r.returncode != 0
    assert "--schedule-policy: unknown schedule policy 'nope'; installed: fcfs, lpm" in r.stderr


def test_serve_help_and_version():
    r = pdcore("serve", "--help")
    assert r.returncode == 0 and "--disable-radix-cache" in r.stdout and "PDCORE_PORT" in r.stdout
    r = pdcore("version")
    assert r.returncode == 0 and r.stdout.strip() == "pdcore 0.1.0"


def test_serve_hands_settings_to_run_server(monkeypatch: pytest.MonkeyPatch):
    for key in list(os.environ):
        if key.startswith("PDCORE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PDCORE_PLUGINS", "")
    monkeypatch.setenv("PDCORE_PAGE_SIZE", "32")
    reset_plugin_manager()
    seen = []
    fake = types.ModuleType("pdcore.server.launch")
    fake.run_server = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pdcore.server.launch", fake)
    assert cli.main(["serve", "--port", "8123", "--schedule-policy", "lpm"]) == 0
    [settings] = seen
    assert (settings.port, settings.page_size, settings.schedule_policy) == (8123, 32, "lpm")
    reset_plugin_manager()
