"""Lock-step of the dp ranks under --enable-dp-attention.

With dp-attention every dp rank schedules and attends over a batch of its own, while each
MoE layer's experts are split over all the ranks: a forward pass on one rank exchanges
tokens with every other rank (all-to-all) at every MoE layer. So all ranks must run a pass
together. Once per engine-loop iteration each rank says whether it has a batch (one tiny
all-reduce); when any has, the ranks without one run an idle pass -- every MoE layer's
all-to-alls with no tokens of their own, computing their experts for the peers' tokens
(SGLang's idle batch). When none has, nobody runs anything and the loop sleeps as usual.
"""

from __future__ import annotations

import torch

from pdcore.model.parallel import TPGroup


class DPAttentionSync:
    def __init__(self, group: TPGroup) -> None:
        self.group = group
        self.any_busy = False  # whether some rank ran a forward pass in the last turn
        self._flag = torch.zeros(1, dtype=torch.long, device=group.device)  # reused each turn

    def turn(self, busy: bool) -> bool:
        """Called exactly once per engine-loop iteration on every dp rank: whether any rank
        has a batch this iteration (then every rank runs a pass: its batch, or idle)."""
        self._flag.fill_(1 if busy else 0)
        self.any_busy = bool(self.group.all_reduce(self._flag).item())
        return self.any_busy
