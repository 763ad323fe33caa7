"""Settings of PD disaggregation (flags and env vars; DESIGN.md §6).

One model, composed into the server's settings by the CLI, and read directly by the control
plane (`PrefillKVManager`, `DecodeKVManager`), so tests can build it on its own. Every env var
is also read under its SGLANG_ name (the reference's knobs keep the reference's defaults), so
users moving over keep their environment.
"""

from __future__ import annotations

import os

from pdcore.settings_base import PdcoreSettings, setting


def _default_thread_pool_size() -> int:
    """The reference's default: int(0.75 * cpu_count) // 8, kept within 4..12."""
    return max(4, min(12, int(0.75 * (os.cpu_count() or 1)) // 8))


def _sglang(name: str) -> list[str]:
    return [f"SGLANG_{name.upper()}"]


class DisaggSettings(PdcoreSettings):
    """PD disaggregation settings."""

    disaggregation_transfer_backend: str = setting(
        "mooncake",
        "KV transfer backend (pdcore plugins lists them); the prefill and decode sides must "
        "use the same one. mooncake by default, as in SGLang.",
        flags=["--backend"],
        env_aliases=_sglang("disaggregation_transfer_backend"),
    )
    disaggregation_ib_device: str | None = setting(
        None,
        "Network device(s) the transfer backend uses, e.g. mlx5_roce0 (handed to the backend).",
        env_aliases=_sglang("disaggregation_ib_device"),
    )
    disaggregation_bootstrap_port: int = setting(
        8998,
        "Port of the bootstrap server a prefill instance runs for decode instances to find it.",
        ge=1,
        le=65535,
        env_aliases=_sglang("disaggregation_bootstrap_port"),
    )
    disaggregation_bootstrap_timeout: float = setting(
        300.0,
        "Prefill: seconds a request waits for its decode instance's page list (and for its "
        "transfer to finish) before it fails.",
        gt=0,
        env_aliases=_sglang("disaggregation_bootstrap_timeout"),
    )
    disaggregation_waiting_timeout: float = setting(
        300.0,
        "Decode: seconds a request waits for its KV cache after pre-allocating pages.",
        gt=0,
        env_aliases=_sglang("disaggregation_waiting_timeout"),
    )
    disaggregation_prealloc_timeout: float = setting(
        120.0,
        "Decode: seconds a request may wait for free KV pages to pre-allocate (the pool is "
        "full) before it is refused with 503; pre-allocation never overcommits the pool.",
        gt=0,
    )
    disaggregation_heartbeat_interval: float = setting(
        5.0,
        "Seconds between heartbeats from decode to each prefill instance it uses (prefill "
        "also uses it to notice a silent decode).",
        gt=0,
        env_aliases=_sglang("disaggregation_heartbeat_interval"),
    )
    disaggregation_heartbeat_max_failure: int = setting(
        2,
        "Missed heartbeats in a row after which a peer counts as dead and its requests fail.",
        ge=1,
        env_aliases=_sglang("disaggregation_heartbeat_max_failure"),
    )
    disaggregation_bootstrap_entry_cleanup_interval: float = setting(
        120.0,
        "Prefill: seconds between sweeps that drop stale bootstrap entries (page lists for "
        "requests that never arrived, records of aborted rooms).",
        gt=0,
        env_aliases=_sglang("disaggregation_bootstrap_entry_cleanup_interval"),
    )
    disaggregation_thread_pool_size: int = setting(
        _default_thread_pool_size(),
        "Prefill: sender threads, shared out among the transfer queues; a queue with W of "
        "them writes each request's KV as up to W slices at once. Decode: threads that look "
        "up prefill bootstrap servers concurrently.",
        gt=0,
        env_aliases=_sglang("disaggregation_thread_pool_size"),
    )
    disaggregation_queue_size: int = setting(
        4,
        "Prefill: parallel transfer queues. Each decode instance is pinned to one queue "
        "(round-robin), a queue sends one request at a time, so decodes on different "
        "queues are served in parallel and a slow one stalls only its own queue; 1 "
        "serialises every send.",
        gt=0,
        env_aliases=_sglang("disaggregation_queue_size"),
    )
    disaggregation_auth_token: str | None = setting(
        None,
        "Shared secret of the PD control plane: when set (to the same value on every "
        "prefill and decode instance), every bootstrap query and control message carries an "
        "HMAC-SHA256 of it, and peers without it are refused before anything is registered "
        "(docs/reliability.md). Never logged or shown by /server_info. Unset: the control "
        "plane is open to whoever can reach it.",
    )
