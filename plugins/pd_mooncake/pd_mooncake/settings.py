"""Settings of the Mooncake backend (DESIGN.md §6: backend settings live in the backend's plugin).

Apart from `backend.py` so that help and docs can list them without importing mooncake. The
plugin offers them through `pdcore_register_settings`, so they are `pdcore serve` flags too,
checked at flag parsing (a custom memory pool this machine cannot provide included).
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from pdcore.settings_base import PdcoreSettings, setting

MEM_POOLS = ("NVLINK", "BAREX", "INTRA_NODE_NVLINK")
ACCEPTED = "NVLINK, BAREX, INTRA_NODE_NVLINK, True (= NVLINK, as in SGLang) or empty (none)"


class MooncakeSettings(PdcoreSettings):
    """Mooncake transfer backend settings."""

    mooncake_custom_mem_pool: Literal["", "NVLINK", "BAREX", "INTRA_NODE_NVLINK"] = setting(
        "",
        "Mooncake's custom memory pool, as in SGLang (True means NVLINK): NVLINK and BAREX "
        "allocate the KV cache through Mooncake's own allocator (NVLinkAllocator, "
        "BarexAllocator) and move it with the nvlink / barex transport; INTRA_NODE_NVLINK "
        "uses the nvlink transport on ordinary CUDA memory. All need Mooncake's CUDA build "
        "and a CUDA KV cache; refused at start-up where that is missing. Empty: RDMA when "
        "--disaggregation-ib-device names a present device, else TCP. Both sides must "
        "agree. MC_FORCE_MNNVL and Mooncake's other MC_* variables reach Mooncake as is.",
        env_aliases=["SGLANG_MOONCAKE_CUSTOM_MEM_POOL"],
    )

    @pydantic.field_validator("mooncake_custom_mem_pool", mode="before")
    @classmethod
    def _sglang_spellings(cls, value: Any) -> Any:
        """SGLang's spellings: True (any case) is NVLINK, names in any case."""
        if value is True:
            return "NVLINK"
        if isinstance(value, str):
            v = value.strip().upper()
            if v == "TRUE":
                return "NVLINK"
            if v in ("", "FALSE", "NONE"):
                return ""
            if v in MEM_POOLS:
                return v
            raise ValueError(f"{value!r} is not a Mooncake memory pool; accepted: {ACCEPTED}")
        return value

    @pydantic.model_validator(mode="after")
    def _pool_available_here(self) -> MooncakeSettings:
        from pd_mooncake.mem_pool import unavailable_reason

        reason = unavailable_reason(self.mooncake_custom_mem_pool)
        if reason is not None:
            raise ValueError(reason)
        return self
