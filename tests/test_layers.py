"""The layers import downwards only (model -> engine -> disagg -> server | router), checked
two ways: import-linter's contracts over the whole source (any import statement, however
indirect), and what a fresh interpreter actually loads for the router and the engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loaded(code: str) -> str:
    """Run `code` in a fresh interpreter (plugins from entry points included) and return
    what it printed."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_router_loads_no_engine_model_server_or_torch() -> None:
    printed = _loaded(
        "import pdcore.router.app, pdcore.router.launch, sys; "
        "print(sorted(m for m in sys.modules if m.startswith("
        "('pdcore.engine', 'pdcore.model', 'pdcore.server', 'pdcore.disagg', 'torch'))))"
    )
    assert printed == "[]"


def test_engine_core_loads_nothing_from_disagg_or_above() -> None:
    printed = _loaded(
        "import pdcore.engine.core, sys; "
        "print(sorted(m for m in sys.modules if m.startswith("
        "('pdcore.disagg', 'pdcore.server', 'pdcore.router'))))"
    )
    assert printed == "[]"


def test_model_layer_loads_no_engine() -> None:
    printed = _loaded(
        "import pdcore.model.llama, sys; "
        "print(sorted(m for m in sys.modules if m.startswith('pdcore.engine')))"
    )
    assert printed == "[]"


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is not installed (make install installs it)")
    return found


def test_import_linter_contracts_hold() -> None:
    out = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_import_linter_catches_a_router_importing_the_server(tmp_path: Path) -> None:
    """The contracts are not vacuous: a copy of the package whose router imports the
    server fails them."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "pdcore", copy / "pdcore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    with open(copy / "pdcore" / "router" / "policies.py", "a", encoding="utf-8") as f:
        f.write("\nimport pdcore.server  # noqa: E402,F401\n")
    out = subprocess.run(
        [_lint_imports(), "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and "pdcore.router.policies -> pdcore.server" in out.stdout
