"""Which layers each pipeline stage holds, and which --pp-size a model allows. Pure Python
(pdcore.model.pipeline_split re-exports it) so that `pdcore serve` checks --pp-size in its
frontend without importing torch."""

from __future__ import annotations

from pdcore.model.config import ModelConfig


def split_layers(num_layers: int, pp_size: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (the first
    `num_layers % pp_size` stages take the extra layer)."""
    if pp_size < 1 or num_layers < pp_size:
        raise ValueError(f"cannot split {num_layers} layers over {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    ranges, start = [], 0
    for stage in range(pp_size):
        end = start + base + (1 if stage < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


def pp_size_problem(config: ModelConfig, pp_size: int) -> str | None:
    """Why `config` cannot be split over `pp_size` stages (None when it can)."""
    if pp_size > config.num_layers:
        return (
            f"pp size {pp_size} is larger than the model's {config.num_layers} layers "
            f"(each stage needs at least one); valid pp sizes: 1..{config.num_layers}"
        )
    return None
