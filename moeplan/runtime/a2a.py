"""The all-to-all exchanges of a MoE layer, as shape transforms over dim 0 (Tutel style).

`x` is [p, ...] on each of the p members of the expert-parallel group: chunk j goes to member j,
and the result's chunk j came from member j. Both algorithms give bit-identical results (pure data
movement), and both are differentiable: the backward of an exchange is the same exchange.

Hierarchical (DeepSpeed-MoE): with g members per node on n nodes (member j = node·g + local),
  1. intra-node exchange: send to local peer l everything bound for local index l on any node
  2. layout transform: regroup by destination node
  3. inter-node exchange among the members with the same local index
(g - 1) + (n - 1) messages per member instead of p - 1.
"""

from __future__ import annotations

import torch

from moeplan.runtime.comm import Comm, all_to_all


class FlatExchange:
    name = "flat"

    def __init__(self, ep: Comm):
        self.ep = ep

    def __call__(self, x_P: torch.Tensor) -> torch.Tensor:
        return all_to_all(x_P, self.ep)


class HierarchicalExchange:
    name = "hierarchical"

    def __init__(self, intra: Comm, inter: Comm):
        self.intra, self.inter = intra, inter

    def __call__(self, x_P: torch.Tensor) -> torch.Tensor:
        g, n = self.intra.size, self.inter.size
        rest = x_P.shape[1:]
        x = x_P.reshape(n, g, *rest).transpose(0, 1).contiguous()  # [dest local, dest node]
        x = all_to_all(x, self.intra)  # [source local, dest node]
        x = x.transpose(0, 1).contiguous()  # layout transform: [dest node, source local]
        x = all_to_all(x, self.inter)  # [source node, source local]
        return x.reshape(n * g, *rest)
