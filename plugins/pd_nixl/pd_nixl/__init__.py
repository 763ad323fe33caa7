"""pdcore KV transfer backend on NVIDIA NIXL (`--disaggregation-transfer-backend nixl`).

Only the hook and a lazy factory live here: `pdcore plugins` and the router import this
module, and importing nixl costs over a second, so `backend.py` is imported on selection.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from pdcore import hookimpl
from pdcore.hookspecs import Register, RegisterSettings

if TYPE_CHECKING:
    from pd_nixl.backend import NixlBackend
    from pdcore.disagg.transfer import TransferConfig

_NIXL_WHEELS = ("nixl_cu13", "nixl_cu12", "nixl_rocm")


def check() -> str | None:
    """None when nixl looks importable; found without importing it (that takes ~1.5 s)."""
    if importlib.util.find_spec("nixl") is None:
        return "nixl not installed (pip install nixl)"
    if not any(importlib.util.find_spec(m) for m in _NIXL_WHEELS):
        return f"nixl has no backend wheel installed (one of: {', '.join(_NIXL_WHEELS)})"
    return None


def create(config: TransferConfig) -> NixlBackend:
    from pd_nixl.backend import NixlBackend

    return NixlBackend(config)


@hookimpl
def pdcore_register_transfer_backends(register: Register) -> None:
    register(
        "nixl",
        create,
        description="NVIDIA NIXL (UCX by default; DRAM or VRAM; RDMA where present)",
        check=check,
    )


@hookimpl
def pdcore_register_settings(register: RegisterSettings) -> None:
    from pd_nixl.settings import NixlSettings

    register(NixlSettings)
