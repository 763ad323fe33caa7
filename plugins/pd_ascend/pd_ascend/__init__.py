"""pdcore KV transfer backend for Huawei Ascend NPUs (`--disaggregation-transfer-backend
ascend`), on memfabric-hybrid or, with ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE=true, on
Mooncake's Ascend transport.

Only the hook, `check()` and a lazy factory live here: `pdcore plugins` and the router import
this module, so nothing here imports a transfer library, torch_npu or CANN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdcore import hookimpl
from pdcore.hookspecs import Register, RegisterSettings

if TYPE_CHECKING:
    from pd_ascend.backend import AscendBackend
    from pdcore.disagg.transfer import TransferConfig


def check() -> str | None:
    """None when the backend can run here; otherwise every reason it cannot, most basic
    first (see probe.py: file and import-spec probes only, no library is loaded)."""
    from pd_ascend.probe import unavailable_reason

    return unavailable_reason()


def create(config: TransferConfig) -> AscendBackend:
    from pd_ascend.backend import AscendBackend

    return AscendBackend(config)


@hookimpl
def pdcore_register_transfer_backends(register: Register) -> None:
    register(
        "ascend",
        create,
        description="Huawei Ascend NPUs: memfabric-hybrid (SDMA/device RDMA) or Mooncake's "
        "Ascend transport",
        check=check,
    )


@hookimpl
def pdcore_register_settings(register: RegisterSettings) -> None:
    from pd_ascend.settings import AscendSettings

    register(AscendSettings)
