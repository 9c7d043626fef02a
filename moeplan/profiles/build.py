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

from moeplan.profiles import fit
from moeplan.profiles.cluster import (
    ClusterProfile,
    EfficiencyCurve,
    ExchangeScale,
    FittedCollective,
    FrameworkOverhead,
    LinkTier,
    PhaseOverhead,
    Spread,
)
from moeplan.profiles.model import ModelSpec
from moeplan.profiles.zoo import load_cluster, load_model


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
    from moeplan.cost_models import collectives as coll

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


PROBE_EXPERTS = (0, 2, 4)  # a dense layer, then MoE layers with 2 and 4 local experts
# (hidden, heads, ffn, batch, sequence): at "fixed" all is framework; at "work" the arithmetic
# shows how far each phase's kernels run from the GEMM/bandwidth roofline
PROBE_SIZES = {"fixed": (8, 2, 16, 1, 8), "work": (64, 4, 256, 4, 64),
               "work2": (128, 4, 512, 4, 64), "work3": (256, 8, 1024, 4, 64)}
WORK_SIZES = ("work", "work2", "work3")


def decode_shape(size: str) -> tuple[int, int]:
    """(prompt tokens, new tokens) the probe decodes at one of `PROBE_SIZES`."""
    S = PROBE_SIZES[size][4]
    return max(4, S // 4), max(8, S // 4)


def probe_spec(size: str) -> ModelSpec:
    """The model `moeplan profile` runs through the runtime to measure framework overhead."""
    h, heads, f, _, S = PROBE_SIZES[size]
    return load_model("tiny-pr-moe").model_copy(update={
        "name": f"probe-{size}", "num_layers": len(PROBE_EXPERTS), "hidden": h, "heads": heads,
        "ffn_hidden": f, "vocab_size": 16 if size == "fixed" else 256,
        "max_seq_len": max(16, S + 1),
        "experts": list(PROBE_EXPERTS)})


def _roofline(cluster: ClusterProfile, dtype: str, size: str, decode: bool = False
              ) -> dict[str, float]:
    """Seconds of each compute phase of a probe under the cost model's roofline alone (no fixed
    part, no scale): per training step (forward + backward), or per decode token (the context
    of `step.decode_pass`). Keys "<layer>:<phase>"."""
    from moeplan.cost_models.layer import COMPUTE_PHASES, DENSE, Env, LayerChoice, Pass, forward
    from moeplan.cost_models.step import decode_pass, head_cost
    from moeplan.cost_models.workload import Setting, Workload

    spec = probe_spec(size)
    _, _, _, B, S = PROBE_SIZES[size]
    bare = cluster.model_copy(update={"device": cluster.device.model_copy(
        update={"framework": None, "op_overhead_s": 0.0})})
    if decode:
        prompt, new = decode_shape(size)
        w = Workload(mode="infer", global_batch=B, micro_batch=B, seq_len=prompt + new,
                     prompt_len=prompt, gen_len=new, dtype=dtype, zero_stage=0)
        passes = 1
    else:
        w = Workload(mode="train", global_batch=B, micro_batch=B, seq_len=S, dtype=dtype,
                     zero_stage=0)
        passes = 3  # forward + backward (twice the forward)
    env = Env(spec=spec, cluster=bare, workload=w, gpus=1)
    s = Setting(tp=1, dp=1, micro_batch=B, recompute=False)
    p = decode_pass(env, s) if decode else Pass(B * S, S, False)
    out = {}
    for i, E in enumerate(spec.experts):
        c = LayerChoice(ep=1, es=1, a2a="flat", coordinated=False) if E else DENSE
        for ph, t in forward(env, s, i, c, p).phases.items():
            if ph in COMPUTE_PHASES:
                out[f"{i}:{ph}"] = passes * t
    out["head:head"] = head_cost(env, s).phases["head"]
    return out


def _ratio(together: dict, solo: dict) -> float:
    """Contention: the tables' total with every rank at once over one rank alone (≥ 1)."""
    a, b = sum(together.values()), sum(solo.values())
    return max(1.0, a / b) if a and b else 1.0


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope, both clamped at zero (a cost is never negative)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx) if sxx else 0.0
    return max(0.0, my - slope * mx), slope


