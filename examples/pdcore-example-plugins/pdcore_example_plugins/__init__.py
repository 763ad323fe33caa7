"""pdcore-example-plugins: one third-party plugin offering one thing of every kind.

This module is what the entry point names (`[project.entry-points.pdcore] example =
"pdcore_example_plugins"`), so pdcore imports it in every process that builds a plugin
manager -- including `pdcore plugins` and the router, which never import torch. It therefore
holds only the hooks and small factories; each factory imports its implementation (and
torch, numpy, msgpack) when, and only when, that thing is selected.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from pdcore import hookimpl
from pdcore.hookspecs import Register

__version__ = "0.1.0"


# --- factories: called only when the thing is selected ------------------------------------


def _tcp_backend(config: Any) -> Any:
    """`create_transfer_backend("tcp", config)` calls this as factory(config=TransferConfig)."""
    from pdcore_example_plugins.tcp import TcpBackend

    return TcpBackend(config)


def _tcp_check() -> str | None:
    """None when usable here, else why not. Called lazily, at most once, by the registry:
    ask whether the library exists (find_spec) rather than importing it."""
    if importlib.util.find_spec("msgpack") is None:
        return "msgpack is not installed (pip install msgpack)"
    return None


def _reference_attention(**kwargs: Any) -> Any:
    """Called as factory(num_heads=, num_kv_heads=, head_dim=, device=, dtype=)."""
    from pdcore_example_plugins.attention import ReferenceAttentionBackend

    return ReferenceAttentionBackend(**kwargs)


def _sjf_policy() -> Any:
    """Called with no arguments; settings of a plugin's own come from env vars."""
    from pdcore_example_plugins.schedule import SJFPolicy

    return SJFPolicy(max_wait_s=float(os.environ.get("PDCORE_SJF_MAX_WAIT_S", "10")))


def _least_inflight_policy(role: str, settings: Any) -> Any:
    from pdcore_example_plugins.routing import LeastInflightPolicy

    return LeastInflightPolicy(role, settings)


# --- the hooks: one register(...) call per thing offered ----------------------------------


@hookimpl
def pdcore_register_transfer_backends(register: Register) -> None:
    register(
        "tcp",
        _tcp_backend,
        description="KV pages over plain TCP sockets (CPU memory only)",
        check=_tcp_check,
    )


@hookimpl
def pdcore_register_attention_backends(register: Register) -> None:
    register(
        "reference",
        _reference_attention,
        description="per-sequence softmax(QK^T)V in plain torch: slow, obviously correct",
    )


@hookimpl
def pdcore_register_schedule_policies(register: Register) -> None:
    register(
        "sjf",
        _sjf_policy,
        description="shortest uncached prompt first; long waiters go first (starvation-aware)",
    )


@hookimpl
def pdcore_register_routing_policies(register: Register) -> None:
    register(
        "least_inflight",
        _least_inflight_policy,
        description="the prefill and the decode server with the fewest requests in flight",
    )
