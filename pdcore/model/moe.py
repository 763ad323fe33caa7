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
from pdcore.model.moe_flags import check_ep, ep_problem, num_routed_experts  # noqa: F401
from pdcore.model.parallel import TPGroup

ToDevice = Callable[[torch.Tensor], torch.Tensor]


class SwiGLU:
    """down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    __slots__ = ("gate_up", "down")

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate_up = Linear(gate_up)
        self.down = Linear(down)

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        prefix: str,
        to: ToDevice,
        tp: TPGroup | None = None,
    ) -> SwiGLU:
        """From HF's `{prefix}gate_proj/up_proj/down_proj.weight`; with `tp`, this rank's
        share of the intermediate channels (gate/up rows, down columns: its output is a
        partial sum the caller all-reduces)."""
        gate, up = state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"]
        down = state[prefix + "down_proj.weight"]
        if tp is not None and tp.size > 1:
            start, n = channel_shard(gate.shape[0], tp)
            gate, up, down = (
                gate.narrow(0, start, n),
                up.narrow(0, start, n),
                down.narrow(1, start, n),
            )
        return cls(to(torch.cat([gate, up])), to(down))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def channel_shard(size: int, tp: TPGroup) -> tuple[int, int]:
    """(first, count) of `size` channels that TP rank `tp.rank` holds."""
    if size % tp.size:
        raise ValueError(f"{size} MLP channels are not divisible by tp size {tp.size}")
    n = size // tp.size
    return tp.rank * n, n


class Experts:
    """The routed experts of one MoE layer, run grouped by expert.

    Three placements: all experts whole (no TP); with TP and no EP, every expert's
    intermediate channels split over the ranks (each rank's output is a partial sum the
    layer all-reduces); with EP (`ep` set: the TP group), rank r holds experts
    [r * E/ep, (r + 1) * E/ep) whole, and tokens travel to their experts' ranks and back
    by all-to-all (`_expert_parallel`)."""

    def __init__(
        self,
        experts: list[SwiGLU],
        first: int = 0,
        total: int = 0,
        ep: TPGroup | None = None,
        share: TPGroup | None = None,
    ) -> None:
        self.experts = experts  # global experts [first, first + len(experts))
        self.first = first
        self.total = total or len(experts)
        self.ep = ep if ep is not None and ep.size > 1 else None
        # The ranks that hold the same tokens (the attention's TP group, over which the
        # layer all-reduces): each routes its own share of them. Without dp-attention
        # that is the EP group itself; with it, each rank has a batch of its own.
        self.share = share if share is not None else self.ep

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        prefix: str,
        num_experts: int,
        to: ToDevice,
        tp: TPGroup | None = None,
        ep: bool = False,
        ep_group: TPGroup | None = None,
    ) -> Experts:
        """Both ways transformers writes experts: one module per expert
        (`{prefix}{e}.gate_proj.weight`, the released checkpoints' names and what
        save_pretrained writes) or stacked 3D tensors (`{prefix}gate_up_proj`, `down_proj`).
        `tp` and `ep`: this rank's experts (ep: the TP group is the EP group), else
        this rank's channels of every expert. `ep_group` (dp-attention): whole experts
        split over that group, each rank routing tokens of its own (`tp`: the ranks that
        share them)."""
        share: TPGroup | None = None
        group: TPGroup | None
        if ep_group is not None and ep_group.size > 1:  # experts over ep_group, tokens own
            group, ep, share = ep_group, True, tp or TPGroup(device=ep_group.device)
        else:
            group = tp if tp is not None and tp.size > 1 else None
        ids = range(num_experts)
        if group is not None and ep:
            if num_experts % group.size:
                raise ValueError(f"{num_experts} experts are not divisible by ep size {group.size}")
            per = num_experts // group.size
            ids = range(group.rank * per, (group.rank + 1) * per)
        shard = None if ep else group
        if prefix + "gate_up_proj" in state:
            gate_up, down = state[prefix + "gate_up_proj"], state[prefix + "down_proj"]
            made = []
            for e in ids:
                gu, d = gate_up[e], down[e]
                if shard is not None:
                    inter = d.shape[1]
                    start, n = channel_shard(inter, shard)
                    gu = torch.cat([gu.narrow(0, start, n), gu.narrow(0, inter + start, n)])
                    d = d.narrow(1, start, n)
                made.append(SwiGLU(to(gu), to(d)))
        else:
            made = [SwiGLU.from_state(state, f"{prefix}{e}.", to, shard) for e in ids]
        return cls(made, ids.start, num_experts, group if ep else None, share)

    def idle(self, hidden: int, top_k: int, dtype: torch.dtype, device: torch.device) -> None:
        """dp-attention, a step where this rank has no batch but a peer has: take part in
        this layer's all-to-alls with no tokens of its own, running this rank's experts on
        what the peers send (SGLang's idle batch), so no peer waits forever."""
        if self.ep is None:
            return
        self._expert_parallel(
            torch.empty((0, hidden), dtype=dtype, device=device),
            torch.empty((0, top_k), dtype=torch.long, device=device),
            torch.empty((0, top_k), dtype=torch.float32, device=device),
        )

    def __call__(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, hidden]; topk_ids/topk_weights [T, k] -> sum_k weight * expert(x) [T, hidden]
        (with EP: only this rank's share of the tokens is filled, the rest is 0, and with
        TP channels a partial sum: either way the layer's all-reduce completes it)."""
        if self.ep is not None:
            return self._expert_parallel(x, topk_ids, topk_weights)
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k  # the token each sorted (token, expert) pair came from
        weights = topk_weights.reshape(-1)[order].to(x.dtype)
        rows = self._run(x.index_select(0, token_of), flat[order])
        rows.mul_(weights[:, None])
        return torch.zeros_like(x).index_add_(0, token_of, rows)

    def _run(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """expert(ids[i])(rows[i]) for rows already sorted by global expert id `ids`, each
        expert one matmul pair over exactly its rows."""
        out = torch.empty_like(rows)
        counts = torch.bincount(ids - self.first, minlength=len(self.experts)).tolist()
        start = 0
        for expert, n in enumerate(counts):
            if n:
                out[start : start + n] = self.experts[expert](rows[start : start + n])
                start += n
        return out

    def _expert_parallel(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Every rank holds all T tokens (the attention's all-reduce replicated them); rank
        r routes its own contiguous share of them. Dispatch: each (token, expert) pair's
        row goes to the expert's rank (one all_to_all of the counts, one of the rows, one
        of the expert ids); each rank runs its experts over what it got; combine: the
        outputs go back (one all_to_all) and are weighted and summed per token at home, in
        global expert order, as without EP."""
        ep, group = self.ep, self.share
        assert ep is not None and group is not None
        t, k = topk_ids.shape
        share = -(-t // group.size)
        lo, hi = min(group.rank * share, t), min((group.rank + 1) * share, t)
        flat = topk_ids[lo:hi].reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        ids = flat[order]
        per_rank = self.total // ep.size
        send = torch.bincount(ids // per_rank, minlength=ep.size)
        recv = ep.all_to_all(send, [1] * ep.size, [1] * ep.size)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        rows = ep.all_to_all(x[lo:hi].index_select(0, token_of), send_splits, recv_splits)
        got_ids = ep.all_to_all(ids, send_splits, recv_splits)
        by_expert = torch.argsort(got_ids, stable=True)
        done = torch.empty_like(rows)
        done[by_expert] = self._run(rows[by_expert], got_ids[by_expert])
        back = ep.all_to_all(done, recv_splits, send_splits)
        back.mul_(topk_weights[lo:hi].reshape(-1)[order].to(x.dtype)[:, None])
        out = torch.zeros_like(x)
        out[lo:hi].index_add_(0, token_of, back)
        return out


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
