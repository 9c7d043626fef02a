"""The exact per-layer search.

For every valid global setting (tp, dp, micro-batch, recomputation) the non-MoE part of the cost is
fixed; the MoE layers are coupled only through memory, so each MoE layer's options are costed once
per distinct expert count (identical layers share them) and the exact knapsack in `knapsack.py`
picks one per layer. The best setting wins under the objective:
  train                 least step time (= most tokens/s at the fixed global batch)
  infer, latency        least decode time per token at the given batch
  infer, throughput     most tokens/s whose per-token latency is within the SLO (if one is given),
                        the batch per data-parallel rank searched when no global batch is given
A setting whose lower bound cannot beat the best found is skipped — a bound, never a guess.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from math import prod

from moeplan.cost_models import step
from moeplan.cost_models.env import Env
from moeplan.planner import knapsack
from moeplan.planner.diagnose import why_infeasible
from moeplan.planner.options import Candidate, Evaluated, layer_options
from moeplan.planner.simulate import SimResult, Simulator, simulate
from moeplan.planner.space import NO_FIX, Fix, layer_choices, settings
from moeplan.spec.errors import ConfigError, InfeasibleError
from moeplan.spec.workload import Setting

INFER_BATCHES = [2 ** i for i in range(11)]  # per data-parallel rank, throughput search: 1..1024


@dataclass(frozen=True)
class Objective:
    name: str  # throughput | latency
    slo_s: float | None = None


@dataclass
class SearchStats:
    settings: int = 0
    layer_options: int = 0
    plans_covered: int = 0
    elapsed_s: float = 0.0


@dataclass
class SearchResult:
    best: Candidate
    stats: SearchStats
    runner_up: dict[int, tuple[Evaluated, Evaluated]] = field(default_factory=dict)
    simulated: SimResult | None = None  # of `best`, when simulated
    simulated_candidates: int = 0
    analytic_best_changed: bool = False  # the simulation picked another plan than the formulas
    skew: float = 0.0


def best_for_setting(env: Env, s: Setting, stats: SearchStats,
                     bound_s: float = float("inf"), fix: Fix = NO_FIX) -> Candidate | None:
    options = layer_options(env, s, fix)
    stats.settings += 1
    stats.layer_options += sum(len(v) for v in {id(v): v for v in options.values()}.values())
    stats.plans_covered += prod(len(options[i]) for i in options)
    head = step.head_cost(env, s)
    budget = env.cluster.device.usable_bytes - head.memory_bytes
    items = [[o.item for o in options[i]] for i in range(env.spec.num_layers)]
    sol = knapsack.solve(items, budget, floor_transient=head.transient_bytes,
                         bound_s=bound_s - head.time_s)
    if sol is None:
        return None
    layers = [options[i][k] for i, k in enumerate(sol.picks)]
    head = step.with_untimed(env, s, head, sol.time_s)
    return Candidate(setting=s, layers=layers, head=head, time_s=sol.time_s + head.time_s,
                     memory_bytes=sol.memory_bytes + head.memory_bytes)


def _better(a: Candidate, b: Candidate | None, env: Env, objective: Objective) -> bool:
    if b is None:
        return True
    if env.workload.mode == "infer" and objective.name == "throughput":
        return (a.tokens_per_s(env), -a.time_s) > (b.tokens_per_s(env), -b.time_s)
    return a.time_s < b.time_s


def search(env: Env, objective: Objective, global_batch: int | None,
           micro_batch: int | None, simulate_top: int = 0, skew: float = 0.0,
           fix: Fix = NO_FIX) -> SearchResult:
    """Search every setting; raise `InfeasibleError` with the reason when nothing qualifies.

    Every candidate is costed analytically; the best `simulate_top` (one per global setting) are
    then simulated (`simulate.py`) and the best by simulation is chosen."""
    t0 = time.perf_counter()
    stats = SearchStats()
    candidates = settings(env, global_batch, micro_batch, INFER_BATCHES, fix)
    if not candidates:
        raise ConfigError(_no_setting_reason(env, global_batch, micro_batch, fix))
    candidates = _with_layer_options(env, candidates, fix)
    throughput_infer = env.workload.mode == "infer" and objective.name == "throughput"
    keep = max(1, simulate_top)
    top: list[Candidate] = []  # the best `keep`, best first
    fastest: Candidate | None = None  # for the SLO message
    for s in candidates:
        full = len(top) >= keep
        bound = float("inf") if (throughput_infer or not full) else top[-1].time_s
        cand = best_for_setting(env, s, stats, bound, fix)
        if cand is None:
            continue
        if fastest is None or cand.time_s < fastest.time_s:
            fastest = cand
        if objective.slo_s is not None and cand.time_s > objective.slo_s:
            continue
        top = _insert(top, cand, keep, env, objective)
    best = top[0] if top else None
    result_extra = {}
    if best is not None and simulate_top > 0:
        result_extra = _by_simulation(env, objective, top, skew)
        best = result_extra.pop("best")
    stats.elapsed_s = time.perf_counter() - t0
    if best is None:
        if fastest is not None:
            raise InfeasibleError(
                f"no plan meets --slo-ms {objective.slo_s * 1e3:g}: the fastest takes "
                f"{fastest.time_s * 1e3:.3g} ms per token")
        raise InfeasibleError(why_infeasible(env, candidates, fix))
    return SearchResult(best=best, stats=stats, runner_up=runner_up(env, best, fix),
                        **result_extra)


def _with_layer_options(env: Env, candidates: list[Setting], fix: Fix) -> list[Setting]:
    """The settings under which every MoE layer keeps an option that agrees with the fixed
    degrees (the options depend on tp, not on the batch); none: one line naming the layer, the
    fixes and the tensor-slicing degrees tried."""
    ok: dict[int, int | None] = {}  # tp -> the first layer without an option (None: all have)
    for s in candidates:
        if s.tp not in ok:
            ok[s.tp] = next((i for i, E in enumerate(env.spec.experts)
                             if E and not layer_choices(env, s, E, fix)), None)
    kept = [s for s in candidates if ok[s.tp] is None]
    if kept:
        return kept
    i = ok[candidates[0].tp]
    tps = ",".join(str(tp) for tp in sorted(ok))
    raise ConfigError(
        f"{fix.text()}: no valid configuration for layer {i + 1} ({env.spec.experts[i]} experts "
        f"on {env.gpus} GPUs, tp={tps}) — ep must divide the experts, es > 1 needs ep = E, "
        f"ep·es·edp = GPUs, a hierarchical all-to-all needs an ep group over several nodes, "
        f"tp-coordination needs tp > 1")


def _insert(top: list[Candidate], cand: Candidate, keep: int, env: Env,
            objective: Objective) -> list[Candidate]:
    i = 0
    while i < len(top) and not _better(cand, top[i], env, objective):
        i += 1
    return (top[:i] + [cand] + top[i:])[:keep]


def _by_simulation(env: Env, objective: Objective, top: list[Candidate], skew: float) -> dict:
    """Simulate the analytic top candidates; the best by simulated time (or tokens/s) wins."""
    sim = Simulator(env)
    results = [(c, simulate(env, c, skew=skew, sim=sim)) for c in top]
    if objective.slo_s is not None:
        results = [(c, r) for c, r in results if r.time_s <= objective.slo_s] or results[:1]
    throughput_infer = env.workload.mode == "infer" and objective.name == "throughput"

    def key(item):
        c, r = item
        return (-c.global_batch / r.time_s, r.time_s) if throughput_infer else (r.time_s,)
    best, res = min(results, key=key)
    return {"best": replace(best), "simulated": res, "simulated_candidates": len(results),
            "analytic_best_changed": best is not top[0], "skew": skew}


def runner_up(env: Env, best: Candidate,
              fix: Fix = NO_FIX) -> dict[int, tuple[Evaluated, Evaluated]]:
    """For each MoE layer, (chosen, fastest option with another expert-parallel degree) under the
    chosen setting — the cost model's reason for the degree: the other is slower, or faster but
    too large. Where ep has no alternative, the fastest other option of any kind."""
    options = layer_options(env, best.setting, fix)
    out = {}
    for i, chosen in enumerate(best.layers):
        others = [o for o in options[i] if o.choice.ep != chosen.choice.ep] or [
            o for o in options[i] if o.choice != chosen.choice]
        if env.spec.experts[i] and others:
            out[i] = (chosen, min(others, key=lambda o: (o.cost.time_s, o.choice)))
    return out


def _no_setting_reason(env: Env, global_batch: int | None, micro_batch: int | None,
                       fix: Fix = NO_FIX) -> str:
    mode = env.workload.mode
    if fix != NO_FIX and settings(env, global_batch, micro_batch, INFER_BATCHES):
        return (f"{fix.text()}: no global setting matches — tp must divide the "
                f"{env.gpus_per_node} GPUs of a node and the {env.spec.heads} heads, and "
                f"micro-batch must divide the sequences per data-parallel rank")
    if mode == "train":
        return (f"--global-batch {global_batch} cannot be split over {env.gpus} GPUs with "
                f"micro-batch {micro_batch or 'any'}: it must be a multiple of dp × micro-batch "
                f"for some tensor-slicing degree dividing {env.gpus_per_node} and the "
                f"{env.spec.heads} heads")
    return (f"--global-batch {global_batch} cannot be spread over {env.gpus} GPUs: it must be a "
            f"multiple of dp = GPUs / tp for some tensor-slicing degree dividing "
            f"{env.gpus_per_node} and the {env.spec.heads} heads")
