"""pd-mooncake's dependencies are decided when it is built, on the installing machine.

Mooncake ships two wheels that install the same `mooncake/` package: the CUDA one
(`mooncake-transfer-engine`) cannot even be imported without libcuda/libcudart, the other
(`mooncake-transfer-engine-non-cuda`) cannot register GPU memory. Environment markers cannot
see a GPU, so pd-mooncake is distributed as an sdist only and this file picks the wheel at
build time -- which for an sdist is install time, on the machine that will run it:

    PD_MOONCAKE_BUILD=cuda   mooncake-transfer-engine
    PD_MOONCAKE_BUILD=cpu    mooncake-transfer-engine-non-cuda
    PD_MOONCAKE_BUILD=none   no Mooncake dependency (choose with the [cpu] / [cuda] extra)
    unset (auto)             cuda when the NVIDIA driver's libcuda.so.1 loads or nvidia-smi
                             is on PATH, else cpu

pip caches a wheel it built from an sdist; after adding or removing a GPU, reinstall with
`pip install --no-cache-dir --force-reinstall pd-mooncake` (or set PD_MOONCAKE_BUILD).
"""

from __future__ import annotations

import ctypes
import os
import shutil

from setuptools import setup

WHEELS = {"cuda": "mooncake-transfer-engine", "cpu": "mooncake-transfer-engine-non-cuda"}


def _has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return shutil.which("nvidia-smi") is not None


def mooncake_requirements() -> list[str]:
    choice = os.environ.get("PD_MOONCAKE_BUILD", "auto").strip().lower() or "auto"
    if choice == "auto":
        choice = "cuda" if _has_cuda_driver() else "cpu"
    if choice == "none":
        return []
    if choice not in WHEELS:
        raise SystemExit(f"PD_MOONCAKE_BUILD={choice!r}: expected cpu, cuda, none or auto")
    return [WHEELS[choice]]


setup(install_requires=["pdcore", "msgpack", "pyzmq", *mooncake_requirements()])
