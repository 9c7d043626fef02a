"""Exact choice of one option per layer: least total time whose memory fits.

Each option has a time, a persistent memory (summed over layers) and a transient memory (only the
largest one counts: it is the working set of the layer running now). The solver is exact:
  * for every candidate transient peak τ (the distinct transient values), keep the options whose
    transient is at most τ and solve the multiple-choice knapsack with budget − τ;
  * the knapsack is a dynamic program over layers on the Pareto frontier of (memory, time) partial
    sums; a point that needs more memory and is not faster than another can never be completed
    into a better plan, so dropping it loses nothing.
Options that are dominated in all three measures are removed first, with the same argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Item:
    time_s: float
    memory_bytes: float
    transient_bytes: float


@dataclass(frozen=True)
class Solution:
    time_s: float
    memory_bytes: float  # persistent sum + transient peak
    picks: tuple[int, ...]  # index into each layer's option list


def undominated(items: Sequence[Item]) -> list[int]:
    """Indices of items not dominated by another (ties keep the first)."""
    keep = []
    for i, a in enumerate(items):
        dominated = False
        for j, b in enumerate(items):
            if j == i:
                continue
            no_worse = (b.time_s <= a.time_s and b.memory_bytes <= a.memory_bytes
                        and b.transient_bytes <= a.transient_bytes)
            better = (b.time_s, b.memory_bytes, b.transient_bytes) != (
                a.time_s, a.memory_bytes, a.transient_bytes)
            if no_worse and (better or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


def _fastest(layers: Sequence[Sequence[tuple[int, Item]]], cap: float):
    """The fastest (memory, time, picks) over all layers with memory within `cap`: the last
    point of the Pareto frontier of (memory, time) partial sums, built layer by layer.

    Sums are kept rounded to a milli-byte and a femtosecond so that sums equal up to the order of
    addition tie; ties go to the lexicographically first picks, so the output is stable. Each
    point keeps the rank of its picks in lexicographic order among the frontier's and a link to
    the point it extends (arrays: a layer costs the frontier times its options).
    """
    fixed = [(k, it) for opts in layers if len(opts) == 1 for k, it in opts]
    m0 = sum(it.memory_bytes for _, it in fixed)
    t0 = sum(it.time_s for _, it in fixed)
    if m0 > cap:
        return None
    mem, tim, rank = np.array([m0]), np.array([t0]), np.zeros(1, dtype=np.int64)
    steps: list = []  # per layer: its one pick, or (the point each point extends, its pick)
    for options in layers:
        if len(options) == 1:  # already in (m0, t0): record the pick only (ranks unchanged)
            steps.append(options[0][0])
            continue
        picks = np.array([k for k, _ in options])
        m = mem[:, None] + np.array([it.memory_bytes for _, it in options])[None, :]
        t = tim[:, None] + np.array([it.time_s for _, it in options])[None, :]
        fits = m <= cap
        parent = np.broadcast_to(np.arange(len(mem))[:, None], m.shape)[fits]
        pick = np.broadcast_to(picks[None, :], m.shape)[fits]
        m, t = np.round(m[fits], 3), np.round(t[fits], 15)
        order = np.lexsort((pick, rank[parent], t, m))  # by memory, time, then picks
        m, t, parent, pick = m[order], t[order], parent[order], pick[order]
        keep = t < np.minimum.accumulate(np.concatenate(([np.inf], t[:-1])))
        if not keep.any():
            return None
        mem, tim, parent, pick = m[keep], t[keep], parent[keep], pick[keep]
        lex = np.lexsort((pick, rank[parent]))
        rank = np.empty(len(lex), dtype=np.int64)
        rank[lex] = np.arange(len(lex))
        steps.append((parent, pick))
    at, chosen = len(mem) - 1, []
    for step in reversed(steps):
        if isinstance(step, tuple):
            parent, pick = step
            chosen.append(int(pick[at]))
            at = int(parent[at])
        else:
            chosen.append(step)
    return float(mem[-1]), float(tim[-1]), tuple(reversed(chosen))


def solve(layers: Sequence[Sequence[Item]], budget_bytes: float, floor_transient: float = 0.0,
          bound_s: float = float("inf")) -> Solution | None:
    """Least-time choice of one item per layer with Σ memory + max transient ≤ budget.

    `floor_transient` is a transient peak that holds whatever is chosen (other layers, the head);
    `bound_s` lets a caller skip work that cannot beat a solution it already has.
    """
    kept = [[(k, layer[k]) for k in undominated(layer)] for layer in layers]
    taus = sorted({floor_transient} | {it.transient_bytes for layer in kept for _, it in layer
                                        if it.transient_bytes > floor_transient})
    best: Solution | None = None
    for tau in taus:
        allowed = [[(k, it) for k, it in layer if it.transient_bytes <= tau] for layer in kept]
        if any(not a for a in allowed) or budget_bytes - tau < 0:
            continue
        limit = best.time_s if best else bound_s
        if sum(min(it.time_s for _, it in a) for a in allowed) >= limit:
            continue
        fastest = _fastest(allowed, budget_bytes - tau)
        if fastest is None:
            continue
        mem, t, picks = fastest
        if t < limit:
            best = Solution(time_s=t, memory_bytes=mem + tau, picks=picks)
    return best
