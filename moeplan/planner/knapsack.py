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


def _frontier(layers: Sequence[Sequence[tuple[int, Item]]], cap: float):
    """Pareto frontier of (memory, time, picks) over all layers, memory within `cap`.

    Sums are kept rounded to a milli-byte and a femtosecond so that sums equal up to the order of
    addition tie; ties go to the lexicographically first picks, so the output is stable.
    """
    fixed = [(k, it) for opts in layers if len(opts) == 1 for k, it in opts]
    m0 = sum(it.memory_bytes for _, it in fixed)
    t0 = sum(it.time_s for _, it in fixed)
    if m0 > cap:
        return []
    frontier: list[tuple[float, float, tuple[int, ...]]] = [(m0, t0, ())]
    for options in layers:
        if len(options) == 1:  # already in (m0, t0): record the pick only
            k = options[0][0]
            frontier = [(m, t, picks + (k,)) for m, t, picks in frontier]
            continue
        merged = [(round(m + it.memory_bytes, 3), round(t + it.time_s, 15), picks + (k,))
                  for m, t, picks in frontier for k, it in options
                  if m + it.memory_bytes <= cap]
        merged.sort()
        frontier, best_t = [], float("inf")
        for point in merged:
            if point[1] < best_t:
                frontier.append(point)
                best_t = point[1]
        if not frontier:
            return []
    return frontier


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
        frontier = _frontier(allowed, budget_bytes - tau)
        if not frontier:
            continue
        mem, t, picks = frontier[-1]  # the fastest point that fits
        if t < limit:
            best = Solution(time_s=t, memory_bytes=mem + tau, picks=picks)
    return best
