"""Can the Ascend backend run here? Cheap probes of the real environment, for `check()`.

Nothing here imports a transfer library, torch_npu or CANN: that takes seconds, loads large
shared libraries into every process that runs `pdcore plugins`, and fails in less readable
ways. Instead each probe looks where the library itself looks:

- memfabric-hybrid reads the driver version from the install path in /etc/ascend_install.info
  (else /usr/local/Ascend) + /driver/version.info and refuses to start without it ("the
  current version of ascend driver does not support mf!", seen with 1.3.0 on this machine);
- the NPUs show up as /dev/davinci_manager and /dev/davinciN (mounted into containers);
- CANN's runtime is libascendcl.so under $ASCEND_HOME_PATH (or ASCEND_TOOLKIT_HOME, or
  /usr/local/Ascend/ascend-toolkit/latest)/lib64, or somewhere on LD_LIBRARY_PATH;
- Mooncake has an Ascend transport only when built with USE_ASCEND_DIRECT (or USE_ASCEND):
  its engine then carries the AscendDirectTransport (or HcclTransport) class; the PyPI wheels
  do not, and fail later with "Unsupported transport".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import mmap
import os
from pathlib import Path

from pd_ascend.settings import MEMFABRIC, AscendSettings, load_settings

MEMFABRIC_HINT = "pip install 'pd-ascend[memfabric]'"
MOONCAKE_BUILD_HINT = "build Mooncake with -DUSE_ASCEND_DIRECT=ON"
_ASCEND_TRANSPORT_CLASSES = (b"AscendDirectTransport", b"HcclTransport", b"HeterogeneousRdma")


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def driver_root(install_info: Path = Path("/etc/ascend_install.info")) -> Path:
    """Where the Ascend driver is installed (Driver_Install_Path_Param, else the default)."""
    try:
        for line in install_info.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "Driver_Install_Path_Param" and value.strip():
                return Path(value.strip())
    except OSError:
        pass
    return Path("/usr/local/Ascend")


def driver_problem(root: Path | None = None, dev: Path = Path("/dev")) -> str | None:
    """Why the Ascend driver or the NPUs are not usable here, or None."""
    version = (root or driver_root()) / "driver" / "version.info"
    if not version.is_file():
        return f"Ascend driver not found (no {version})"
    if not (dev / "davinci_manager").exists():
        return (
            f"no NPU device nodes ({dev / 'davinci_manager'}): mount the NPUs into this container"
        )
    return None


def cann_lib_dirs() -> list[Path]:
    home = os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
    dirs = [Path(home or "/usr/local/Ascend/ascend-toolkit/latest") / "lib64"]
    dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return dirs


def cann_problem() -> str | None:
    """Why CANN's runtime (libascendcl.so) is not found, or None."""
    dirs = cann_lib_dirs()
    if any((d / "libascendcl.so").is_file() for d in dirs):
        return None
    return (
        f"CANN not found (no libascendcl.so in {dirs[0]} or on LD_LIBRARY_PATH): "
        "install CANN and source its set_env.sh"
    )


def torch_npu_problem() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu not installed (the KV pool lives in NPU memory; install torch-npu for your CANN)"
    return None


def mooncake_has_ascend(package_dir: Path) -> bool:
    """True when an engine library of this Mooncake install carries an Ascend transport."""
    for lib in sorted(package_dir.glob("engine*.so")):
        try:
            with lib.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if any(m.find(name) >= 0 for name in _ASCEND_TRANSPORT_CLASSES):
                    return True
        except (OSError, ValueError):
            continue
    return False


def memfabric_problem() -> str | None:
    if importlib.util.find_spec("memfabric_hybrid") is None:
        return f"memfabric-hybrid not installed: {MEMFABRIC_HINT}"
    return None


def mooncake_problem() -> str | None:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return (
            f"mooncake not installed: {MOONCAKE_BUILD_HINT} (PyPI wheels lack the Ascend transport)"
        )
    if not mooncake_has_ascend(Path(next(iter(spec.submodule_search_locations)))):
        dist = (
            _dist_version("mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda")
            or "mooncake"
        )
        return f"the installed {dist} has no Ascend transport: {MOONCAKE_BUILD_HINT}"
    return None


def config_problem(settings: AscendSettings) -> str | None:
    if settings.transport == MEMFABRIC and settings.ascend_mf_store_url is None:
        return (
            "ASCEND_MF_STORE_URL is not set (memfabric's config store, e.g. tcp://HOST:PORT; or "
            "ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE=true)"
        )
    return None


def problems() -> list[str]:
    """Everything that stops the backend here, most basic first; empty when it can run."""
    try:
        settings = load_settings()
    except ValueError as exc:
        return [f"invalid setting: {exc}"]
    if settings.transport == MEMFABRIC:
        lib = memfabric_problem()
        what = _dist_version("memfabric-hybrid") or "memfabric-hybrid"
    else:
        lib = mooncake_problem()
        what = "Mooncake's Ascend transport"
    out = [lib] if lib else []
    driver = driver_problem()
    if driver:
        out.append(driver if lib else f"{what} is installed but cannot start: {driver}")
    out += [p for p in (cann_problem(), torch_npu_problem(), config_problem(settings)) if p]
    return out


def unavailable_reason() -> str | None:
    """`check()`'s answer: None, or the most basic problem (fixing it reveals the next)."""
    found = problems()
    return found[0] if found else None
