"""Where a mixture-of-experts model's experts can go: --ep-size and --tp-size checks.
Pure Python (pdcore.model.moe re-exports it) so that `pdcore serve` checks the flags in its
frontend without importing torch."""

from __future__ import annotations

from pdcore.model.config import ModelConfig


def num_routed_experts(config: ModelConfig) -> int:
    """Routed experts per MoE layer (0: a dense model)."""
    e = config.extra or {}
    return int(e.get("n_routed_experts") or e.get("num_experts") or 0)


def ep_problem(config: ModelConfig, tp_size: int, ep_size: int) -> tuple[str, str] | None:
    """(flag, reason) when the model's experts cannot be placed on `tp_size` ranks with
    expert parallelism `ep_size` (the EP group is the TP group: ep is 1 or tp)."""
    experts = num_routed_experts(config)
    e = config.extra or {}
    inter = int(e.get("moe_intermediate_size") or 0)
    shared = int(e.get("n_shared_experts") or 0) * inter
    if ep_size > 1:
        if not experts:
            return "--ep-size", (
                f"expert parallelism needs a mixture-of-experts model; "
                f"{config.hf_architecture or config.architecture} has no routed experts"
            )
        if ep_size != tp_size:
            return "--ep-size", (
                f"--ep-size {ep_size} must equal --tp-size {tp_size}: the expert-parallel "
                "group is the TP group (or leave --ep-size 1 to split every expert by channel)"
            )
        if experts % ep_size:
            return "--ep-size", f"{experts} routed experts are not divisible by --ep-size {ep_size}"
    if tp_size > 1 and experts:
        if ep_size == 1 and inter % tp_size:
            return "--tp-size", (
                f"moe_intermediate_size {inter} is not divisible by --tp-size {tp_size} "
                "(experts split by channel); try --ep-size equal to --tp-size"
            )
        if shared % tp_size:
            return "--tp-size", (
                f"shared experts' {shared} channels are not divisible by --tp-size {tp_size}"
            )
    return None


def check_ep(config: ModelConfig, tp_size: int, ep_size: int) -> bool:
    """ValueError naming the flag when `ep_problem` finds one; else whether EP is on."""
    problem = ep_problem(config, tp_size, ep_size)
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    return ep_size > 1
