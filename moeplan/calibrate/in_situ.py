"""What the probe's steps inside `moerun`'s loop take beyond the cost model's prediction for the
same plans: the in-step compute factors, the all-to-all and gradient-sync extras, the untimed
share."""

from __future__ import annotations

from moeplan.calibrate.shapes import in_situ_plans
from moeplan.spec.cluster import (
    ClusterProfile,
)
from moeplan.spec.phases import EXCHANGE, WAITING, Phase


def exchanges_per_pass(plan) -> int:
    """All-to-all calls of one training step (forward and backward: 4 per exchanging layer and
    micro-batch) or of one decode token (2 per exchanging layer)."""
    layers = sum(1 for l in plan.layers if l.kind == "moe" and (l.ep or 1) * (l.es or 1) > 1)
    w = plan.workload
    if w.mode == "train":
        return 4 * layers * (w.global_batch // (plan.parallel.dp * w.micro_batch))
    return 2 * layers


# Bounds of the in-step compute factor: a sample outside them is a broken measurement (a rank
# descheduled for the whole sample), not the host's in-step cost.
IN_STEP_RANGE = (0.5, 2.0)
WAITING_PHASES = WAITING


def _predicted_tables(plan) -> list[dict[str, float]]:
    return [plan.predicted.head_phases_s] + [l.predicted.phases_s for l in plan.layers]


def predicted_phases_s(plan, names: tuple[str, ...]) -> float:
    """A plan's predicted seconds of the phases `names`, head and every layer."""
    return sum(v for table in _predicted_tables(plan) for k, v in table.items() if k in names)


def predicted_compute_s(plan) -> float:
    """A plan's predicted step (token) time less its all-to-alls, gradient sync, untimed share
    and waits: what the runtime times as compute (head and optimizer included)."""
    return sum(v for table in _predicted_tables(plan) for k, v in table.items()
               if k not in WAITING_PHASES)


def in_situ_factors(measured: dict, profile: ClusterProfile) -> dict[str, float]:
    """The probe's compute inside `moerun`'s own loop (its timed time less its all-to-alls and
    gradient sync) over what `profile` predicts for the same plans, training and decode:
    `in_step` and `decode_in_step`, within `IN_STEP_RANGE`."""
    plans = in_situ_plans(profile, measured["world"])
    lo, hi = IN_STEP_RANGE
    out = {}
    for mode, key in (("train", "in_step"), ("infer", "decode_in_step")):
        got = measured.get(mode)
        predicted = predicted_compute_s(plans[mode])
        if not got or not got.get("timed_s") or predicted <= 0:
            continue
        seen = got["timed_s"] - got["a2a_s"] - got.get("grad_sync_s", 0.0)
        out[key] = min(hi, max(lo, seen / predicted))
    return out


def in_situ_extras(measured: dict, profile: ClusterProfile) -> dict[str, float]:
    """What the probe's all-to-alls (per call, training and decode) and gradient sync (per step)
    took inside `moerun`'s own loop beyond what `profile` predicts for the same plans — never
    below zero (the model keeps what it charges) — and the step's (token's) time outside every
    timed phase as a fraction of the timed time."""
    plans = in_situ_plans(profile, measured["world"])
    out = {}
    for mode, key in (("train", "exchange_extra_s"), ("infer", "decode_exchange_extra_s")):
        got = measured.get(mode)
        calls = exchanges_per_pass(plans[mode])
        if not got or not calls:
            continue
        predicted = predicted_phases_s(plans[mode], EXCHANGE)
        out[key] = max(0.0, (got["a2a_s"] - predicted) / calls)
        if got.get("timed_s"):
            out["untimed_fraction" if mode == "train" else "decode_untimed_fraction"] = max(
                0.0, got["step_s"] / got["timed_s"] - 1.0)
        if mode == "train":
            sync = predicted_phases_s(plans[mode], (Phase.GRAD_SYNC,))
            out["grad_sync_extra_s"] = max(0.0, got["grad_sync_s"] - sync)
    return out


def median_sample(samples: list[dict]) -> dict:
    """The median sample by step (token) time (the lower of the middle two), all its figures
    together, so its all-to-all, gradient-sync and untimed figures belong to one moment. The
    median because a run of a plan meets the host in whatever state it is in."""
    ordered = sorted(samples, key=lambda s: s["step_s"])
    return dict(ordered[(len(ordered) - 1) // 2])


def in_situ_medians(measured: dict) -> dict:
    """The in-step probe's measurements with each mode's figures taken from its samples by
    `median_sample` (measurements without samples as they are)."""
    samples = measured.get("samples")
    if not samples:
        return measured
    return {**measured, **{mode: median_sample([s[mode] for s in samples])
                           for mode in samples[0]}}
