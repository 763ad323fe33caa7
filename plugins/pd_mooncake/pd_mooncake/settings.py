"""Settings of the Mooncake backend (DESIGN.md §6: backend settings live in the backend's plugin).

Apart from `backend.py` so that help and docs can list them without importing mooncake.
"""

from __future__ import annotations

from typing import Literal

from pdcore.settings_base import PdcoreSettings, setting


class MooncakeSettings(PdcoreSettings):
    """Mooncake transfer backend settings."""

    mooncake_custom_mem_pool: Literal["", "NVLINK", "BAREX", "INTRA_NODE_NVLINK"] = setting(
        "",
        "Mooncake's custom memory pool, as in SGLang: NVLINK or INTRA_NODE_NVLINK selects "
        "Mooncake's nvlink transport, BAREX its barex transport; empty uses RDMA when "
        "--disaggregation-ib-device names a present device and TCP otherwise. Both sides "
        "must agree. MC_FORCE_MNNVL and Mooncake's other MC_* variables reach Mooncake as is.",
        env_aliases=["SGLANG_MOONCAKE_CUSTOM_MEM_POOL"],
    )
