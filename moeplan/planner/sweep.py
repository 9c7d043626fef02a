"""Capacity planning: search every (model, cluster, GPU count, mode) point, price each, and answer
"how many GPUs, which cluster, at what cost" — the library behind `moeplan sweep` and `report`.

Each point is one `plan()` call, exactly what `moeplan search` runs for it, so a row of a sweep
and a single search agree. Points run in worker processes. Money: GPU-hours times the cluster's
price per GPU-hour (`ClusterProfile.pricing` or the user's); energy: GPU-hours times the boards'
maximum power, an upper bound.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from math import ceil
from pathlib import Path
from typing import Annotated, Callable, Iterable

from pydantic import Field, TypeAdapter, ValidationError

from moeplan.planner.planning import Request, Runtime, check_gpus, plan
from moeplan.planner.space import NO_FIX, Fix
from moeplan.spec.cluster import ClusterProfile, Dtype
from moeplan.spec.errors import ConfigError, MoeplanError, SpecError, one_line
from moeplan.spec.files import read_document
from moeplan.spec.model import ModelSpec
from moeplan.spec.plan import Plan
from moeplan.spec.sweep import COLUMNS, SweepAnswer, SweepFile
from moeplan.spec.sweep import SweepRow as Row
from moeplan.spec.workload import MAX_COUNT, MAX_PRICE, MAX_SIMULATE_TOP, MAX_TRAIN_TOKENS

PAPER_TRAIN_TOKENS = 300e9  # DeepSpeed-MoE's models saw 300B tokens (Rajbhandari et al. §4.1)
MAX_POINTS = 10_000
MODES = ("train", "infer")


def gpu_counts(text: str, cluster: ClusterProfile) -> list[int]:
    """`A-B`: powers of two from A to B that the cluster can give (whole nodes; below a node
    the powers of two that divide it); `A,B,C`: exactly those counts, each one it can give."""
    text = text.strip()
    if not text:
        raise ConfigError("--gpus: empty")
    G = cluster.gpus_per_node
    if "-" in text and "," not in text:
        lo_s, _, hi_s = text.partition("-")
        lo, hi = _count(lo_s), _count(hi_s)
        if lo > hi:
            raise ConfigError(f"--gpus {text}: the range runs backwards")
        counts = [1 << k for k in range(hi.bit_length())
                  if lo <= 1 << k <= hi and ((1 << k) % G == 0 or G % (1 << k) == 0)]
        if not counts:
            raise ConfigError(f"--gpus {text}: no power of two in the range fits {G}-GPU nodes")
    else:
        counts = sorted({_count(part) for part in text.split(",")})
    for n in counts:
        check_gpus(n, cluster)
    return counts


def _count(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 7 or int(text) < 1:
        raise ConfigError(f"--gpus: {text!r} is not a GPU count (1 to 9999999)")
    return int(text)


Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]  # sequences or tokens


@dataclass(frozen=True)
class Options:
    """What every point shares (None: the search's defaults); read back from a sweep file
    within the bounds the command line sets."""

    global_batch: Count | None = None  # training
    micro_batch: Count | None = None
    seq_len: Count | None = None
    per_gpu_batch: Count = 8  # inference: sequences in flight per GPU (the paper's Fig. 10: ~8)
    prompt_len: Count | None = None
    gen_len: Count | None = None
    dtype: Dtype | None = None
    zero_stage: Annotated[int, Field(ge=0, le=2)] = 1
    fix: Fix = NO_FIX
    runtime: Runtime = "moerun"
    simulate_top: Annotated[int, Field(ge=0, le=MAX_SIMULATE_TOP)] = 16
    price_per_gpu_hour: Annotated[float, Field(gt=0, le=MAX_PRICE)] | None = None  # all clusters'
    train_tokens: Annotated[float, Field(ge=1, le=MAX_TRAIN_TOKENS)] = PAPER_TRAIN_TOKENS


@dataclass(frozen=True)
class Point:
    model: str
    cluster: str
    gpus: int
    mode: str
    per_gpu_batch: int | None = None  # inference


def degrees(p: Plan) -> str:
    """The plan's degrees in short form: `tp=2; ep=64 es=1 edp=1 hierarchical x12`."""
    parts = [f"tp={p.parallel.tp}"]
    if p.parallel.activation_checkpointing:
        parts[0] += " ckpt"
    groups: dict[str, int] = {}
    for layer in p.layers:
        if layer.kind == "moe":
            key = (f"ep={layer.ep} es={layer.es} edp={layer.edp} {layer.a2a}"
                   + ("+tp" if layer.a2a_tp_coordinated else ""))
            groups[key] = groups.get(key, 0) + 1
    parts += [f"{k} x{n}" for k, n in groups.items()]
    return "; ".join(parts)


def price_of(cluster: ClusterProfile, options: Options) -> float | None:
    if options.price_per_gpu_hour is not None:
        return options.price_per_gpu_hour
    return cluster.pricing.usd_per_gpu_hour if cluster.pricing else None


def request(point: Point, options: Options) -> Request:
    o = options
    if point.mode == "train":
        return Request(gpus=point.gpus, mode="train", global_batch=o.global_batch,
                       micro_batch=o.micro_batch, seq_len=o.seq_len, dtype=o.dtype,
                       zero_stage=o.zero_stage, simulate_top=o.simulate_top, fix=o.fix,
                       runtime=o.runtime)
    fix = replace(o.fix, micro_batch=None, recompute=None)
    return Request(gpus=point.gpus, mode="infer", objective="latency",
                   global_batch=point.gpus * (point.per_gpu_batch or o.per_gpu_batch),
                   prompt_len=o.prompt_len, gen_len=o.gen_len, dtype=o.dtype,
                   simulate_top=o.simulate_top, fix=fix, runtime=o.runtime)


def cost_point(spec: ModelSpec, cluster: ClusterProfile, point: Point, options: Options) -> Row:
    """Search one point and price it; an infeasible point is a row that says why."""
    G = cluster.gpus_per_node
    row = Row(model=spec.name, cluster=cluster.name, gpus=point.gpus, nodes=ceil(point.gpus / G),
              mode=point.mode, per_gpu_batch=point.per_gpu_batch, feasible=False)
    try:
        p, _ = plan(spec, cluster, request(point, options))
    except MoeplanError as e:
        row.limit = one_line(str(e))
        return row
    pr = p.predicted
    row.feasible = True
    row.global_batch = p.workload.global_batch
    row.step_time_s, row.latency_s = pr.step_time_s, pr.latency_s
    row.tokens_per_s = pr.tokens_per_s
    row.tokens_per_s_per_gpu = pr.tokens_per_s / point.gpus
    row.memory_per_gpu_bytes = pr.memory_per_gpu_bytes
    row.degrees = degrees(p)
    row.plan = p
    price = price_of(cluster, options)
    power = cluster.device.board_power_w
    row.gpu_hours_per_m_tokens = point.gpus * 1e6 / (pr.tokens_per_s * 3600)
    if price is not None:
        row.usd_per_gpu_hour = price
        row.usd_per_hour = price * point.gpus
        row.usd_per_m_tokens = row.gpu_hours_per_m_tokens * price
    if point.mode == "train":
        hours = options.train_tokens / pr.tokens_per_s / 3600
        row.run_tokens = options.train_tokens
        row.run_days = hours / 24
        row.run_gpu_hours = hours * point.gpus
        if price is not None:
            row.run_usd = row.run_gpu_hours * price
        if power is not None:
            row.run_energy_kwh_max = row.run_gpu_hours * power / 1e3
    return row


# ------------------------------------------------------------------------------ the sweep
_WORKER: dict = {}


def _init(specs: dict[str, ModelSpec], clusters: dict[str, ClusterProfile],
          options: Options) -> None:
    _WORKER.update(specs=specs, clusters=clusters, options=options)


def _run(point: Point) -> Row:
    w = _WORKER
    return cost_point(w["specs"][point.model], w["clusters"][point.cluster], point, w["options"])


def points_for(specs: Iterable[str], clusters: dict[str, ClusterProfile], gpus: str,
               modes: Iterable[str], per_gpu_batches: Iterable[int]) -> list[Point]:
    out = []
    for name, cluster in clusters.items():
        counts = gpu_counts(gpus, cluster)
        for model in specs:
            for mode in modes:
                for n in counts:
                    if mode == "train":
                        out.append(Point(model, name, n, mode))
                    else:
                        out += [Point(model, name, n, mode, b) for b in per_gpu_batches]
    if len(out) > MAX_POINTS:
        raise ConfigError(f"{len(out)} points: more than {MAX_POINTS}; narrow the sweep")
    return out


def sweep(specs: dict[str, ModelSpec], clusters: dict[str, ClusterProfile], points: list[Point],
          options: Options, jobs: int | None = None,
          progress: Callable[[Row], None] | None = None) -> list[Row]:
    """Every point, in worker processes (`jobs`, default one per CPU); rows in the points' order."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(points)))
    if jobs == 1:
        _init(specs, clusters, options)
        rows = []
        for pt in points:
            rows.append(_run(pt))
            if progress:
                progress(rows[-1])
        return rows
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init,
                             initargs=(specs, clusters, options)) as pool:
        rows = []
        for row in pool.map(_run, points, chunksize=1):
            rows.append(row)
            if progress:
                progress(row)
    return rows


# ------------------------------------------------------------------------------ sizing
@dataclass(frozen=True)
class Target:
    """What the user needs: any of tokens/s, per-token latency, a training run in so many days."""

    tokens_per_s: float | None = None
    slo_s: float | None = None  # inference
    train_tokens: float | None = None
    days: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.tokens_per_s, self.slo_s, self.days))

    def needed_tokens_per_s(self, mode: str) -> float | None:
        needs = [self.tokens_per_s] if self.tokens_per_s is not None else []
        if mode == "train" and self.days is not None:
            needs.append((self.train_tokens or PAPER_TRAIN_TOKENS) / (self.days * 86400))
        return max(needs) if needs else None

    def misses(self, row: Row) -> list[str]:
        """What the row falls short of (empty: it meets the target)."""
        if not row.feasible:
            return [row.limit]
        out = []
        need = self.needed_tokens_per_s(row.mode)
        if need is not None and row.tokens_per_s < need:
            out.append(f"{row.tokens_per_s:,.0f} tokens/s of {need:,.0f} needed")
        if self.slo_s is not None and row.mode == "infer" and row.latency_s > self.slo_s:
            out.append(f"{row.latency_s * 1e3:.2f} ms per token over the {self.slo_s * 1e3:g} ms "
                       "SLO")
        return out


@dataclass
class Answer:
    model: str
    mode: str
    row: Row | None  # the smallest (then cheapest) point that meets the target
    closest: Row | None  # when none does: the point nearest to it
    why: str  # the answer, or what limits the closest point, in one line


def _cost_key(row: Row) -> tuple:
    money = row.usd_per_hour if row.usd_per_hour is not None else float("inf")
    return (row.gpus, money, row.cluster)


def _shortfall(row: Row, target: Target) -> float:
    """How far a feasible row is from the target: the largest factor it misses by."""
    need = target.needed_tokens_per_s(row.mode)
    worst = 1.0
    if need is not None:
        worst = max(worst, need / row.tokens_per_s)
    if target.slo_s is not None and row.mode == "infer":
        worst = max(worst, row.latency_s / target.slo_s)
    return worst


def size(rows: list[Row], target: Target) -> list[Answer]:
    """Per model and mode: the fewest GPUs that meet the target (over several clusters: each
    cluster's fewest, then the cheapest per hour of those); when none does, the closest point
    and what limits it."""
    answers = []
    keys = list(dict.fromkeys((r.model, r.mode) for r in rows))
    for model, mode in keys:
        mine = [r for r in rows if (r.model, r.mode) == (model, mode)]
        ok = [r for r in mine if not target.misses(r)]
        if ok:
            smallest = {}  # per cluster, its fewest GPUs; then the cheapest cluster
            for r in sorted(ok, key=_cost_key):
                smallest.setdefault(r.cluster, r)
            best = min(smallest.values(), key=lambda r: (
                r.usd_per_hour if r.usd_per_hour is not None else float("inf"), r.gpus,
                r.cluster))
            answers.append(Answer(model, mode, best, None, _said(best)))
            continue
        feasible = [r for r in mine if r.feasible]
        if not feasible:
            last = max(mine, key=lambda r: r.gpus)
            answers.append(Answer(model, mode, None, last,
                                  f"no point runs; at {last.gpus} GPUs of {last.cluster}: "
                                  f"{last.limit}"))
            continue
        closest = min(feasible, key=lambda r: (_shortfall(r, target), _cost_key(r)))
        answers.append(Answer(model, mode, None, closest,
                              f"no point meets the target; closest {closest.gpus} GPUs of "
                              f"{closest.cluster}: " + "; ".join(target.misses(closest))))
    return answers


def _said(row: Row) -> str:
    what = (f"{row.tokens_per_s:,.0f} tokens/s" if row.mode == "train" else
            f"{row.latency_s * 1e3:.2f} ms per token, {row.tokens_per_s:,.0f} tokens/s")
    money = f", ${row.usd_per_hour:,.2f}/hour" if row.usd_per_hour is not None else ""
    return f"{row.gpus} GPUs of {row.cluster} ({row.degrees}): {what}{money}"


RECOMMEND_LATENCY_SLACK = 1.10  # inference: the fewest GPUs within 10% of the lowest latency


def recommend(rows: list[Row], target: Target | None = None) -> list[Row]:
    """One point per model and mode: the sizing answer where a target is given; otherwise for
    training the lowest cost per token (price, else GPU-hours; then fewer GPUs), for inference the
    fewest GPUs within 10% of the model's lowest per-token latency."""
    if target:
        return [a.row for a in size(rows, target) if a.row is not None]
    out = []
    for model, mode in dict.fromkeys((r.model, r.mode) for r in rows):
        ok = [r for r in rows if (r.model, r.mode) == (model, mode) and r.feasible]
        if not ok:
            continue
        if mode == "train":
            out.append(min(ok, key=lambda r: (
                r.usd_per_m_tokens if r.usd_per_m_tokens is not None else 0.0,
                -r.tokens_per_s_per_gpu, r.gpus)))
        else:
            fastest = min(r.latency_s for r in ok)
            out.append(min((r for r in ok if r.latency_s <= fastest * RECOMMEND_LATENCY_SLACK),
                           key=lambda r: (r.gpus, r.usd_per_hour or 0.0, r.latency_s)))
    return out


# ------------------------------------------------------------------------------ the file
def options_dict(options: Options) -> dict:
    return asdict(options)


def options_from(data: dict) -> Options:
    """Options back from a sweep file; a value of the wrong kind is one line."""
    try:
        return TypeAdapter(Options).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"sweep options: {where}: {first['msg']}") from None


def document(specs: dict[str, ModelSpec], clusters: dict[str, ClusterProfile],
             options: Options, target: Target, rows: list[Row]) -> SweepFile:
    """The sweep file: every row, the sizing answers, and the plans of the answers and
    recommended points only (the other rows' plans are one `moeplan search` away)."""
    answers = size(rows, target) if target else []
    keep = {id(r) for r in recommend(rows, target)}
    keep |= {id(a.row or a.closest) for a in answers if (a.row or a.closest) is not None}
    index = {id(r): i for i, r in enumerate(rows)}
    out_rows = [r if id(r) in keep else r.model_copy(update={"plan": None}) for r in rows]
    return SweepFile(
        options=options_dict(options), target=asdict(target), models=specs, clusters=clusters,
        rows=out_rows,
        answers=[SweepAnswer(model=a.model, mode=a.mode, met=a.row is not None,
                             point=index.get(id(a.row or a.closest)), text=a.why)
                 for a in answers])


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.table().items()})
    return buf.getvalue()


def load_document(path: Path) -> SweepFile:
    """A sweep file written by `moeplan sweep --out X.json`; anything else is one line."""
    data = read_document(path, "sweep file")
    try:
        doc = SweepFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])[:120]
        raise SpecError(f"{path} is not a sweep file: {where}: {first['msg']}") from None
    for r in doc.rows:
        if r.model not in doc.models or r.cluster not in doc.clusters:
            raise SpecError(f"{path}: a row names model {r.model!r} / cluster {r.cluster!r}, "
                            "which the file does not hold")
    for a in doc.answers:
        if a.point is not None and not 0 <= a.point < len(doc.rows):
            raise SpecError(f"{path}: an answer points at row {a.point}, outside the rows")
        if a.met and (a.point is None or not doc.rows[a.point].feasible):
            raise SpecError(f"{path}: a met answer points at no feasible row")
    # as the sweep wrote them: keys it does not know (a document to dump again) are dropped
    return doc.model_copy(update={"options": options_dict(options_from(doc.options))})
