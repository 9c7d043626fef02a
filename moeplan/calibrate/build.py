"""Turn microbenchmark measurements into a `ClusterProfile` (pure: scipy fits, no torch).

The measured profile starts from a base profile (for what is not measured: node memory reserve,
host tier, NIC count) and replaces, each with `source` naming the measurement and its r²:
  device.peak_flops[dtype], gemm_efficiency   from the GEMM sweep (e_max = 1 at the fitted peak)
  device.hbm_Bps, op_overhead_s               from the copy sweep and the small-op benchmark
  device.framework                            from the runtime's own model (the probe): fixed
                                              seconds and work scales per layer phase, optimizer
                                              per tensor / parameter, contention, skew
  intra / inter link latency and bandwidth    from the all-to-all fits of each tier
  fitted[]                                    every (collective, tier) fit, used by the cost model
  exchanges[]                                 flat and hierarchical all-to-all over the world
                                              (nodes > 1, several ranks each): factors on the
                                              latency and transfer parts of their models
A tier that could not be measured (one node: no inter-node groups) keeps the base's constants and
says so in its source.
"""

from __future__ import annotations

from moeplan.calibrate import fit
from moeplan.calibrate.comm_fit import fit_collectives, fit_exchanges
from moeplan.calibrate.framework import framework_overhead, roofline
from moeplan.calibrate.in_situ import (
    in_situ_extras,
    in_situ_factors,
    in_situ_medians,
    in_situ_turns,
    with_framework,
)
from moeplan.calibrate.shapes import WORK_SIZES
from moeplan.spec.cluster import (
    ClusterProfile,
    EfficiencyCurve,
    LinkTier,
    Spread,
)
from moeplan.spec.zoo import load_cluster

# The cost model's own error on CPU ranks: p10 and p90 of measured over predicted step time
# (token latency) over the 12 fixed plans of bench/results/accuracy-cpu.json (bench_accuracy,
# 2-vCPU host, 2026-12-01; median run of five). The random grid (bench_random_grid) is
# independent of those plans and checks the band's coverage.
CPU_MODEL_ERROR = Spread(p10=0.925, p90=1.147, source=(
    "the cost model's error on CPU ranks: p10 and p90 of measured over predicted over the 12 "
    "fixed plans of bench/results/accuracy-cpu.json (2026-12-01)"))


def measured_spread(raw: dict, where: str, cpu: bool = False) -> dict[str, Spread]:
    """The profile's spread by group, from the moments' medians over the pooled ones, and on
    CPU ranks the model's own measured error."""
    out = {group: Spread(p10=v["p10_p90"][0], p90=v["p10_p90"][1],
                         source=f"measured {where}: p10 and p90 of each moment's median over "
                                f"the pooled median, {v['figures']} figures")
           for group, v in sorted(raw.items())}
    return {**out, "model": CPU_MODEL_ERROR} if cpu else out


