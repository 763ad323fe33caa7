"""Head arithmetic of tensor parallelism: which heads and MLP channels a rank holds, and
which tp sizes a model allows. Pure Python (pdcore.model.parallel re-exports it) so that
`pdcore serve` checks --tp-size in its frontend without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from pdcore.model.config import ModelConfig


def tp_size_problems(config: ModelConfig, tp: int) -> list[str]:
    """Why `config` cannot be split over `tp` ranks (empty when it can)."""
    problems = []
    if config.num_heads % tp:
        problems.append(f"{config.num_heads} query heads are not divisible by {tp}")
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        problems.append(f"{kv} KV heads neither divide by {tp} nor divide {tp}")
    if config.intermediate_size % tp:
        problems.append(f"intermediate size {config.intermediate_size} is not divisible by {tp}")
    return problems


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    """Every tp size the model's shapes allow (1 .. num_heads)."""
    return [tp for tp in range(1, config.num_heads + 1) if not tp_size_problems(config, tp)]


def check_tp_size(config: ModelConfig, tp: int) -> None:
    """Raise ValueError naming the head counts and the valid sizes when `tp` does not fit."""
    if tp < 1:
        raise ValueError(f"tp size must be at least 1, got {tp}")
    problems = tp_size_problems(config, tp)
    if problems:
        raise ValueError(
            f"tp size {tp} does not fit this model ({config.num_heads} query heads, "
            f"{config.num_kv_heads} KV heads, intermediate size {config.intermediate_size}): "
            f"{'; '.join(problems)}. Valid tp sizes: "
            f"{', '.join(map(str, valid_tp_sizes(config)))}"
        )


@dataclass(frozen=True)
class HeadShard:
    """The slice of heads and MLP channels one rank holds."""

    num_heads: int  # local query heads
    head_start: int  # first global query head
    num_kv_heads: int  # local KV heads (1 when replicated)
    kv_head_start: int  # first global KV head
    intermediate: int  # local MLP channels
    intermediate_start: int

    @staticmethod
    def of(config: ModelConfig, tp: int, rank: int) -> HeadShard:
        check_tp_size(config, tp)
        heads = config.num_heads // tp
        kv = config.num_kv_heads
        if kv >= tp:
            kv_local, kv_start = kv // tp, rank * (kv // tp)
        else:  # replicated: tp // kv consecutive ranks share one KV head
            kv_local, kv_start = 1, rank * kv // tp
        inter = config.intermediate_size // tp
        return HeadShard(heads, rank * heads, kv_local, kv_start, inter, rank * inter)


def local_kv_heads(config: ModelConfig, tp: int) -> int:
    """KV heads each rank stores (the KV pool's per-rank width)."""
    return HeadShard.of(config, tp, 0).num_kv_heads
