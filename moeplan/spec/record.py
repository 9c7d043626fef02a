"""`RunRecord` (run.json): what a run measured, and its comparison with the plan's predictions.

Pure (no torch) so that reports and validation can read runs without the runtime. Times are
seconds per training step (train) or per generated token (infer), as in the plan; per-phase
figures are the mean over ranks (the max is kept beside it: the slowest rank sets the pace).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict

from moeplan.spec.errors import ConfigError
from moeplan.spec.phases import STEP_END, Phase
from moeplan.spec.plan import Plan, digest

RUN_SCHEMA_VERSION = 1


class LayerMeasure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int  # 1-based, as in the plan
    kind: Literal["dense", "moe"]
    phases_s: dict[str, float]
    phases_max_s: dict[str, float]
    dropped: int = 0  # choices dropped for capacity, summed over ranks and measured passes
    routed: int = 0  # choices routed (tokens × k), summed likewise
    # training, per step (warm-up included), over all ranks: the router's health
    load_max_over_mean: list[float] = []  # the busiest expert's choices over the mean
    load_entropy: list[float] = []  # entropy of the choices over experts / log E (1: uniform)
    dropped_share: list[float] = []  # choices dropped for capacity / choices


class Measured(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step_time_s: float | None = None
    latency_s: float | None = None
    prefill_s: float | None = None
    tokens_per_s: float
    grad_sync_s: float | None = None
    optimizer_s: float | None = None
    peak_memory_bytes: float
    memory_kind: str  # "cuda max allocated" or "cpu peak rss (whole process)"
    head_phases_s: dict[str, float]
    # the largest rank's bytes of the plan's memory terms of the same names, counted exactly:
    # training's weights, gradients as the backward leaves them and optimizer states (expert_*
    # apart); inference's weights in the plan's dtype and its KV cache
    memory_bytes: dict[str, float] = {}


class Comparison(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: str  # "step", "layer 2", "layers (sum)"
    phase: str
    predicted: float
    measured: float
    rel_error: float | None  # (predicted - measured) / measured


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = RUN_SCHEMA_VERSION
    plan_digest: str
    mode: Literal["train", "infer"]
    world: int
    backend: str
    device: str
    measured_steps: int
    warmup_steps: int
    measured: Measured
    layers: list[LayerMeasure]
    # a loss that was not finite (the run diverged) is written and read as null
    losses: list[float | None] = []
    eval_loss: float | None = None
    comparison: list[Comparison] = []
    memory_comparison: list[Comparison] = []  # `compare_memory`


def rel_error(predicted: float, measured: float) -> float | None:
    """The prediction's error relative to what was measured: (predicted − measured) / measured."""
    return (predicted - measured) / measured if measured > 0 else None


def _row(scope: str, phase: str, predicted: float, measured: float) -> Comparison:
    return Comparison(scope=scope, phase=phase, predicted=predicted, measured=measured,
                      rel_error=rel_error(predicted, measured))


def compare(plan: Plan, run: RunRecord) -> list[Comparison]:
    """Rows: the headline figure, each phase summed over layers, then each layer's total."""
    pred, meas = plan.predicted, run.measured
    rows: list[Comparison] = []
    if run.mode == "train":
        rows.append(_row("step", "step time", pred.step_time_s or 0.0, meas.step_time_s or 0.0))
    else:
        rows.append(_row("token", "decode latency", pred.latency_s or 0.0, meas.latency_s or 0.0))
        rows.append(_row("batch", "prefill", pred.prefill_s or 0.0, meas.prefill_s or 0.0))
    rows.append(_row("step", "tokens/s", pred.tokens_per_s, meas.tokens_per_s))
    predicted_phase: dict[str, float] = {}
    measured_phase: dict[str, float] = {}
    for lp, lm in zip(plan.layers, run.layers):
        for k, v in lp.predicted.phases_s.items():
            predicted_phase[k] = predicted_phase.get(k, 0.0) + v
        for k, v in lm.phases_s.items():
            measured_phase[k] = measured_phase.get(k, 0.0) + v
    if run.mode == "train":
        measured_phase[Phase.GRAD_SYNC] = meas.grad_sync_s or 0.0
        measured_phase[Phase.OPTIMIZER] = meas.optimizer_s or 0.0
        for k in STEP_END:
            predicted_phase[k] = predicted_phase.get(k, 0.0) + pred.head_phases_s.get(k, 0.0)
    for k in (Phase.HEAD, Phase.TEACHER):
        if k in pred.head_phases_s or k in meas.head_phases_s:
            predicted_phase[k] = pred.head_phases_s.get(k, 0.0)
            measured_phase[k] = meas.head_phases_s.get(k, 0.0)
    if pred.head_phases_s.get(Phase.UNTIMED):  # the step outside every timed phase
        headline = meas.step_time_s if run.mode == "train" else meas.latency_s
        predicted_phase[Phase.UNTIMED] = pred.head_phases_s[Phase.UNTIMED]
        measured_phase[Phase.UNTIMED] = max(0.0, (headline or 0.0)
                                            - sum(measured_phase.values()))
    for k in sorted(set(predicted_phase) | set(measured_phase)):
        p, m = predicted_phase.get(k, 0.0), measured_phase.get(k, 0.0)
        if p > 0 or m > 0:
            rows.append(_row("all layers", k, p, m))
    for lp, lm in zip(plan.layers, run.layers):
        p = sum(v for k, v in lp.predicted.phases_s.items()
                if k not in STEP_END)
        m = sum(v for k, v in lm.phases_s.items())
        rows.append(_row(f"layer {lp.index}", f"{lp.kind} forward+backward" if run.mode == "train"
                         else f"{lp.kind} per token", p, m))
    return rows


