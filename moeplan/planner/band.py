"""The band on a prediction: the cluster profile's spread propagated through the cost model.

Each group of calibrated terms (`ClusterProfile.spread`: compute, framework, communication) is
set to its p10 and to its p90 in turn, and so is the model's own error where the profile states
it (every term at once) (`cost_models.env.Scales`) and the chosen configuration
is costed again; the groups move independently, so their deviations from the prediction add in
quadrature: p10 = t − √Σ(t − t_lo)², p90 = t + √Σ(t_hi − t)².
"""

from __future__ import annotations

from dataclasses import replace
from math import fsum, hypot

from moeplan.cost_models import step
from moeplan.cost_models.env import Env, Scales
from moeplan.planner.options import Candidate, evaluate
from moeplan.spec.plan import Band


def recost_s(env: Env, cand: Candidate) -> float:
    """The candidate's step time (train) or per-token latency (infer) under `env`."""
    layers = [evaluate(env, cand.setting, i, ev.choice).cost.time_s
              for i, ev in enumerate(cand.layers)]
    head = step.with_untimed(env, cand.setting, step.head_cost(env, cand.setting),
                             fsum(layers))
    return fsum(layers) + head.time_s


def _scales(group: str, factor: float) -> Scales:
    """One group at `factor`; the model's own error scales every term (the whole figure)."""
    if group == "model":
        return Scales(compute=factor, framework=factor, communication=factor)
    return replace(Scales(), **{group: factor})


def band(env: Env, cand: Candidate) -> Band | None:
    spread = env.cluster.spread
    if not spread:
        return None
    t = recost_s(env, cand)
    terms = {}
    for name, sp in sorted(spread.items()):
        terms[name] = tuple(recost_s(replace(env, scales=_scales(name, f)), cand)
                            for f in (sp.p10, sp.p90))
    # the terms combined in quadrature (hypot: no overflow on absurd profiles' huge times)
    below = hypot(*(t - lo for lo, _ in terms.values()))
    above = hypot(*(hi - t for _, hi in terms.values()))
    return Band(p10_s=max(0.0, t - below), p90_s=t + above, terms_s=terms)
