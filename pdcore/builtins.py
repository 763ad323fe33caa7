"""pdcore's own backends, registered through the same hooks a third-party plugin uses.

Keeping the built-ins in a plugin (the pytest/tox pattern) means the core has no special
path for them: `pdcore plugins` lists them beside everything else and a third-party name
clash is caught the same way. Factories are given as "module:attribute" references,
imported by the registry on first use: listing plugins or running the router never imports
torch, and this module (below every layer) imports none of the layers whose parts it names.
"""

from __future__ import annotations

from pdcore.hookspecs import Register, hookimpl


@hookimpl
def pdcore_register_attention_backends(register: Register) -> None:
    register(
        "torch",
        "pdcore.engine.attention_torch:TorchAttentionBackend",
        description="paged attention in plain PyTorch (runs on CPU and GPU)",
    )


@hookimpl
def pdcore_register_schedule_policies(register: Register) -> None:
    register(
        "fcfs", "pdcore.engine.schedule_policies:FCFSPolicy", description="first come, first served"
    )
    register(
        "lpm",
        "pdcore.engine.schedule_policies:LPMPolicy",
        description="longest prefix match first, to reuse the prefix cache (SGLang's lpm)",
    )


@hookimpl
def pdcore_register_routing_policies(register: Register) -> None:
    register(
        "round_robin",
        "pdcore.router.policies:RoundRobinPolicy",
        description="the next prefill and the next decode server in turn",
    )
