"""Mixture-of-experts pieces shared by the MoE families: routers, grouped experts, SwiGLU MLP.

Experts run grouped: the (token, expert) pairs the router picked are sorted by expert, each
expert that got any tokens runs one matmul pair over exactly its rows, and the weighted rows
are summed back per token in one index_add. Work is proportional to tokens x top_k, never
tokens x experts; experts no token picked cost nothing. Sums run in expert order, as
transformers' loop does, so fp32 results match it closely.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdcore.model.linear import Linear

ToDevice = Callable[[torch.Tensor], torch.Tensor]


class SwiGLU:
    """down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    __slots__ = ("gate_up", "down")

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate_up = Linear(gate_up)
        self.down = Linear(down)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, to: ToDevice) -> SwiGLU:
        """From HF's `{prefix}gate_proj/up_proj/down_proj.weight`."""
        gate_up = torch.cat([state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"]])
        return cls(to(gate_up), to(state[prefix + "down_proj.weight"]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Experts:
    """The routed experts of one MoE layer, run grouped by expert."""

    def __init__(self, experts: list[SwiGLU]) -> None:
        self.experts = experts

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, num_experts: int, to: ToDevice
    ) -> Experts:
        """Both ways transformers writes experts: one module per expert
        (`{prefix}{e}.gate_proj.weight`, the released checkpoints' names and what
        save_pretrained writes) or stacked 3D tensors (`{prefix}gate_up_proj`, `down_proj`)."""
        if prefix + "gate_up_proj" in state:
            gate_up, down = state[prefix + "gate_up_proj"], state[prefix + "down_proj"]
            return cls([SwiGLU(to(gate_up[e]), to(down[e])) for e in range(num_experts)])
        return cls([SwiGLU.from_state(state, f"{prefix}{e}.", to) for e in range(num_experts)])

    def __call__(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, hidden]; topk_ids/topk_weights [T, k] -> sum_k weight * expert(x) [T, hidden]."""
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k  # the token each sorted (token, expert) pair came from
        weights = topk_weights.reshape(-1)[order].to(x.dtype)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        rows = x.index_select(0, token_of)
        out = torch.empty_like(rows)
        start = 0
        for expert, n in enumerate(counts):
            if n:
                end = start + n
                y = self.experts[expert](rows[start:end])
                torch.mul(y, weights[start:end, None], out=out[start:end])
                start = end
        return torch.zeros_like(x).index_add_(0, token_of, out)


def grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing: sigmoid scores; the correction bias only steers the choice;
    keep the `topk_group` groups whose two best biased scores sum highest, then the top_k
    experts inside them; weights are the unbiased scores, normalised, scaled."""
    scores = router_logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, weights * routed_scaling_factor


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-MoE / Mixtral routing: softmax over all experts (fp32), top_k, optionally
    renormalised over the chosen ones."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return topk_ids, weights.to(router_logits.dtype)