IN_SITU_SIZE = "work"


def in_situ_plans(cluster: ClusterProfile, world: int) -> dict:
    """The plans `moeplan profile` runs the "work" probe with on every rank, as `moerun` would
    (train and infer): each MoE layer expert-parallel over as many ranks as it has experts
    (at most the world), flat all-to-all, no tensor slicing; costed on `cluster`."""
    from moeplan.cost_models.layer import LayerChoice
    from moeplan.planner.planning import Request, fixed_plan

    spec = probe_spec(IN_SITU_SIZE)
    _, _, _, B, S = PROBE_SIZES[IN_SITU_SIZE]
    prompt, new = decode_shape(IN_SITU_SIZE)
    choices = {}
    for i, E in enumerate(spec.experts):
        ep = min(E, world)
        if E and E % ep == 0 and world % ep == 0:
            choices[i] = LayerChoice(ep=ep, es=1, a2a="flat", coordinated=False)
    requests = {"train": Request(gpus=world, mode="train", global_batch=B * world,
                                 micro_batch=B, seq_len=S, zero_stage=0, simulate_top=0),
                "infer": Request(gpus=world, mode="infer", global_batch=B * world,
                                 prompt_len=prompt, gen_len=new, simulate_top=0)}
    return {mode: fixed_plan(spec, cluster, r, 1, choices) for mode, r in requests.items()}


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
WAITING_PHASES = ("dispatch_a2a", "combine_a2a", "grad_sync", "untimed", "wait")


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
        predicted = predicted_phases_s(plans[mode], ("dispatch_a2a", "combine_a2a"))
        out[key] = max(0.0, (got["a2a_s"] - predicted) / calls)
        if got.get("timed_s"):
            out["untimed_fraction" if mode == "train" else "decode_untimed_fraction"] = max(
                0.0, got["step_s"] / got["timed_s"] - 1.0)
        if mode == "train":
            sync = predicted_phases_s(plans[mode], ("grad_sync",))
            out["grad_sync_extra_s"] = max(0.0, got["grad_sync_s"] - sync)
    return out


def median_sample(samples: list[dict]) -> dict:
    """The median sample by step (token) time (the lower of the middle two), all its figures
    together, so its all-to-all, gradient-sync and untimed figures belong to one moment. The
    median, like every calibration pooled over the profile's moments: a run of a plan meets the
    host in whatever state it is in, and the accuracy benchmark compares with the median of its
    runs; the lower quartile (kept before) described a faster host than the runs met, and every
    plan's prediction came out low with it (docs/accuracy.md, "Prediction accuracy")."""
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


DECODE_TABLES = {"fixed": "infer_fixed", "work": "infer", "work2": "infer_work2",
                 "work3": "infer_work3"}


