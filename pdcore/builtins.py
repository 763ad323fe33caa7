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
        description="the next worker of the role in turn",
    )
    register(
        "random",
        "pdcore.router.policies:RandomPolicy",
        description="a uniformly random worker of the role",
    )
    register(
        "power_of_two",
        "pdcore.router.policy_power_of_two:PowerOfTwoPolicy",
        description="of two random workers, the less loaded (/get_load, in-flight)",
    )
    register(
        "cache_aware",
        "pdcore.router.policy_cache_aware:CacheAwarePolicy",
        description="the worker whose prefix tree of past prompts matches best, "
        "balanced by load (SGLang's default)",
    )
    register(
        "kv_aware",
        "pdcore.router.policy_kv_aware:KvAwarePolicy",
        description="the worker whose prefix cache really holds the most of the prompt "
        "(/kv_cache_blocks), minus a load penalty",
    )
