"""Settings of the Ascend backend, read from the environment under SGLang's names.

Apart from `backend.py` so that `check()`, help and docs can read them without importing a
transfer library. Every field is also read as PDCORE_<FIELD NAME> (DESIGN.md §6).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

import pydantic

from pdcore.settings_base import PdcoreSettings, env_names, setting

MEMFABRIC = "memfabric"
MOONCAKE = "mooncake"

STORE_SCHEMES = ("tcp", "etcd", "reg")
"""Config store URLs memfabric-hybrid accepts (smem_trans.h: tcp://ip:port, etcd://ip:port,
etcd://ip:port#instanceId, reg://ip:port, reg://ip:port#instanceId)."""

_STORE_URL = re.compile(
    r"^(?P<scheme>[a-z0-9]+)://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d+)"
    r"(?:#(?P<instance>[A-Za-z0-9_.-]+))?$"
)


@dataclass(frozen=True)
class StoreUrl:
    scheme: str
    host: str
    port: int
    instance: str | None = None


def parse_store_url(url: str) -> StoreUrl:
    """Split an ASCEND_MF_STORE_URL; ValueError saying what a valid one looks like."""
    hint = (
        "expected tcp://HOST:PORT (or etcd://HOST:PORT[#ID], reg://HOST:PORT[#ID]), "
        'e.g. ASCEND_MF_STORE_URL="tcp://192.168.1.1:50000"'
    )
    m = _STORE_URL.match(url.strip())
    if m is None:
        raise ValueError(f"ASCEND_MF_STORE_URL={url!r} is malformed: {hint}")
    scheme, port = m["scheme"], int(m["port"])
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"ASCEND_MF_STORE_URL={url!r}: unknown scheme {scheme!r}; {hint}")
    if not 1 <= port <= 65535:
        raise ValueError(f"ASCEND_MF_STORE_URL={url!r}: port {port} is not in 1..65535; {hint}")
    if m["instance"] and scheme == "tcp":
        raise ValueError(f"ASCEND_MF_STORE_URL={url!r}: only etcd:// and reg:// take #ID; {hint}")
    return StoreUrl(scheme, m["host"], port, m["instance"])


class AscendSettings(PdcoreSettings):
    """Ascend transfer backend settings."""

    ascend_mf_store_url: str | None = setting(
        None,
        "memfabric-hybrid's config store, e.g. tcp://192.168.1.1:50000 (etcd://, reg:// too); "
        "required unless ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE. Same value on prefill and decode.",
        env_aliases=["ASCEND_MF_STORE_URL"],
    )
    enable_ascend_transfer_with_mooncake: bool = setting(
        False,
        "Move KV with Mooncake's Ascend transport (a Mooncake built with USE_ASCEND_DIRECT) "
        "instead of memfabric-hybrid. Both sides must agree.",
        env_aliases=["ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE"],
    )
    ascend_npu_phy_id: int = setting(
        -1,
        "Physical id of the NPU this process uses (needed in containers, where the logical id "
        "differs); -1: the logical id of the KV pool's npu:N device.",
        ge=-1,
        env_aliases=["ASCEND_NPU_PHY_ID"],
    )
    ascend_mf_transfer_protocol: Literal["sdma", "device_rdma"] = setting(
        "sdma",
        "memfabric data path: sdma (HCCS, within a node or supernode) or device_rdma (RoCE "
        "between nodes). Both sides must agree.",
        env_aliases=["ASCEND_MF_TRANSFER_PROTOCOL"],
    )
    ascend_mf_role: Literal["auto", "Prefill", "Decode"] = setting(
        "auto",
        "memfabric role of this endpoint; auto: from the endpoint id pdcore gives it (prefill-*, "
        "decode-*), Prefill otherwise.",
    )
    ascend_transfer_threads: int = setting(
        4,
        "Threads that run the transport's blocking batch writes, so the engine loop never waits.",
        ge=1,
        le=64,
    )

    @pydantic.field_validator("ascend_mf_store_url", mode="after")
    @classmethod
    def _valid_store_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_store_url(value)
        return value.strip()

    @pydantic.field_validator("ascend_mf_transfer_protocol", mode="before")
    @classmethod
    def _lower_protocol(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def transport(self) -> str:
        """SGLang's choice: Mooncake when ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE, else memfabric."""
        return MOONCAKE if self.enable_ascend_transfer_with_mooncake else MEMFABRIC


def _env_name(field: str) -> str:
    """The variable the bad value came from: a set SGLang-era name, else PDCORE_<FIELD>."""
    names = env_names(AscendSettings, field)
    return next((n for n in reversed(names) if n in os.environ), names[0])


def load_settings() -> AscendSettings:
    """The settings from the environment; ValueError with one line per bad variable."""
    try:
        return AscendSettings()
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            env = _env_name(field) if field in AscendSettings.model_fields else "setting"
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(msg if msg.startswith(env) else f"{env}: {msg}")
        raise ValueError("; ".join(lines)) from None


def mf_role(setting_value: str, local_id: str) -> str:
    """memfabric's role string ("Prefill" or "Decode") for this endpoint."""
    if setting_value != "auto":
        return setting_value
    return "Decode" if local_id.startswith("decode") else "Prefill"


def mooncake_server_name(host: str, port: int, phy_id: int, logical_id: int) -> str:
    """Mooncake's Ascend local_server_name: "ip:port:npu_<physical id>"."""
    return f"{host}:{port}:npu_{phy_id if phy_id >= 0 else logical_id}"
