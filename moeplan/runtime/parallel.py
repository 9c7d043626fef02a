"""`parallelize(spec, full_state, plan, groups)`: the single-device model's weights, sharded as the
plan says.

Order (fixed): tensor-slicing of attention and dense/residual MLPs over tp; then, per MoE layer,
expert parallelism over its ep group (each rank keeps E/ep experts), expert slicing over es, and its
all-to-all (flat or hierarchical, TP-coordinated or not). Weights are cut from the full model by
the modules' own `slices()`, so the sharded model computes the same function.

Gradient synchronisation (`GradSync`), derived from which ranks saw which tokens:
  non-expert parameters   sum over dp, / dp       (tp ranks hold identical or disjoint slices)
  router, TP-coordinated  sum over tp first       (each tp rank routed 1/tp of the tokens)
  per-head q/k norms,     sum over tp first       (whole on every tp rank, each applied to
  MLA down projections                            its own heads: `REPLICATED_PER_HEADS`)
  experts of layer l      sum over edp_l, / (dp · t), t = tp unless the layer is TP-coordinated
                          (uncoordinated, every tp rank dispatches the same tokens again)
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

import torch

from moeplan.runtime.a2a import FlatExchange, HierarchicalExchange
from moeplan.runtime.comm import allreduce_
from moeplan.runtime.groups import Groups
from moeplan.runtime.model import GPT, Experts, MoEParallel, Parallel
from moeplan.spec.plan import Plan

INIT_STD = 0.02  # GPT-2's: every randomly initialised weight of `model.GPT` (tested)


def cut(full: torch.Tensor, spec: tuple) -> torch.Tensor:
    for dim, start, stop in spec:
        full = full.narrow(dim, start, stop - start)
    return full


def load_full_state(model: GPT, full: dict[str, torch.Tensor]) -> None:
    """Copy a full (single-device) state into a possibly sharded model."""
    slices = model.slices()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in full:
                raise KeyError(f"checkpoint has no parameter {name}")
            src = cut(full[name], slices.get(name, ()))
            if src.shape != p.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit "
                                 f"{tuple(p.shape)}")
            p.copy_(src)


def _drawn(seed: int, name: str, shape: torch.Size, expert: int = -1) -> torch.Tensor:
    """N(0, INIT_STD) from a generator of its own: (seed, parameter name[, expert])."""
    # the CPU generator (mt19937) keeps 32 bits of its seed: hash all three into them
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}#{name}#{expert}".encode()))
    return torch.empty(shape).normal_(0.0, INIT_STD, generator=g)


def whole_shapes(spec) -> dict[str, torch.Size]:
    """Every parameter's shape in the single-device model, from a meta-device copy (no memory)."""
    with torch.device("meta"):
        return {n: p.shape for n, p in GPT(spec).named_parameters()}


def init_seeded(model: GPT, seed: int) -> None:
    """A fresh model, sharded or not, one parameter (one expert) at a time: a parameter its
    construction drew at random becomes this rank's slice of a whole tensor drawn from a
    generator of (seed, name) — (seed, name, expert) for an expert's weights, so a rank draws
    only its own experts — and a constant one (zero biases, unit norms) stays. Every plan then
    holds pieces of one model, and the host never holds more than one whole parameter, where
    initialising the whole model on every rank held all of it on every rank."""
    shapes = whole_shapes(model.spec)
    experts = {f"{m}." for m, mod in model.named_modules() if isinstance(mod, Experts)}
    slices = model.slices()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0 or bool((p == p.reshape(-1)[0]).all()):
                continue  # constant: the same piece whatever the slice
            cuts = slices.get(name, ())
            if name.rsplit(".", 1)[0] + "." not in experts:
                p.copy_(cut(_drawn(seed, name, shapes[name]), cuts))
                continue
            (_, e0, e1), *rest = cuts  # an expert stack: experts along dim 0, then its slice
            inner = tuple((dim - 1, a, b) for dim, a, b in rest)
            for e in range(e0, e1):
                p[e - e0].copy_(cut(_drawn(seed, name, shapes[name][1:], e), inner))


def parallel_context(groups: Groups, teacher: bool = False) -> Parallel:
    """The model's (or a MoS plan's teacher's) tensor slicing and per-MoE-layer exchange."""
    moe = {}
    for index, g in (groups.teacher if teacher else groups.moe).items():
        exchange = (HierarchicalExchange(g.intra, g.inter) if g.intra is not None
                    else FlatExchange(g.ep))
        moe[index] = MoEParallel(ep=g.ep, es=g.es, exchange=exchange,
                                 coordinated=g.coordinated and groups.tp.size > 1)
    return Parallel(tp=groups.tp, moe=moe)


def parallelize(full: dict[str, torch.Tensor], plan: Plan, groups: Groups) -> GPT:
    """This rank's shard of the model whose full (single-device) state is `full`."""
    sharded = GPT(plan.model, parallel_context(groups))
    load_full_state(sharded, full)
    return sharded


# parameters every tp rank holds whole but applies to its own heads only: their gradients are
# partial sums over tp (per-head query/key norms; MLA's down projections and their norms)
REPLICATED_PER_HEADS = ("attn.q_norm.weight", "attn.k_norm.weight", "attn.q_a.weight",
                        "attn.q_a_norm.weight", "attn.kv_a.weight", "attn.kv_a_norm.weight")


def sync_key(name: str, groups: Groups) -> tuple:
    """How a parameter's gradient is reduced: (group reduced over first or None, the
    data-parallel group, the scale after the sum) — see the module's table."""
    tp, dp = groups.tp, groups.dp
    parts = name.split(".")
    index = int(parts[1]) if parts[0] == "blocks" else None
    g = groups.moe.get(index) if index is not None else None
    coordinated = bool(g and g.coordinated and tp.size > 1)
    if g is not None and parts[3] == "experts":
        return (None, g.edp, 1.0 / (dp.size * (1 if coordinated else tp.size)))
    if g is not None and parts[3] == "router" and coordinated:
        return (tp, dp, 1.0 / dp.size)
    if name.endswith(REPLICATED_PER_HEADS) and tp.size > 1:
        return (tp, dp, 1.0 / dp.size)  # whole on every tp rank, each used for its own heads
    return (None, dp, 1.0 / dp.size)


class GradSync:
    """Buckets of gradients that share a reduction; one flat allreduce per bucket."""

    def __init__(self, model: GPT, groups: Groups):
        buckets: OrderedDict[tuple, list] = OrderedDict()
        for name, p in model.named_parameters():
            buckets.setdefault(sync_key(name, groups), []).append(p)
        self.buckets = list(buckets.items())

    def __call__(self) -> None:
        for (pre, comm, scale), params in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            if pre is not None:
                allreduce_(flat, pre)
            allreduce_(flat, comm)
            flat.mul_(scale)
            offset = 0
            for p in params:  # views of the reduced buffer: no copy back
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p)
                offset += n

