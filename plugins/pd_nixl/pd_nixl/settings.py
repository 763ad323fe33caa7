"""Settings of the NIXL backend (DESIGN.md §6: backend settings live in the backend's plugin).

Apart from `backend.py` so that help and docs can list them without importing nixl.
"""

from __future__ import annotations

from pdcore.settings_base import PdcoreSettings, setting


class NixlSettings(PdcoreSettings):
    """NIXL transfer backend settings."""

    disaggregation_nixl_backend: str = setting(
        "UCX",
        "NIXL backend plugin that moves the bytes (UCX, LIBFABRIC, ...); both sides must agree.",
        env_aliases=["SGLANG_DISAGGREGATION_NIXL_BACKEND"],
    )
    disaggregation_nixl_progress_interval_ms: float = setting(
        1.0,
        "How often a sleeping pdcore thread drives NIXL's progress (incoming writes and "
        "notifications), so transfers move while the engine loop is busy; 0 turns it off.",
        ge=0,
    )
    disaggregation_nixl_progress_thread: bool = setting(
        False,
        "Also start NIXL's own progress thread. It busy-spins one CPU core: use it only "
        "where a core is to spare.",
    )