def compare_memory(plan: Plan, run: RunRecord) -> list[Comparison]:
    """Per memory term the run counted: the plan's bytes per GPU against the run's largest
    rank's."""
    predicted = plan.predicted.memory_breakdown_bytes
    return [_row("memory per GPU", term, predicted.get(term, 0.0), measured)
            for term, measured in sorted(run.measured.memory_bytes.items())
            if measured > 0 or predicted.get(term, 0.0) > 0]


HEALTHY_DROPPED = 0.10  # a router is healthy below 10% dropped at capacity factor 1 ...
HEALTHY_LOAD = 2.0  # ... and no expert above twice the mean load


def router_health(run: RunRecord) -> dict | None:
    """A training run's routers after warm-up: the layer with the largest mean dropped share,
    the largest busiest-expert load over the mean in any step, and whether both are healthy
    (None: no MoE layer recorded its routing)."""
    rows = []
    for layer in run.layers:
        dropped = layer.dropped_share[run.warmup_steps:]
        load = layer.load_max_over_mean[run.warmup_steps:]
        if dropped and load:
            rows.append((layer.index, sum(dropped) / len(dropped), max(load)))
    if not rows:
        return None
    drop = max(rows, key=lambda r: r[1])
    load = max(rows, key=lambda r: r[2])
    return {"healthy": drop[1] < HEALTHY_DROPPED and load[2] <= HEALTHY_LOAD,
            "dropped": drop[1], "dropped_layer": drop[0],
            "load_max_over_mean": load[2], "load_layer": load[0]}


def summarize(rows: list[Comparison]) -> dict:
    """Median and worst |relative error| of the step figure, the phases and the layers."""
    def stats(selected: list[Comparison]) -> dict:
        errs = sorted(abs(r.rel_error) for r in selected if r.rel_error is not None)
        if not errs:
            return {"count": 0, "median_abs_error": None, "worst_abs_error": None}
        mid = len(errs) // 2
        med = errs[mid] if len(errs) % 2 else (errs[mid - 1] + errs[mid]) / 2
        return {"count": len(errs), "median_abs_error": med, "worst_abs_error": errs[-1]}

    headline = [r for r in rows if r.phase in HEADLINE_FIGURES]
    phases = [r for r in rows if r.scope == "all layers"]
    layers = [r for r in rows if r.scope.startswith("layer ")]
    return {"step": stats(headline), "phases": stats(phases), "layers": stats(layers),
            "all": stats(rows)}


HEADLINE_FIGURES = ("step time", "decode latency")


def band_check(plan: Plan, run: RunRecord) -> dict | None:
    """Whether the run's headline figure fell inside the plan's p10-p90 band (None: no band)."""
    b = plan.predicted.band
    measured = run.measured.step_time_s if run.mode == "train" else run.measured.latency_s
    if b is None or measured is None:
        return None
    return {"p10_s": b.p10_s, "p90_s": b.p90_s, "measured_s": measured,
            "inside": b.p10_s <= measured <= b.p90_s}


def limit_breaches(rows: list[Comparison], max_error: float | None,
                   max_phase_error: float | None) -> list[str]:
    """Each figure whose |relative error| is beyond its limit (fractions, e.g. 0.25), worst
    first: the step / per-token figure against `max_error`, each phase summed over the layers
    against `max_phase_error`. A figure measured as zero has no relative error and is skipped."""
    checks = []
    for r in rows:
        if r.rel_error is None:
            continue
        if max_error is not None and r.phase in HEADLINE_FIGURES:
            checks.append((r, max_error, "--max-error"))
        if max_phase_error is not None and r.scope == "all layers":
            checks.append((r, max_phase_error, "--max-phase-error"))
    broken = [(r, limit, flag) for r, limit, flag in checks if abs(r.rel_error) > limit]
    broken.sort(key=lambda b: (-(abs(b[0].rel_error) / b[1] if b[1] > 0 else math.inf),
                               b[0].phase))
    return [f"{'phase ' if r.scope == 'all layers' else ''}{r.phase} is {r.rel_error:+.1%} off "
            f"(predicted {r.predicted:.4g} s, measured {r.measured:.4g} s), beyond {flag} "
            f"{limit * 100:g}%" for r, limit, flag in broken]


def runtime_note(plan: Plan) -> str | None:
    """What a comparison means when the plan costs another runtime's kernels than moerun's."""
    runtime = plan.provenance.runtime
    if runtime == "moerun":
        return None
    return (f"note: the plan costs --runtime {runtime}'s kernels; moerun runs its own, so its "
            f"measurements meet {runtime}'s predictions (plan with --runtime moerun to compare "
            "like with like)")


def check_pair(plan: Plan, run: RunRecord) -> None:
    """Refuse a run that was not measured for this plan."""
    if run.plan_digest != digest(plan):
        raise ConfigError(f"the run was measured for another plan (run {run.plan_digest[:19]}…, "
                          f"plan {digest(plan)[:19]}…)")
    if run.world != plan.cluster.gpus:
        raise ConfigError(f"the run used {run.world} ranks, the plan {plan.cluster.gpus}")
    if run.mode != plan.workload.mode:
        raise ConfigError(f"the run measured {run.mode}, the plan is for {plan.workload.mode}")
    if [(l.index, l.kind) for l in run.layers] != [(l.index, l.kind) for l in plan.layers]:
        raise ConfigError("the run's layers are not the plan's (missing, extra, reordered or of "
                          "another kind)")
    headline = run.measured.step_time_s if run.mode == "train" else run.measured.latency_s
    if headline is None or not math.isfinite(headline) or headline <= 0:
        raise ConfigError(f"the run's {'step time' if run.mode == 'train' else 'latency'} is "
                          f"{headline}, not a positive number")
