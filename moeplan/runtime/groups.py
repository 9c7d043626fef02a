"""Process groups for a plan — the only module that creates groups.

All ranks call `build_groups` with the same plan; it creates every group of the layout (tp, dp, and
per distinct MoE layer configuration ep, es, edp and the hierarchical intra/inter groups) eagerly,
in one fixed order, reuses a group when the same ranks appear again, and warms each group up with
one allreduce so that a missing rank fails here, not in the middle of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moeplan.runtime.comm import Comm
from moeplan.spec import layout as L
from moeplan.spec.plan import Plan


@dataclass
class LayerGroups:
    ep: Comm
    es: Comm
    edp: Comm
    intra: Comm | None
    inter: Comm | None
    coordinated: bool


@dataclass
class Groups:
    rank: int
    world: int
    tp: Comm
    dp: Comm
    moe: dict[int, LayerGroups] = field(default_factory=dict)  # 0-based layer index
    teacher: dict[int, LayerGroups] = field(default_factory=dict)  # a MoS plan's teacher's


class _Maker:
    """Creates each distinct rank list once, in call order, on every rank."""

    def __init__(self, rank: int, world: int, timeout: timedelta | None):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.made: dict[tuple[int, ...], object] = {}

    def all_of(self, groups: L.Groups) -> Comm:
        mine = None
        for g in groups:
            key = tuple(g)
            if len(key) > 1 and key not in self.made:
                # the job's timeout, not new_group's 30-minute default: a stopped peer ends it
                self.made[key] = (dist.new_group(list(key), timeout=self.timeout)
                                  if self.world > 1 else None)
            if self.rank in key:
                mine = key
        assert mine is not None, f"rank {self.rank} missing from {groups}"
        if len(mine) == 1:
            return Comm(group=None, ranks=mine, rank_in_group=0)
        return Comm(group=self.made[mine], ranks=mine, rank_in_group=mine.index(self.rank))


def build_groups(plan: Plan, rank: int, world: int,
                 timeout: timedelta | None = None) -> Groups:
    """Every group the plan needs, created on every rank in the same order; their collectives
    fail after `timeout` (None: torch's default)."""
    N, G, tp = plan.cluster.gpus, plan.cluster.gpus_per_node, plan.parallel.tp
    if world != N:
        raise ValueError(f"plan is for {N} ranks, this job has {world}")
    make = _Maker(rank, world, timeout)
    groups = Groups(rank=rank, world=world, tp=make.all_of(L.tp_groups(N, tp)),
                    dp=make.all_of(L.dp_groups(N, tp)))
    for layers, out in ((plan.layers, groups.moe),
                        (plan.teacher.layers if plan.teacher else [], groups.teacher)):
        for layer in layers:
            if layer.kind != "moe":
                continue
            hier = layer.a2a == "hierarchical"
            lay = L.moe_layout(N, G, layer.ep, layer.es, hier)
            out[layer.index - 1] = LayerGroups(
                ep=make.all_of(lay.ep), es=make.all_of(lay.es), edp=make.all_of(lay.edp),
                intra=make.all_of(lay.intra) if hier else None,
                inter=make.all_of(lay.inter) if hier else None,
                coordinated=bool(layer.a2a_tp_coordinated))
    if world > 1:  # on the job's device, so that NCCL's communicators exist before timing
        # (a gloo job on a GPU host, `moeplan profile --backend gloo`, stays on the CPU)
        gpu = torch.cuda.is_available() and dist.get_backend() != "gloo"
        device = torch.device("cuda") if gpu else torch.device("cpu")
        for key, group in [(tuple(range(world)), None), *make.made.items()]:
            if rank in key:
                t = torch.ones(1, device=device)
                dist.all_reduce(t, group=group)
                if int(t.item()) != len(key):
                    raise RuntimeError(f"warm-up of group {list(key)} returned {t.item()}")
    return groups
