"""pdcore KV transfer backend on the Mooncake transfer engine
(`--disaggregation-transfer-backend mooncake`).

Only the hook and a lazy factory live here: `pdcore plugins` and the router import this
module, so `backend.py` (which imports mooncake) is imported on selection only.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pdcore import hookimpl
from pdcore.hookspecs import Register, RegisterSettings

if TYPE_CHECKING:
    from pd_mooncake.backend import MooncakeBackend
    from pdcore.disagg.transfer import TransferConfig

INSTALL_HINT = "install pd-mooncake[cpu] (CPU) or pd-mooncake[cuda]"
_import_error: str | None = None


def check() -> str | None:
    """None when `mooncake.engine` imports; otherwise what to install, with the error.

    Importing is the only honest test: the CUDA wheel is found by `find_spec` but fails to
    load without libcudart/libcuda, and the CPU wheel needs libibverbs. Done once per process.
    """
    global _import_error
    if importlib.util.find_spec("mooncake") is None:
        return f"{INSTALL_HINT} (mooncake is not installed)"
    if _import_error is None:
        try:
            import mooncake.engine  # noqa: F401
        except Exception as exc:  # ImportError, OSError from a missing shared library
            _import_error = f"{type(exc).__name__}: {exc}"
        else:
            _import_error = ""
    if _import_error:
        return f"{INSTALL_HINT} (mooncake fails to import: {_import_error})"
    return None


def create(config: TransferConfig) -> MooncakeBackend:
    from pd_mooncake.backend import MooncakeBackend

    return MooncakeBackend(config)


@hookimpl
def pdcore_register_transfer_backends(register: Register) -> None:
    register(
        "mooncake",
        create,
        description="Mooncake transfer engine (TCP; RDMA with --disaggregation-ib-device)",
        check=check,
    )


@hookimpl
def pdcore_register_settings(register: RegisterSettings) -> None:
    from pd_mooncake.settings import MooncakeSettings

    register(MooncakeSettings)


@hookimpl
def pdcore_kv_pool_allocation(device: Any) -> AbstractContextManager[None] | None:
    """With NVLINK or BAREX, a CUDA KV cache comes from Mooncake's allocator (mem_pool.py)."""
    if getattr(device, "type", None) != "cuda":
        return None
    from pd_mooncake.mem_pool import ALLOCATORS, kv_pool_allocation
    from pd_mooncake.settings import MooncakeSettings

    pool = MooncakeSettings().mooncake_custom_mem_pool
    return kv_pool_allocation(pool, device) if pool in ALLOCATORS else None
