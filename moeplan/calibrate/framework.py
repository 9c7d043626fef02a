"""Framework overhead from the probe's phase tables: fixed seconds per phase and pass, work scales
over the cost model's roofline, optimizer cost per tensor and parameter, contention."""

from __future__ import annotations

from moeplan.calibrate.shapes import (
    PROBE_EXPERTS,
    PROBE_SIZES,
    WORK_SIZES,
    decode_shape,
    probe_spec,
)
from moeplan.calibrate.tables import from_raw, seconds
from moeplan.cost_models.env import DENSE, Env, LayerChoice, Pass
from moeplan.cost_models.layer import COMPUTE_PHASES, forward
from moeplan.cost_models.step import decode_pass, head_cost
from moeplan.spec.cluster import (
    ClusterProfile,
    FrameworkOverhead,
    PhaseOverhead,
)
from moeplan.spec.phases import HEAD_LAYER, HEAD_PHASE, LayerPhase, Phase
from moeplan.spec.workload import Setting, Workload


def roofline(cluster: ClusterProfile, dtype: str, size: str, decode: bool = False
              ) -> dict[LayerPhase, float]:
    """Seconds of each compute phase of a probe under the cost model's roofline alone (no fixed
    part, no scale): per training step (forward + backward), or per decode token (the context
    of `step.decode_pass`)."""

    kind = cluster.device.kind
    spec = probe_spec(size, kind)
    _, _, _, B, S = PROBE_SIZES[kind][size]
    bare = cluster.model_copy(update={"device": cluster.device.model_copy(
        update={"framework": None, "op_overhead_s": 0.0})})
    if decode:
        prompt, new = decode_shape(size, kind)
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
                out[LayerPhase(i, ph)] = passes * t
    out[HEAD_PHASE] = head_cost(env, s).phases[Phase.HEAD]
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


# the decode table of each probe size (`probe.Framework`)
DECODE_TABLES = {"fixed": "infer_fixed", "work": "infer",
                 **{size: f"infer_{size}" for size in WORK_SIZES[1:]}}


def framework_overhead(tables: dict, roofline: dict[str, dict[LayerPhase, float]], ranks: int,
                       where: str, device_kind: str) -> FrameworkOverhead:
    """Per-phase fixed seconds from the probe's phase tables (`probe.Framework.result`: stored
    as `tables.to_raw` writes them), and per compute phase and "work" size the work scale:
    (measured − fixed) over `roofline[size]` (training) or over `roofline["decode:" + size]`
    (one decode token), at the probe sizes of a `device_kind` device (`shapes.PROBE_SIZES`); a size
    the tables lack (a profile measured before it was probed) has no point.

    Dense phases come from the dense probe layer, MoE phases are the mean over the MoE probe
    layers, except `experts`, fitted as a + b·(local experts) over them."""
    train = from_raw(tables["train"])
    work_tables = {size: from_raw(tables.get(size, {})) for size in WORK_SIZES}
    tokens = tables["decode_tokens"]
    if not isinstance(tokens, dict):  # a profile measured before decoding at every size
        tokens = {"work": tokens}
    decode = {size: ({k: v / max(1, tokens[size]) for k, v in from_raw(tables[table]).items()})
              for size, table in DECODE_TABLES.items() if table in tables and size in tokens}
    infer = decode.get("fixed", decode["work"])  # fixed part: the smallest size decoded
    layers = list(PROBE_EXPERTS)

    def layer_phase_s(i: int | str, phase: Phase) -> tuple[float, float, float]:
        """(forward, backward, decode) seconds of one probe layer's phase."""
        fwd, bwd = seconds(train, i, phase)
        return fwd, bwd, seconds(infer, i, phase)[0]

    def points(idx: list, phase: Phase, fixed: list[float], mode: str = "train"
               ) -> list[tuple[float, float]]:
        """(roofline seconds of one pass, mean work scale over the layers) per work size; at
        least 1 (the roofline is the fitted peak); none where the probe's roofline time is too
        small to tell. Training: forward + backward, one pass is a third of it."""
        out = []
        for size in WORK_SIZES:
            if mode == "train":
                work, roof_of, passes = work_tables[size], roofline.get(size, {}), 3
            else:
                work, roof_of, passes = decode.get(size, {}), roofline.get(f"decode:{size}", {}), 1
            roofs, ratios = [], []
            for i, fx in zip(idx, fixed):
                roof = roof_of.get(LayerPhase(i, phase), 0.0)
                measured = sum(seconds(work, i, phase))
                if roof > 1e-6 / passes and measured:
                    roofs.append(roof / passes)
                    ratios.append(max(1.0, (measured - fx) / roof))
            if ratios:
                out.append((sum(roofs) / len(roofs), sum(ratios) / len(ratios)))
        return out

    def overhead(fwd: float, bwd: float, dec: float, idx: list, phase: Phase, fixed: list[float],
                 fixed_decode: list[float]) -> PhaseOverhead:
        pts = points(idx, phase, fixed)
        return PhaseOverhead(forward_s=fwd, backward_s=bwd, infer_s=dec,
                             work_scale=pts[0][1] if pts else 1.0, work_points=pts,
                             decode_points=points(idx, phase, fixed_decode, "decode")
                             if "fixed" in decode else [])

    names = sorted({k.phase for k in (*train, *infer)} - {Phase.HEAD})
    out: dict[str, PhaseOverhead] = {}
    for kind, idx in (("dense", [i for i, E in enumerate(layers) if not E]),
                      ("moe", [i for i, E in enumerate(layers) if E])):
        for phase in names:
            vals = [layer_phase_s(i, phase) for i in idx]
            if not vals or not any(any(v) for v in vals):
                continue
            if kind == "moe" and phase == Phase.EXPERTS:
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
    fwd, bwd, dec = layer_phase_s(*HEAD_PHASE)
    out[Phase.HEAD] = overhead(fwd, bwd, dec, [HEAD_LAYER], Phase.HEAD, [fwd + bwd], [dec])
    (t1, p1), (t2, p2) = tables["optimizer"]
    per_param = max(0.0, (t2 - t1) / (p2 - p1)) if p2 > p1 else 0.0
    sizes = ", ".join(str(PROBE_SIZES[device_kind][k]) for k in WORK_SIZES if k in tables)
    return FrameworkOverhead(
        phases=out, optimizer_tensor_s=max(0.0, t1 - per_param * p1) / max(1, tables["tensors"]),
        optimizer_param_s=per_param, ranks=tables.get("host_ranks", ranks),
        cores=tables.get("cores"),
        contention=_ratio(tables.get("work_all_ranks", {}), tables.get("work", {})),
        decode_contention=_ratio(tables.get("infer_all_ranks", {}), tables["infer"]),
        skew=max(0.0, tables.get("skew", 0.0)),
        source=f"measured {where} on the runtime's own model at hidden 8 "
               f"({len(layers)} layers: experts {layers}), training and greedy decoding; work "
               f"scales at (hidden, heads, ffn, batch, sequence) "
               f"{sizes}")
