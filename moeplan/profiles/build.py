"""Turn microbenchmark measurements into a `ClusterProfile` (pure: scipy fits, no torch).

The measured profile starts from a base profile (for what is not measured: node memory reserve,
host tier, NIC count) and replaces, each with `source` naming the measurement and its r²:
  device.peak_flops[dtype], gemm_efficiency   from the GEMM sweep (e_max = 1 at the fitted peak)
  device.hbm_Bps, op_overhead_s               from the copy sweep and the small-op benchmark
  intra / inter link latency and bandwidth    from the all-to-all fits of each tier
  fitted[]                                    every (collective, tier) fit, used by the cost model
A tier that could not be measured (one node: no inter-node groups) keeps the base's constants and
says so in its source.
"""

from __future__ import annotations

from moeplan.profiles import fit
from moeplan.profiles.cluster import ClusterProfile, EfficiencyCurve, FittedCollective, LinkTier
from moeplan.profiles.zoo import load_cluster


def _group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def fit_collectives(rows: list[dict], where: str) -> list[FittedCollective]:
    """alpha-beta per (collective, tier) in the cost model's own form: a ring or exchange over p
    ranks takes m·(p-1) latency steps and moves m·bytes·(p-1)/p per rank (m = 2 for allreduce)."""
    fits = []
    for (name, tier), rs in sorted(_group(rows, "collective", "tier").items()):
        p = rs[0]["group_size"]
        m = 2.0 if name == "allreduce" else 1.0
        lat, bw, r2 = fit.fit_alpha_beta([m * (p - 1)] * len(rs),
                                         [m * r["bytes"] * (p - 1) / p for r in rs],
                                         [r["time_s"] for r in rs])
        fits.append(FittedCollective(collective=name, tier=tier, latency_s=lat, bandwidth_Bps=bw,
                                     r2=round(r2, 4),
                                     source=f"moeplan profile {where}: {len(rs)} sizes, "
                                            f"groups of {p}, r2={r2:.3f}"))
    return fits


def build_profile(base: str, name: str, gpus_per_node: int, info: dict,
                  m: dict) -> ClusterProfile:
    base_p = load_cluster(base)
    where = f"on {info['host']} ({info['ranks']} ranks, {info['backend']}, {info['date']})"
    peak, half, r2_g = fit.fit_gemm([r["flops"] for r in m["gemm"]],
                                    [r["time_s"] for r in m["gemm"]])
    bw, _, r2_m = fit.fit_memory([r["bytes"] for r in m["copy"]], [r["time_s"] for r in m["copy"]])
    dtype = info["dtype"]
    dev = base_p.device.model_copy(update={
        "name": info["device"], "kind": "gpu" if info["backend"] == "nccl" else "cpu",
        "peak_flops": {**base_p.device.peak_flops, dtype: peak},
        "gemm_efficiency": EfficiencyCurve(
            max_efficiency=1.0, half_flops=half,
            source=f"fitted {where}: {len(m['gemm'])} GEMMs, r2={r2_g:.3f}"),
        "hbm_Bps": bw, "hbm_efficiency": 1.0, "op_overhead_s": m["op_overhead_s"],
        "memory_bytes": info.get("memory_bytes", base_p.device.memory_bytes),
        "source": f"measured {where}; peak = fitted GEMM throughput (r2={r2_g:.3f}), "
                  f"memory bandwidth from copies (r2={r2_m:.3f}), op overhead from a small "
                  "autograd op"})
    fits = fit_collectives(m["collectives"], where)
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
    return ClusterProfile.model_validate({**base_p.model_dump(), **{
        "name": name, "description": f"measured by moeplan profile {where}",
        "source": f"moeplan profile {where}; base profile {base} for what is not measured",
        "gpus_per_node": gpus_per_node,
        "default_dtype": dtype, "max_nodes": None, "topology": info.get("topology"),
        "intra": tiers["intra"].model_dump(), "inter": tiers["inter"].model_dump(),
        "device": dev.model_dump(), "fitted": [f.model_dump() for f in fits]}})
