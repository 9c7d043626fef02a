"""Human tables (rich) and JSON summaries for the CLI. Formatting only — the numbers come from
the plan and the search result."""

from __future__ import annotations

import math
from collections import OrderedDict

from moeplan.planner.diagnose import describe_layers
from moeplan.spec.plan import LayerPlan, Plan

GiB = 2.0 ** 30


def _console():
    import shutil

    from rich.console import Console

    width = shutil.get_terminal_size((120, 24)).columns
    return Console(highlight=False, width=max(width, 120))


def _table(title: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i < 2 else "right")
    return table


def _seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def _bytes(n: float) -> str:
    """Binary units, picked so that small models do not print 0.00 GiB."""
    for unit, size in (("GiB", GiB), ("MiB", 2.0 ** 20), ("KiB", 2.0 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _signature(layer: LayerPlan) -> tuple:
    return (layer.kind, layer.experts, layer.ep, layer.es, layer.edp, layer.a2a,
            layer.a2a_tp_coordinated, round(layer.predicted.time_s, 12))


def layer_groups(p: Plan) -> list[tuple[list[int], LayerPlan]]:
    """Identical layers (same kind, degrees and predicted time) grouped, in first-layer order."""
    groups: OrderedDict[tuple, list[LayerPlan]] = OrderedDict()
    for layer in p.layers:
        groups.setdefault(_signature(layer), []).append(layer)
    return [([l.index for l in ls], ls[0]) for ls in groups.values()]


def _a2a_text(layer: LayerPlan) -> str:
    if layer.kind == "dense":
        return "-"
    return layer.a2a + (" +tp" if layer.a2a_tp_coordinated else "")


def summary(p: Plan, result, out: str, elapsed_s: float) -> dict:
    groups = []
    for numbers, layer in layer_groups(p):
        g = {"layers": numbers, "kind": layer.kind, "time_s_per_layer": layer.predicted.time_s,
             "memory_bytes_per_layer": sum(layer.predicted.memory_bytes.values())}
        if layer.kind == "moe":
            g.update(experts=layer.experts, ep=layer.ep, es=layer.es, edp=layer.edp, a2a=layer.a2a,
                     a2a_tp_coordinated=layer.a2a_tp_coordinated, runner_up=layer.runner_up)
        groups.append(g)
    return {
        "plan": out, "model": p.model.name, "cluster": p.cluster.name, "gpus": p.cluster.gpus,
        "mode": p.workload.mode, "objective": p.objective.model_dump(),
        "runtime": p.provenance.runtime, "notes": p.notes,
        "workload": p.workload.model_dump(), "parallel": p.parallel.model_dump(),
        "layer_groups": groups, "predicted": p.predicted.model_dump(),
        "search": {**p.search.model_dump(), "elapsed_s": result.stats.elapsed_s,
                   "wall_s": elapsed_s,
                   "layer_options_per_s": result.stats.layer_options / result.stats.elapsed_s,
                   "plans_covered_per_s": result.stats.plans_covered / result.stats.elapsed_s},
    }


def print_plan(p: Plan, result, out: str, elapsed_s: float) -> None:
    con = _console()
    w, par = p.workload, p.parallel
    per = "step" if w.mode == "train" else "token"
    head = (f"{p.model.name} on {p.cluster.gpus} x {p.cluster.device} ({p.cluster.name}, "
            f"{p.cluster.nodes} node{'s' * (p.cluster.nodes > 1)}) - {w.mode}, objective "
            f"{p.objective.name}, {p.provenance.runtime} runtime")
    table = _table(head, ["layers", "kind", "experts", "ep", "es", "edp", "all-to-all",
                          f"time/{per}/layer", "memory/layer"])
    for numbers, layer in layer_groups(p):
        moe = layer.kind == "moe"
        table.add_row(describe_layers(numbers), layer.kind, str(layer.experts or "-"),
                      str(layer.ep) if moe else "-", str(layer.es) if moe else "-",
                      str(layer.edp) if moe else "-", _a2a_text(layer),
                      _seconds(layer.predicted.time_s),
                      _bytes(sum(layer.predicted.memory_bytes.values())))
    con.print(table)
    for note in p.notes:
        con.print(f"note: {note}")
    batch = (f"global batch {w.global_batch} x {w.seq_len} tokens, micro-batch {w.micro_batch}"
             if w.mode == "train" else
             f"{w.global_batch} sequences ({w.micro_batch} per dp rank), prompt {w.prompt_len}, "
             f"generate {w.gen_len}")
    con.print(f"non-expert: tp={par.tp} dp={par.dp}"
              f"{', activation checkpointing' if par.activation_checkpointing else ''}; {batch}")
    pr = p.predicted
    if w.mode == "train":
        con.print(f"predicted step time {_seconds(pr.step_time_s)}, "
                  f"{pr.tokens_per_s:,.0f} tokens/s")
    else:
        con.print(f"predicted per-token latency {_seconds(pr.latency_s)}, prefill "
                  f"{_seconds(pr.prefill_s)}, {pr.tokens_per_s:,.0f} tokens/s")
    if pr.band is not None:
        con.print(f"  p10-p90 {_seconds(pr.band.p10_s)} - {_seconds(pr.band.p90_s)} over the "
                  f"profile's spread (" + ", ".join(
                      f"{name} {_seconds(lo)} - {_seconds(hi)}"
                      for name, (lo, hi) in pr.band.terms_s.items()) + ")")
    if pr.simulated_time_s is not None:
        drops = [l.predicted.dropped_fraction for l in p.layers
                 if l.predicted.dropped_fraction is not None]
        con.print(f"simulated {_seconds(pr.simulated_time_s)} (flows over the topology, routing "
                  f"skew {pr.routing_skew:g}; best of {pr.simulated_candidates} candidates"
                  f"{', chosen over the analytic best' if result.analytic_best_changed else ''})"
                  + (f"; expected dropped tokens up to {max(drops) * 100:.1f}% per layer"
                     if drops else ""))
        if pr.simulated_critical_path:
            con.print("  critical path by phase: " + ", ".join(pr.simulated_critical_path[:5]))
    terms = sorted(pr.memory_breakdown_bytes.items(), key=lambda kv: -kv[1])[:4]
    con.print(f"memory per GPU {_bytes(pr.memory_per_gpu_bytes)} ("
              + ", ".join(f"{k.replace('_', ' ')} {_bytes(v)}" for k, v in terms) + ")")
    reasons = [(n, l.runner_up) for n, l in layer_groups(p) if l.runner_up]
    for numbers, why in reasons:
        con.print(f"  layers {describe_layers(numbers)}: next best {why}")
    st = result.stats
    con.print(f"searched {st.settings} global settings, {st.layer_options} layer options "
              f"covering {float(st.plans_covered):.3g} plans exactly in {st.elapsed_s:.2f} s; "
              f"wrote {out}")


def model_rows() -> list[dict]:
    from moeplan.cost_models.params import active_params, total_params
    from moeplan.spec import load_model, model_names

    rows = []
    for name in model_names():
        m = load_model(name)
        counts = sorted({e for e in m.experts if e})
        rows.append({"name": name, "layers": m.num_layers, "hidden": m.hidden, "heads": m.heads,
                     "moe_layers": len(m.moe_layers), "experts": counts,
                     "residual": m.residual, "total_params": total_params(m),
                     "active_params": active_params(m), "reported_params": m.reported_params,
                     "description": m.description})
    return rows


def print_models(rows: list[dict]) -> None:
    table = _table("moeplan model zoo (parameter counts computed from each spec)",
                   ["name", "description", "layers", "hidden", "MoE layers", "experts",
                    "params", "active", "paper"])
    for r in rows:
        table.add_row(r["name"], r["description"], str(r["layers"]), str(r["hidden"]),
                      str(r["moe_layers"]), "/".join(map(str, r["experts"])) or "-",
                      f"{r['total_params'] / 1e9:.2f}B", f"{r['active_params'] / 1e9:.2f}B",
                      f"{r['reported_params'] / 1e9:g}B" if r["reported_params"] else "-")
    _console().print(table)


def cluster_rows() -> list[dict]:
    from moeplan.spec import cluster_names, load_cluster

    rows = []
    for name in cluster_names():
        c = load_cluster(name)
        rows.append({"name": name, "device": c.device.name, "gpus_per_node": c.gpus_per_node,
                     "memory_bytes": c.device.memory_bytes,
                     "peak_flops": c.device.peak_flops[c.default_dtype], "dtype": c.default_dtype,
                     "intra_Bps": c.intra.bandwidth_Bps, "inter_Bps_per_gpu": c.inter_Bps_per_gpu,
                     "description": c.description})
    return rows


def print_clusters(rows: list[dict]) -> None:
    table = _table("moeplan built-in clusters", ["name", "device", "GPUs/node", "memory",
                                                 "peak", "NVLink/GPU", "network/GPU"])
    for r in rows:
        table.add_row(r["name"], r["device"], str(r["gpus_per_node"]),
                      f"{r['memory_bytes'] / GiB:.0f} GiB",
                      f"{r['peak_flops'] / 1e12:.0f} TFLOP/s {r['dtype']}",
                      f"{r['intra_Bps'] / 1e9:.0f} GB/s", f"{r['inter_Bps_per_gpu'] / 1e9:.0f} GB/s")
    _console().print(table)


def print_comparison(p: Plan, record, out: str | None) -> None:
    """moerun's closing table: each measured figure beside the plan's prediction."""
    con = _console()
    unit = "per step" if record.mode == "train" else "per generated token"
    table = _table(f"{p.model.name}, {record.world} ranks, {record.device}/{record.backend}: "
                   f"measured vs predicted {unit}",
                   ["scope", "figure", "predicted", "measured", "prediction error"])
    for row in record.comparison:
        fmt = (lambda v: f"{v:,.0f}") if row.phase == "tokens/s" else _seconds
        err = "-" if row.rel_error is None else f"{row.rel_error * 100:+.0f}%"
        table.add_row(row.scope, row.phase, fmt(row.predicted), fmt(row.measured), err)
    con.print(table)
    m = record.measured
    drops = [(l.index, l.dropped, l.routed) for l in record.layers if l.kind == "moe"]
    con.print("dropped tokens: " + ", ".join(
        f"layer {i} {d}/{r} ({100 * d / r:.1f}%)" if r else f"layer {i} -" for i, d, r in drops))
    con.print(f"peak memory {_bytes(m.peak_memory_bytes)} ({m.memory_kind}); predicted "
              f"{_bytes(p.predicted.memory_per_gpu_bytes)} per GPU")
    if record.memory_comparison:
        con.print(f"ZeRO-{p.workload.zero_stage}, largest rank, counted vs predicted: " + ", ".join(
            f"{r.phase.replace('_', ' ')} {_bytes(r.measured)} vs {_bytes(r.predicted)}"
            for r in record.memory_comparison))
    if record.losses:
        def loss(v: float | None) -> str:
            return "not finite" if v is None or not math.isfinite(v) else f"{v:.4f}"

        con.print(f"loss {loss(record.losses[0])} -> {loss(record.losses[-1])} over "
                  f"{len(record.losses)} steps; held-out loss {loss(record.eval_loss)}")
        if any(v is None or not math.isfinite(v) for v in record.losses):
            con.print("the loss diverged (not finite at some step): lower --lr")
    if out:
        con.print(f"wrote {out}")


def print_band_check(check: dict | None) -> None:
    if check is None:
        return
    _console().print(f"measured {_seconds(check['measured_s'])} is "
                     f"{'inside' if check['inside'] else 'outside'} the predicted p10-p90 band "
                     f"{_seconds(check['p10_s'])} - {_seconds(check['p90_s'])}")


def print_routing(record) -> None:
    """Per MoE layer of a training run, its routers after warm-up (`record.router_health`)."""
    from moeplan.spec.record import router_health

    h = router_health(record)
    if h is None:
        return
    _console().print(
        f"routers after warm-up: {'healthy' if h['healthy'] else 'not healthy'} — dropped up "
        f"to {h['dropped']:.1%} per step (layer {h['dropped_layer']}), busiest expert up to "
        f"{h['load_max_over_mean']:.1f}x the mean (layer {h['load_layer']}); per step in "
        "run.json (layers[].dropped_share, load_max_over_mean, load_entropy)")


def print_error_summary(summary: dict) -> None:
    con = _console()
    for name, label in (("step", "step / token time"), ("phases", "phases (all layers)"),
                        ("layers", "layers")):
        s = summary[name]
        if s["count"]:
            con.print(f"{label}: median |error| {s['median_abs_error'] * 100:.1f}%, worst "
                      f"{s['worst_abs_error'] * 100:.1f}% over {s['count']} figures")


def print_profile(c) -> None:
    """What `moeplan profile` measured: device figures and each collective fit."""
    con = _console()
    d = c.device
    con.print(f"{c.name}: {d.name}, {c.gpus_per_node} ranks per node")
    dtype = c.default_dtype
    con.print(f"  GEMM {d.peak_flops[dtype] / 1e9:.2f} GFLOP/s {dtype} at size, half-efficiency at "
              f"{d.gemm_efficiency.half_flops / 1e6:.2f} MFLOP; memory {d.hbm_Bps / 1e9:.2f} GB/s; "
              f"op overhead {_seconds(d.op_overhead_s)}")
    fw = d.framework
    if fw is not None:  # what the probe measured inside moerun's own loop
        untimed = (f"{_seconds(fw.untimed_layer_s)} per layer and micro-step"
                   if fw.untimed_layer_s is not None else f"{fw.untimed_fraction:.1%} of the step")
        turns = (f"; {fw.ranks} ranks on {fw.cores} cores: contention {fw.contention:.2f}, "
                 f"turn share {fw.turn_share:.2f} (decode {fw.decode_turn_share:.2f})"
                 if fw.cores and fw.ranks > fw.cores else "")
        con.print(f"  in a running step: compute x{fw.in_step:.2f} (decode x"
                  f"{fw.decode_in_step:.2f}), untimed {untimed}{turns}")
    table = _table("collective fits (t = steps x latency + bytes / bandwidth)",
                   ["collective", "tier", "latency", "bandwidth", "r2"])
    for f in c.fitted:
        table.add_row(f.collective, f.tier, _seconds(f.latency_s), f"{f.bandwidth_Bps / 1e9:.2f} GB/s",
                      f"{f.r2:.3f}" if f.r2 is not None else "-")
    con.print(table)
