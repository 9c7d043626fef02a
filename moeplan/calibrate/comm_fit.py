"""Fits of the collective benchmarks: alpha-beta per (collective, tier), and the factors on the
flat and hierarchical all-to-all models measured over the whole world."""

from __future__ import annotations

from moeplan.calibrate import fit
from moeplan.cost_models import collectives as coll
from moeplan.spec.cluster import (
    ClusterProfile,
    ExchangeScale,
    FittedCollective,
)


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


# A saving of resting counts towards the credit where it is at least this share of the
# back-to-back time: the emulated cluster's bucket saved 34–72% at 128–256 KB, while the 4–8 MB
# exchanges scattered by 8–26% either way (docs/accuracy.md, "Prediction accuracy").
CLEAR_SAVING = 0.3


def fit_exchanges(rows: list[dict], cluster: ClusterProfile, where: str) -> list[ExchangeScale]:
    """Per all-to-all algorithm: measured ≈ a · latency part + b · transfer part of its model on
    the fitted tiers (non-negative least squares), back to back and, where timed, rested. A
    factor the sizes cannot resolve (fitted as 0, e.g. latency-bound at every size) stays 1,
    the tier model's own. The credit is the most that resting saved at a size where it saved
    clearly (`CLEAR_SAVING`): a bucket's depth shows once a message outgrows it, while at the
    largest sizes the host's scatter is larger than any bucket. The bucket is the link's, not
    the algorithm's, so both algorithms get one credit: the smaller of their estimates (a
    scattered size can only inflate a maximum) where both saved clearly, else the one that did."""

    parts_of = {"flat": coll.all_to_all_flat_parts,
                "hierarchical": coll.all_to_all_hierarchical_parts}

    def factors(rs: list[dict], span) -> tuple[float, float, float]:
        parts = [parts_of[rs[0]["algorithm"]](r["bytes"], span, cluster) for r in rs]
        f = fit.fit_nonneg([[lat for lat, _ in parts], [tr for _, tr in parts]],
                           [r["time_s"] for r in rs])
        k_lat, k_bytes = (k if k > 0 else 1.0 for k in f.coef)
        return k_lat, k_bytes, f.r2

    out = []
    for (algorithm,), rs in sorted(_group(rows, "algorithm").items()):
        p, g = rs[0]["group_size"], rs[0]["per_node"]
        span = coll.GroupSpan(size=p, per_node=g, nodes=p // g)
        busy = [r for r in rs if not r.get("rested")]
        rested = {r["bytes"]: r["time_s"] for r in rs if r.get("rested")}
        k_lat, k_bytes, r2 = factors(busy, span)
        more: dict = {}
        if rested:
            r_lat, r_bytes, r2_r = factors([r for r in rs if r.get("rested")], span)
            saved = [r["time_s"] - rested[r["bytes"]] for r in busy
                     if r["bytes"] in rested and r["time_s"] - rested[r["bytes"]]
                     >= CLEAR_SAVING * r["time_s"]]
            more = {"rested_latency_scale": r_lat, "rested_transfer_scale": r_bytes,
                    "credit_s": max(saved, default=0.0)}
        out.append(ExchangeScale(
            algorithm=algorithm, group_size=p, per_node=g, latency_scale=k_lat,
            transfer_scale=k_bytes, r2=round(r2, 4), **more,
            source=f"moeplan profile {where}: {len(busy)} sizes over {p} ranks on {p // g} "
                   f"nodes, r2={r2:.3f}" + (
                       f"; timed after every rank idled, r2={r2_r:.3f}, up to "
                       f"{more['credit_s'] * 1e3:.2f} ms saved" if rested else "")))
    link = min((e.credit_s for e in out if e.credit_s > 0), default=0.0)
    return [e.model_copy(update={"credit_s": link}) for e in out]