def framework_overhead(fw: dict, roofline: dict[str, dict[str, float]], ranks: int,
                       where: str) -> FrameworkOverhead:
    """Per-phase fixed seconds from the probe's phase tables (keys "f|b:<layer>:<phase>"), and
    per compute phase and "work" size the work scale: (measured − fixed) over `roofline[size]`
    (training) or over `roofline["decode:" + size]` (one decode token).

    Dense phases come from the dense probe layer, MoE phases are the mean over the MoE probe
    layers, except `experts`, fitted as a + b·(local experts) over them."""
    train = fw["train"]
    tokens = fw["decode_tokens"]
    if not isinstance(tokens, dict):  # a profile measured before decoding at every size
        tokens = {"work": tokens}
    decode = {size: ({k: v / max(1, tokens[size]) for k, v in fw[table].items()})
              for size, table in DECODE_TABLES.items() if table in fw and size in tokens}
    infer = decode.get("fixed", decode["work"])  # fixed part: the smallest size decoded
    layers = list(PROBE_EXPERTS)

    def one(i: object, phase: str) -> tuple[float, float, float]:
        return (train.get(f"f:{i}:{phase}", 0.0), train.get(f"b:{i}:{phase}", 0.0),
                infer.get(f"f:{i}:{phase}", 0.0))

    def points(idx: list, phase: str, fixed: list[float], mode: str = "train"
               ) -> list[tuple[float, float]]:
        """(roofline seconds of one pass, mean work scale over the layers) per work size; at
        least 1 (the roofline is the fitted peak); none where the probe's roofline time is too
        small to tell. Training: forward + backward, one pass is a third of it."""
        out = []
        for size in WORK_SIZES:
            if mode == "train":
                work, roof_of, passes = fw.get(size, {}), roofline.get(size, {}), 3
            else:
                work, roof_of, passes = decode.get(size, {}), roofline.get(f"decode:{size}", {}), 1
            roofs, ratios = [], []
            for i, fx in zip(idx, fixed):
                roof = roof_of.get(f"{i}:{phase}", 0.0)
                measured = work.get(f"f:{i}:{phase}", 0.0) + work.get(f"b:{i}:{phase}", 0.0)
                if roof > 1e-6 / passes and measured:
                    roofs.append(roof / passes)
                    ratios.append(max(1.0, (measured - fx) / roof))
            if ratios:
                out.append((sum(roofs) / len(roofs), sum(ratios) / len(ratios)))
        return out

    def overhead(f: float, b_: float, i_: float, idx: list, phase: str, fixed: list[float],
                 fixed_decode: list[float]) -> PhaseOverhead:
        pts = points(idx, phase, fixed)
        return PhaseOverhead(forward_s=f, backward_s=b_, infer_s=i_,
                             work_scale=pts[0][1] if pts else 1.0, work_points=pts,
                             decode_points=points(idx, phase, fixed_decode, "decode")
                             if "fixed" in decode else [])

    names = sorted({k.split(":")[2] for k in (*train, *infer)} - {"head"})
    out: dict[str, PhaseOverhead] = {}
    for kind, idx in (("dense", [i for i, E in enumerate(layers) if not E]),
                      ("moe", [i for i, E in enumerate(layers) if E])):
        for phase in names:
            vals = [one(i, phase) for i in idx]
            if not vals or not any(any(v) for v in vals):
                continue
            if kind == "moe" and phase == "experts":
                fits = [_line([layers[i] for i in idx], [v[j] for v in vals]) for j in range(3)]
                fixed = [sum(f[0] + f[1] * layers[i] for f in fits[:2]) for i in idx]
                fixed_decode = [fits[2][0] + fits[2][1] * layers[i] for i in idx]
                out["moe.experts"] = overhead(fits[0][0], fits[1][0], fits[2][0], idx, phase,
                                              fixed, fixed_decode)
                out["moe.experts_per_local"] = PhaseOverhead(
                    forward_s=fits[0][1], backward_s=fits[1][1], infer_s=fits[2][1])
                continue
            mean = [sum(v[j] for v in vals) / len(vals) for j in range(3)]
            out[f"{kind}.{phase}"] = overhead(*mean, idx, phase, [v[0] + v[1] for v in vals],
                                              [v[2] for v in vals])
    f, b_, i_ = one("head", "head")
    out["head"] = overhead(f, b_, i_, ["head"], "head", [f + b_], [i_])
    (t1, p1), (t2, p2) = fw["optimizer"]
    per_param = max(0.0, (t2 - t1) / (p2 - p1)) if p2 > p1 else 0.0
    return FrameworkOverhead(
        phases=out, optimizer_tensor_s=max(0.0, t1 - per_param * p1) / max(1, fw["tensors"]),
        optimizer_param_s=per_param, ranks=fw.get("host_ranks", ranks), cores=fw.get("cores"),
        contention=_ratio(fw.get("work_all_ranks", {}), fw.get("work", {})),
        decode_contention=_ratio(fw.get("infer_all_ranks", {}), fw["infer"]),
        skew=max(0.0, fw.get("skew", 0.0)),
        source=f"measured {where} on the runtime's own model at hidden 8 "
               f"({len(layers)} layers: experts {layers}), training and greedy decoding; work "
               f"scales at (hidden, heads, ffn, batch, sequence) "
               f"{', '.join(str(PROBE_SIZES[k]) for k in WORK_SIZES)}")


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
                  m: dict) -> ClusterProfile:
    base_p = load_cluster(base)
    where = f"on {info['host']} ({info['ranks']} ranks, {info['backend']}, {info['date']})"
    peak, half, r2_g = fit.fit_gemm([r["flops"] for r in m["gemm"]],
                                    [r["time_s"] for r in m["gemm"]])
    bw, _, r2_m = fit.fit_memory([r["bytes"] for r in m["copy"]], [r["time_s"] for r in m["copy"]])
    score_s, r2_s = 0.0, None  # raw measurements taken before the score sweep: none charged
    if m.get("scores"):
        score_s, _, r2_s = fit.fit_per_item([r["elements"] for r in m["scores"]],
                                            [r["time_s"] for r in m["scores"]], "attention")
    dtype = info["dtype"]
    dev = base_p.device.model_copy(update={
        "name": info["device"], "kind": "gpu" if info["backend"] == "nccl" else "cpu",
        "peak_flops": {**base_p.device.peak_flops, dtype: peak},
        "gemm_efficiency": EfficiencyCurve(
            max_efficiency=1.0, half_flops=half,
            source=f"fitted {where}: {len(m['gemm'])} GEMMs, r2={r2_g:.3f}"),
        "hbm_Bps": bw, "hbm_efficiency": 1.0, "op_overhead_s": m["op_overhead_s"],
        "score_element_s": score_s,

        "memory_bytes": info.get("memory_bytes", base_p.device.memory_bytes),
        "source": f"measured {where}; peak = fitted GEMM throughput (r2={r2_g:.3f}), "
                  f"memory bandwidth from copies (r2={r2_m:.3f}), op overhead from a small "
                  "autograd op, "
                  + (f"work per score element from attention at head dim 4 (r2={r2_s:.3f}), "
                     if r2_s is not None else "")
                  + "framework overhead per phase from the runtime's own model"})
    if "framework" in m:
        measured = base_p.model_copy(update={"device": dev})
        roof = {**{size: _roofline(measured, dtype, size) for size in WORK_SIZES},
                **{f"decode:{size}": _roofline(measured, dtype, size, decode=True)
                   for size in WORK_SIZES}}
        fw = framework_overhead(m["framework"], roof, gpus_per_node, where)
        dev = dev.model_copy(update={"framework": fw})
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
    profile = ClusterProfile.model_validate({**base_p.model_dump(), **{
        "name": name, "description": f"measured by moeplan profile {where}",
        "source": f"moeplan profile {where}; base profile {base} for what is not measured",
        "gpus_per_node": gpus_per_node,
        "default_dtype": dtype, "max_nodes": None, "topology": info.get("topology"),
        "intra": tiers["intra"].model_dump(), "inter": tiers["inter"].model_dump(),
        "device": dev.model_dump(), "fitted": [f.model_dump() for f in fits]}})
    scales = fit_exchanges(m.get("exchanges", []), profile, where)
    if scales:
        profile = profile.model_copy(update={"exchanges": scales})
    if m.get("spread"):
        profile = profile.model_copy(update={"spread": measured_spread(
            m["spread"], where, cpu=info["backend"] == "gloo")})
    fw = profile.device.framework
    if fw is not None and m.get("in_situ"):
        situ = in_situ_medians(m["in_situ"])
        fw = fw.model_copy(update={"source": fw.source + (
            "; compute in a running step, all-to-all and gradient sync beyond the model from "
            "the probe run expert-parallel on every rank by the runtime's own training and "
            "decoding loops")})
        # the compute factor first: the all-to-alls' and gradient sync's waits for their peers'
        # compute are charged on it, and the extras are what is left beyond them
        for update in (in_situ_factors, in_situ_extras):
            fw = fw.model_copy(update=update(situ, profile))
            profile = profile.model_copy(update={"device": profile.device.model_copy(
                update={"framework": fw})})
    return profile
