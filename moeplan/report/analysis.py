"""What a report says, as numbers: recommended points, the inference Pareto front, the model
comparison against a baseline, sensitivity to the cluster's constants, measured runs and the
assumptions behind every figure. No drawing here (`figures.py`), no files (`build.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from moeplan.planner import sweep as S
from moeplan.spec.cluster import ClusterProfile
from moeplan.spec.errors import ConfigError, SpecError
from moeplan.spec.record import RunRecord
from moeplan.spec.sweep import SweepFile, SweepRow
from moeplan.spec.zoo import parse_file

SENSITIVITY = 0.2  # each constant moved by ±20%
KNOBS = {
    "link bandwidth": "every link tier's bandwidth (and fitted collective bandwidths)",
    "GEMM efficiency": "the GEMM efficiency curve's ceiling (at most 100% of peak)",
    "per-message latency": "every link tier's per-message latency (and fitted latencies)",
    "memory bandwidth": "the GPU's memory (HBM) bandwidth",
    "per-operation overhead": "the fixed cost of launching one operation",
}


def headline_s(row: SweepRow) -> float:
    """Step time (train) or per-token latency (infer)."""
    return row.step_time_s if row.mode == "train" else row.latency_s


def recommended(doc: SweepFile) -> list[SweepRow]:
    """The answers to the sweep's target, else each model and mode's recommended point."""
    if doc.answers:
        return [doc.rows[a.point] for a in doc.answers if a.met and a.point is not None]
    return S.recommend(doc.rows)


def pareto(rows: list[SweepRow]) -> list[SweepRow]:
    """Per model, its inference points no other of its points beats on both latency and
    per-GPU throughput, by increasing latency."""
    front = []
    for model in dict.fromkeys(r.model for r in rows):
        pts = sorted((r for r in rows if r.feasible and r.mode == "infer" and r.model == model),
                     key=lambda r: (r.latency_s, -r.tokens_per_s_per_gpu))
        best = 0.0
        for r in pts:
            if r.tokens_per_s_per_gpu > best:
                front.append(r)
                best = r.tokens_per_s_per_gpu
    return front


@dataclass
class Variant:
    row: SweepRow
    vs_baseline: float | None  # GPU-hours per token over the baseline's (same cluster and mode)


def variants(doc: SweepFile, rows: list[SweepRow], baseline: str | None) -> list[Variant]:
    """Each recommended point's cost per token, and its ratio to the baseline model's."""
    if baseline is not None and baseline not in doc.models:
        raise ConfigError(f"--baseline {baseline} is not one of the swept models "
                          f"({', '.join(doc.models)})")
    base = {(r.mode, r.cluster): r for r in rows if r.model == baseline}
    out = []
    for r in rows:
        b = base.get((r.mode, r.cluster))
        out.append(Variant(r, None if b is None else
                           r.gpu_hours_per_m_tokens / b.gpu_hours_per_m_tokens))
    return out


# ---------------------------------------------------------------------- sensitivity
def perturbed(cluster: ClusterProfile, knob: str, factor: float) -> ClusterProfile | None:
    """The profile with one group of constants scaled by `factor`; None where that leaves a
    constant outside a profile's bounds (a profile at a bound, e.g. 1 B/s)."""
    d = cluster.model_dump()
    links = {"link bandwidth": "bandwidth_Bps", "per-message latency": "latency_s"}
    if knob in links:  # every tier's link and every fitted collective
        for link in [d["intra"], d["inter"], d["host"], *d["fitted"]]:
            link[links[knob]] *= factor
    elif knob == "GEMM efficiency":
        curve = d["device"]["gemm_efficiency"]
        curve["max_efficiency"] = min(1.0, curve["max_efficiency"] * factor)
    elif knob == "memory bandwidth":
        d["device"]["hbm_Bps"] *= factor
    elif knob == "per-operation overhead":
        d["device"]["op_overhead_s"] *= factor
    else:
        raise ValueError(knob)
    try:
        return ClusterProfile.model_validate(d)
    except ValidationError:
        return None


OUT_OF_BOUNDS = "outside the profile's bounds"  # a moved constant no profile may hold


@dataclass
class Sensitivity:
    row: SweepRow
    knob: str
    factor: float
    time_s: float | None  # the re-planned point's step time or latency (None: does not fit)
    change: float | None  # relative to the recommended point's
    degrees: str  # the re-planned point's degrees
    same_plan: bool


