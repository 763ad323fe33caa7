"""pdcore's own backends, registered through the same hooks a third-party plugin uses.

Keeping the built-ins in a plugin (the pytest/tox pattern) means the core has no special
path for them: `pdcore plugins` lists them beside everything else and a third-party name
clash is caught the same way. Factories import the engine lazily so that listing plugins,
or running the router, never imports torch.
"""

from __future__ import annotations

from typing import Any

from pdcore.hookspecs import Register, hookimpl


def _torch_attention(**kwargs: Any) -> Any:
    from pdcore.engine.attention_torch import TorchAttentionBackend

    return TorchAttentionBackend(**kwargs)


def _fcfs_policy(**kwargs: Any) -> Any:
    from pdcore.engine.schedule_policies import FCFSPolicy

    return FCFSPolicy(**kwargs)


def _lpm_policy(**kwargs: Any) -> Any:
    from pdcore.engine.schedule_policies import LPMPolicy

    return LPMPolicy(**kwargs)


def _round_robin_policy(**kwargs: Any) -> Any:
    from pdcore.router.policies import RoundRobinPolicy

    return RoundRobinPolicy(**kwargs)


@hookimpl
def pdcore_register_attention_backends(register: Register) -> None:
    register(
        "torch",
        _torch_attention,
        description="paged attention in plain PyTorch (runs on CPU and GPU)",
    )


@hookimpl
def pdcore_register_schedule_policies(register: Register) -> None:
    register("fcfs", _fcfs_policy, description="first come, first served")
    register(
        "lpm",
        _lpm_policy,
        description="longest prefix match first, to reuse the prefix cache (SGLang's lpm)",
    )


@hookimpl
def pdcore_register_routing_policies(register: Register) -> None:
    register(
        "round_robin",
        _round_robin_policy,
        description="the next prefill and the next decode server in turn",
    )