def build_profile(base: str, name: str, gpus_per_node: int, info: dict,
                  raw: dict) -> ClusterProfile:
    """The profile of this host: `base` with every term the raw measurements (`measure.py`'s
    output) cover replaced by its fit, each naming its source."""
    base_p = load_cluster(base)
    where = f"on {info['host']} ({info['ranks']} ranks, {info['backend']}, {info['date']})"
    dtype, bd = info["dtype"], base_p.device
    kept = []  # the fits that failed: their terms stay the base profile's, and say so

    def fitted(what: str, fn, *args):
        try:
            return fn(*args)
        except ValueError as e:
            kept.append(f"{what} not fitted ({e}): {base}'s")
            return None

    g = fitted("GEMM throughput", fit.fit_gemm, [r["flops"] for r in raw["gemm"]],
               [r["time_s"] for r in raw["gemm"]])
    peak, half, r2_g = g or (bd.peak_flops[dtype] * bd.gemm_efficiency.max_efficiency,
                             bd.gemm_efficiency.half_flops, None)
    m = fitted("memory bandwidth", fit.fit_memory, [r["bytes"] for r in raw["copy"]],
               [r["time_s"] for r in raw["copy"]])
    bw, r2_m = (m[0], m[2]) if m else (bd.hbm_Bps * bd.hbm_efficiency, None)
    score_s, r2_s = 0.0, None  # raw measurements taken before the score sweep: none charged
    if raw.get("scores"):
        sc = fitted("work per score element", fit.fit_per_item,
                    [r["elements"] for r in raw["scores"]], [r["time_s"] for r in raw["scores"]],
                    "attention")
        score_s, r2_s = (sc[0], sc[2]) if sc else (bd.score_element_s, None)
    gpu = info["backend"] == "nccl"
    peaks = {**bd.peak_flops, dtype: peak}
    if gpu and dtype == "bf16" and g is not None:
        # unmeasured dtypes of a GPU scale with the measured one: fp16 runs on the same tensor
        # cores at the bf16 rate (NVIDIA A100 and H100 datasheets), fp32 as in the base profile
        scale = peak / bd.peak_flops["bf16"]
        peaks = {k: (peak if k == "fp16" else v * scale) for k, v in peaks.items()} | {
            "bf16": peak}

    def r2(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "not fitted"

    dev = bd.model_copy(update={
        "name": info["device"], "kind": "gpu" if gpu else "cpu",
        "peak_flops": peaks,
        "gemm_efficiency": EfficiencyCurve(
            max_efficiency=1.0, half_flops=half,
            source=(f"fitted {where}: {len(raw['gemm'])} GEMMs, r2={r2(r2_g)}" if g else
                    f"{base}'s (the GEMM fit failed {where})")),
        "hbm_Bps": bw, "hbm_efficiency": 1.0, "op_overhead_s": raw["op_overhead_s"],
        "score_element_s": score_s,

        "memory_bytes": info.get("memory_bytes", bd.memory_bytes),
        "source": f"measured {where}; peak = fitted GEMM throughput (r2={r2(r2_g)}), "
                  f"memory bandwidth from copies (r2={r2(r2_m)}), op overhead from a small "
                  "autograd op, "
                  + (f"work per score element from attention at head dim 4 (r2={r2(r2_s)}), "
                     if raw.get("scores") else "")
                  + "framework overhead per phase from the runtime's own model"
                  + ("; on a GPU fp16 at the measured bf16 rate and fp32 scaled by it"
                     if gpu and g is not None else "")
                  + "".join(f"; {k}" for k in kept)})
    if "framework" in raw:
        measured = base_p.model_copy(update={"device": dev})
        roof = {**{size: roofline(measured, dtype, size) for size in WORK_SIZES},
                **{f"decode:{size}": roofline(measured, dtype, size, decode=True)
                   for size in WORK_SIZES}}
        fw = framework_overhead(raw["framework"], roof, gpus_per_node, where, dev.kind)
        dev = dev.model_copy(update={"framework": fw})
    fits = fit_collectives(raw["collectives"], where)
    tiers = {}
    for tier in ("intra", "inter"):
        a2a = next((f for f in fits if f.collective == "all_to_all" and f.tier == tier), None)
        old: LinkTier = getattr(base_p, tier)
        if a2a is None:
            tiers[tier] = old.model_copy(update={
                "source": f"not measured {where} (no {tier}-node groups); from {base}: "
                          + old.source})
        else:
            tiers[tier] = old.model_copy(update={
                "latency_s": a2a.latency_s, "bandwidth_Bps": a2a.bandwidth_Bps,
                "efficiency": 1.0, "source": "all-to-all fit " + a2a.source})
    profile = ClusterProfile.model_validate({**base_p.model_dump(), **{
        "name": name, "description": f"measured by moeplan profile {where}",
        "source": f"moeplan profile {where}; base profile {base} for what is not measured",
        "gpus_per_node": gpus_per_node,
        "default_dtype": dtype, "max_nodes": None, "topology": info.get("topology"),
        "intra": tiers["intra"].model_dump(), "inter": tiers["inter"].model_dump(),
        "device": dev.model_dump(), "fitted": [f.model_dump() for f in fits]}})
    scales = fit_exchanges(raw.get("exchanges", []), profile, where)
    if scales:
        profile = profile.model_copy(update={"exchanges": scales})
    if raw.get("spread"):
        profile = profile.model_copy(update={"spread": measured_spread(
            raw["spread"], where, cpu=info["backend"] == "gloo")})
    fw = profile.device.framework
    if fw is not None and raw.get("in_situ"):
        in_step = in_situ_medians(raw["in_situ"])
        profile = with_framework(profile, source=fw.source + (
            "; compute in a running step, all-to-all and gradient sync beyond the model from "
            "the probe run expert-parallel on every rank by the runtime's own training and "
            "decoding loops"))
        # the compute factor first: the all-to-alls' and gradient sync's waits for their peers'
        # compute are charged on it (the turns' share of them next), and the extras are what is
        # left beyond them
        for update in (in_situ_factors, in_situ_turns, in_situ_extras):
            profile = with_framework(profile, **update(in_step, profile))
    return profile