def sensitivity(doc: SweepFile, rows: list[SweepRow], jobs: int | None = None
                ) -> list[Sensitivity]:
    """Re-plan each recommended point with each constant group at −20% and +20%: how far its
    time moves and whether the plan (its degrees) changes — which constant the choice rests on."""
    options = S.options_from(doc.options)
    clusters: dict[str, ClusterProfile] = {}
    points, meta = [], []
    out: list[Sensitivity | None] = []  # in row, knob, factor order; None: re-planned below
    for r in rows:
        for knob in KNOBS:
            for factor in (1 - SENSITIVITY, 1 + SENSITIVITY):
                changed = perturbed(doc.clusters[r.cluster], knob, factor)
                if changed is None:
                    out.append(Sensitivity(r, knob, factor, None, None, OUT_OF_BOUNDS, False))
                    continue
                name = f"perturbed-{len(clusters)}"  # a cluster's name may be 200 characters
                clusters[name] = changed
                points.append(S.Point(r.model, name, r.gpus, r.mode, r.per_gpu_batch))
                meta.append((len(out), r, knob, factor))
                out.append(None)
    news = S.sweep(doc.models, clusters, points, options, jobs) if points else []
    for (i, r, knob, factor), new in zip(meta, news):
        t = headline_s(new) if new.feasible else None
        out[i] = Sensitivity(r, knob, factor, t, None if t is None else t / headline_s(r) - 1,
                             new.degrees if new.feasible else new.limit,
                             new.feasible and new.degrees == r.degrees)
    return [s for s in out if s is not None]


# ---------------------------------------------------------------------- measured runs
@dataclass
class Measured:
    path: str
    mode: str
    world: int
    predicted_s: float
    measured_s: float
    error: float


def measured_runs(paths: list[Path]) -> list[Measured]:
    """Each run.json's headline figure, predicted and measured (from its comparison rows)."""
    out = []
    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"--runs {path}: no such file")
        run = parse_file(path, RunRecord)
        head = next((c for c in run.comparison if c.scope in ("step", "token")
                     and c.phase in ("step time", "decode latency")), None)
        if head is None or head.rel_error is None:
            raise SpecError(f"{path}: the run holds no comparison with its plan (run it with "
                            "moerun --plan, which compares)")
        out.append(Measured(str(path), run.mode, run.world, head.predicted, head.measured,
                            head.rel_error))
    return out


# ---------------------------------------------------------------------- assumptions
@dataclass
class Constant:
    cluster: str
    name: str
    value: str
    kind: str  # measured, fitted, datasheet or assumed
    source: str


def _kind(source: str, measured: bool) -> str:
    text = source.lower()
    if measured:
        return "measured"
    if "fitted" in text:
        return "fitted"
    if "assumed" in text:
        return "assumed"
    return "datasheet"


def constants(cluster: ClusterProfile) -> list[Constant]:
    """Every constant of the profile the cost model uses, with where it comes from. A measured
    profile (`moeplan profile`: it records the topology it saw) is measured throughout."""
    measured = cluster.topology is not None or bool(cluster.fitted)
    dev = cluster.device
    out = []

    def add(name: str, value: str, source: str) -> None:
        out.append(Constant(cluster.name, name, value, _kind(source, measured), source))

    for dtype, flops in sorted(dev.peak_flops.items()):
        add(f"peak {dtype}", f"{flops / 1e12:g} TFLOP/s", dev.source)
    add("HBM bandwidth", f"{dev.hbm_Bps / 1e9:g} GB/s x {dev.hbm_efficiency:g}", dev.source)
    add("GEMM efficiency", f"max {dev.gemm_efficiency.max_efficiency:g}, half at "
        f"{dev.gemm_efficiency.half_flops:.3g} FLOP", dev.gemm_efficiency.source)
    add("per-operation overhead", f"{dev.op_overhead_s * 1e6:g} us", dev.source)
    add("memory", f"{dev.memory_bytes / 2**30:g} GiB ({dev.reserved_bytes / 2**30:g} reserved)",
        dev.source)
    for tier in ("intra", "inter", "host"):
        link = getattr(cluster, tier)
        add(f"{tier} link ({link.name})", f"{link.bandwidth_Bps / 1e9:g} GB/s x "
            f"{link.efficiency:g}, {link.latency_s * 1e6:g} us", link.source)
    for f in cluster.fitted:
        add(f"fitted {f.collective} ({f.tier})", f"{f.bandwidth_Bps / 1e9:.3g} GB/s, "
            f"{f.latency_s * 1e6:.3g} us", f.source or "moeplan profile")
    fab = cluster.fabric
    add("fabric", "non-blocking" if fab.nodes_per_leaf is None and not fab.rail_optimized else
        f"{fab.nodes_per_leaf or 'all'} nodes per leaf, {fab.oversubscription:g}:1"
        + (", rail-optimised" if fab.rail_optimized else ""), fab.source or "assumed: default")
    if cluster.pricing:
        p = cluster.pricing
        out.append(Constant(cluster.name, "price", f"${p.usd_per_gpu_hour:g} per GPU-hour "
                            f"(as of {p.as_of})", "list price", p.source))
    if dev.board_power_w:
        out.append(Constant(cluster.name, "board power", f"{dev.board_power_w:g} W (maximum)",
                            "datasheet", dev.source))
    return out


def known_error() -> dict:
    """The cost model's measured error (packaged from the project's benchmark results)."""
    text = resources.files("moeplan.spec").joinpath("data/known_error.json").read_text()
    return json.loads(text)
