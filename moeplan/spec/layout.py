"""Rank enumeration for a plan: which ranks form each process group. Pure code, no torch.

The layout is the one the cost model assumes (see `space.py`):
  non-expert   rank = dp_index · tp + tp_index
  MoE layer    rank = (edp_index · ep + ep_index) · es + es_index
Hierarchical all-to-all splits an ep group by node: `intra` groups are the members that share a
node, `inter` groups the members with the same position inside their node.
Every function returns all groups of a kind (each a sorted list of ranks), in a fixed order, so
that every rank creates the same groups in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

Groups = list[list[int]]


def tp_groups(world: int, tp: int) -> Groups:
    return [[d * tp + t for t in range(tp)] for d in range(world // tp)]


def dp_groups(world: int, tp: int) -> Groups:
    return [[d * tp + t for d in range(world // tp)] for t in range(tp)]


def _moe_rank(edp_i: int, ep_i: int, es_i: int, ep: int, es: int) -> int:
    return (edp_i * ep + ep_i) * es + es_i


def ep_groups(world: int, ep: int, es: int) -> Groups:
    edp = world // (ep * es)
    return [[_moe_rank(d, j, k, ep, es) for j in range(ep)] for d in range(edp) for k in range(es)]


def es_groups(world: int, ep: int, es: int) -> Groups:
    edp = world // (ep * es)
    return [[_moe_rank(d, j, k, ep, es) for k in range(es)] for d in range(edp) for j in range(ep)]


def edp_groups(world: int, ep: int, es: int) -> Groups:
    edp = world // (ep * es)
    return [[_moe_rank(d, j, k, ep, es) for d in range(edp)] for j in range(ep) for k in range(es)]


def split_by_node(group: list[int], gpus_per_node: int) -> tuple[Groups, Groups]:
    """(intra, inter) sub-groups of one group for the hierarchical all-to-all.

    Requires the same number of members on every node the group touches (the search only offers
    hierarchical all-to-all for such groups)."""
    nodes: dict[int, list[int]] = {}
    for r in group:
        nodes.setdefault(r // gpus_per_node, []).append(r)
    intra = [sorted(v) for _, v in sorted(nodes.items())]
    sizes = {len(v) for v in intra}
    if len(sizes) != 1:
        raise ValueError(f"group {group} has uneven members per node: {sorted(sizes)}")
    g = sizes.pop()
    inter = [[members[i] for members in intra] for i in range(g)]
    return intra, inter


@dataclass(frozen=True)
class MoeLayout:
    ep: Groups
    es: Groups
    edp: Groups
    intra: Groups  # empty unless hierarchical
    inter: Groups


def moe_layout(world: int, gpus_per_node: int, ep: int, es: int, hierarchical: bool) -> MoeLayout:
    eps = ep_groups(world, ep, es)
    intra: Groups = []
    inter: Groups = []
    if hierarchical:
        for g in eps:
            a, b = split_by_node(g, gpus_per_node)
            intra += a
            inter += b
    return MoeLayout(ep=eps, es=es_groups(world, ep, es), edp=edp_groups(world, ep, es),
                     intra=intra, inter=inter)

