"""What the probe's steps inside `moerun`'s loop take beyond the cost model's prediction for the
same plans: the in-step compute factors, the share of their peers' turns ranks on shared cores
wait at the all-to-alls, the all-to-all and gradient-sync extras, the untimed time per layer."""

from __future__ import annotations

from moeplan.calibrate.shapes import in_situ_plans
from moeplan.spec.cluster import (
    ClusterProfile,
)
from moeplan.spec.phases import EXCHANGE, WAITING, Phase


def _micro_steps(plan) -> int:
    w = plan.workload
    return w.global_batch // (plan.parallel.dp * w.micro_batch)


def exchanges_per_pass(plan) -> int:
    """All-to-all calls of one training step (forward and backward: 4 per exchanging layer and
    micro-batch) or of one decode token (2 per exchanging layer)."""
    layers = sum(1 for l in plan.layers if l.kind == "moe" and (l.ep or 1) * (l.es or 1) > 1)
    if plan.workload.mode == "train":
        return 4 * layers * _micro_steps(plan)
    return 2 * layers


def untimed_passes(plan) -> int:
    """The layer passes a training step (decode token) of `plan` runs outside its timed phases:
    layers × micro-steps (layers)."""
    return len(plan.layers) * (_micro_steps(plan) if plan.workload.mode == "train" else 1)


# Bounds of the in-step compute factor (the upper one per turn ranks take on shared cores): a
# sample outside them is a broken measurement (a rank descheduled for the whole sample), not the
# host's in-step cost.
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


def takes_turns(profile: ClusterProfile, world: int) -> bool:
    """Whether `world` ranks on the profiled host take turns on its cores (`layer.sharing`)."""
    fw = profile.device.framework
    return bool(fw is not None and fw.cores and world > fw.cores)


def with_framework(profile: ClusterProfile, **update) -> ClusterProfile:
    """`profile` with its measured framework's terms `update`d."""
    fw = profile.device.framework.model_copy(update=update)
    return profile.model_copy(update={"device": profile.device.model_copy(
        update={"framework": fw})})


def _without_waits(profile: ClusterProfile) -> ClusterProfile:
    """`profile` with no rank waiting for another (no shared cores, no skew): its plans'
    exchanges are their collectives alone."""
    return with_framework(profile, cores=None, skew=0.0)


def in_situ_factors(measured: dict, profile: ClusterProfile) -> dict[str, float]:
    """The probe's compute inside `moerun`'s own loop (its timed time less its all-to-alls and
    gradient sync) over what `profile` predicts for the same plans, training and decode:
    `in_step` and `decode_in_step`, within `IN_STEP_RANGE` (ranks taking turns on shared cores:
    its upper bound times the turns, as a rank may be descheduled inside its compute for all
    of them)."""
    plans = in_situ_plans(profile, measured["world"])
    lo, hi = IN_STEP_RANGE
    fw = profile.device.framework
    if takes_turns(profile, measured["world"]):  # descheduled inside its compute: up to every turn
        hi *= measured["world"] / fw.cores
    out = {}
    for mode, key in (("train", "in_step"), ("infer", "decode_in_step")):
        got = measured.get(mode)
        predicted = predicted_compute_s(plans[mode])
        if not got or not got.get("timed_s") or predicted <= 0:
            continue
        seen = got["timed_s"] - got["a2a_s"] - got.get("grad_sync_s", 0.0)
        out[key] = min(hi, max(lo, seen / predicted))
    return out


# Bound of the turn share: beyond it a sample is broken (a rank stopped), not the host's waits.
TURN_SHARE_MAX = 2.0


def in_situ_turns(measured: dict, profile: ClusterProfile) -> dict[str, float]:
    """Where the probe's ranks took turns on shared cores, the share of their peers' turns they
    waited at the all-to-alls, training and decode (`turn_share`, `decode_turn_share`): the
    run's all-to-all time beyond the collectives alone over the waits `profile` charges (every
    turn: share 1). A rank descheduled inside its own compute phases (which `in_step` then
    carries) waits that much less at the next collective; how much depends on how the
    scheduler's slices fall on the phases, so it is measured. Call after `in_situ_factors`: the
    waits are charged on the compute it sets."""
    world = measured["world"]
    if not takes_turns(profile, world):
        return {}
    every_turn = with_framework(profile, turn_share=1.0, decode_turn_share=1.0,
                                exchange_extra_s=0.0, decode_exchange_extra_s=0.0)
    charged = in_situ_plans(every_turn, world)
    bare = in_situ_plans(_without_waits(every_turn), world)
    out = {}
    for mode, key in (("train", "turn_share"), ("infer", "decode_turn_share")):
        got = measured.get(mode)
        collectives = predicted_phases_s(bare[mode], EXCHANGE)
        # a layer without an exchange hands its waits on to the next collective
        waits = predicted_phases_s(charged[mode], EXCHANGE + (Phase.WAIT,)) - collectives
        if got and waits > 0:
            out[key] = min(TURN_SHARE_MAX, max(0.0, (got["a2a_s"] - collectives) / waits))
    return out


def in_situ_extras(measured: dict, profile: ClusterProfile) -> dict[str, float]:
    """What the probe's all-to-alls (per call, training and decode) and gradient sync (per step)
    took inside `moerun`'s own loop beyond what `profile` predicts for the same plans — never
    below zero (the model keeps what it charges) — and the step's (token's) time outside every
    timed phase per layer and micro-step (`untimed_passes`)."""
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
            out["untimed_layer_s" if mode == "train" else "decode_untimed_layer_s"] = max(
                0.0, got["step_s"] - got["timed_s"]) / untimed_passes(plans[mode])
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
