"""What both KV managers (sender on prefill, receiver on decode) set up first: the pool's
layout and wire spec, and their own transfer backend, named by the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdcore.disagg.messages import KVSpec
from pdcore.disagg.metrics import TransferStats
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.tp_plan import TPPlace
from pdcore.disagg.transfer import (
    KVLayout,
    TransferBackend,
    TransferConfig,
    create_transfer_backend,
    default_local_id,
)
from pdcore.model.kv_pool import KVPool


@dataclass
class TransferSide:
    layout: KVLayout
    spec: KVSpec
    backend: TransferBackend
    stats: TransferStats

    @classmethod
    def open(
        cls,
        role: Literal["prefill", "decode"],
        settings: DisaggSettings,
        pool: KVPool,
        host: str,
        place: TPPlace | None = None,
    ) -> TransferSide:
        """The backend's deadline is the side's own wait: prefill's bootstrap timeout, or
        decode's waiting timeout. `place`: this rank's place, KV heads and layers (none: no
        TP, no PP)."""
        place = place or TPPlace()
        name = settings.disaggregation_transfer_backend
        timeout = (
            settings.disaggregation_bootstrap_timeout
            if role == "prefill"
            else settings.disaggregation_waiting_timeout
        )
        backend = create_transfer_backend(
            name,
            TransferConfig(
                local_id=f"{role}-{_where(place)}-{default_local_id()}",
                host=host,
                ib_device=settings.disaggregation_ib_device,
                timeout_s=timeout,
            ),
        )
        return cls(
            KVLayout.from_pool(pool),
            KVSpec.from_pool(
                name,
                pool,
                tp_rank=place.tp_rank,
                tp_size=place.tp_size,
                kv_head_start=place.kv_head_start,
                total_kv_heads=place.total_kv_heads,
                pp_rank=place.pp_rank,
                pp_size=place.pp_size,
                layer_start=place.layer_start,
                total_layers=place.total_layers,
            ),
            backend,
            TransferStats(name),
        )


def _where(place: TPPlace) -> str:
    """The rank's name in its backend's id: tpR, or ppS-tpR with pipeline stages."""
    if place.pp_size > 1:
        return f"pp{place.pp_rank}-tp{place.tp_rank}"
    return f"tp{place.rank}"
