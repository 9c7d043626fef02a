"""Accuracy on shapes nobody tuned to, over independent profiles, and what moves between them.

    python bench/bench_random_grid.py [--rounds 3] [--configs 8] [--seed S] [--out FILE]

Each round takes a fresh profile of this host for 2 and 4 ranks (`moeplan profile --quick`),
draws `--configs` configurations at random (seeded; the seed is printed) from a space of shapes —
hidden, heads, layers, experts per MoE layer, top-k, capacity factor, residual or not, batch,
training or inference, 2 or 4 ranks — costs each with that round's profile (its band too) and
runs it once with `moerun`. It reports, over every (configuration, round): the median and 90th
percentile of |error| of the step time (inference: per-token latency) and how often the
measurement fell inside the predicted p10–p90 band. Targets (issue: predictions a user can
repeat): median ≤ 10%, p90 ≤ 20%, band coverage ≥ 80%.

Between the rounds' profiles it compares every calibration term (their spread over the rounds)
and re-costs the first round's configurations with each profile, then with the first profile
but one group of terms taken from another round's — which group moves the predictions most.
Nothing is asserted; the figures are what they are on this machine.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median, quantiles

from bench_accuracy import MOEPLAN, run_once  # noqa: E402  (bench/ is the script's folder)

from moeplan.cost_models.env import LayerChoice
from moeplan.planner.planning import Request, fixed_plan
from moeplan.spec import ModelSpec, load_cluster, load_model
from moeplan.spec.record import RunRecord


def draw(rng: random.Random) -> dict:
    """One configuration from the space of shapes."""
    hidden = rng.choice([32, 48, 64, 96, 128, 192])
    heads = rng.choice([h for h in (2, 4, 8) if hidden % h == 0])
    moe_layers = rng.choice([1, 2, 3])
    experts = [rng.choice([2, 4, 8]) for _ in range(moe_layers)]
    return {"hidden": hidden, "heads": heads, "ffn": hidden * rng.choice([2, 4]),
            "experts": experts, "top_k": rng.choice([1, 2]),
            "capacity_factor": rng.choice([1.0, 1.25, 1.5]), "residual": rng.random() < 0.5,
            "batch": rng.choice([2, 4, 8]), "seq": rng.choice([32, 64]),
            "mode": rng.choice(["train", "infer"]), "ranks": rng.choice([2, 4])}


def spec_of(c: dict) -> ModelSpec:
    layers = []
    for e in c["experts"]:
        layers += [0, e]  # PR-MoE style: a dense layer, then a MoE layer
    return load_model("tiny-pr-moe").model_copy(update={
        "name": "random", "num_layers": len(layers), "hidden": c["hidden"], "heads": c["heads"],
        "ffn_hidden": c["ffn"], "experts": layers, "top_k": c["top_k"],
        "capacity_factor": c["capacity_factor"], "eval_capacity_factor": c["capacity_factor"],
        "residual": c["residual"], "max_seq_len": 128})


def plan_of(c: dict, profile):
    spec, N = spec_of(c), c["ranks"]
    choices = {i: LayerChoice(ep=min(E, N), es=1, a2a="flat", coordinated=False)
               for i, E in enumerate(spec.experts) if E}
    if c["mode"] == "train":  # ZeRO 0: the runtime keeps whole optimizer states
        r = Request(gpus=N, mode="train", global_batch=c["batch"] * N, seq_len=c["seq"],
                    zero_stage=0)
    else:
        r = Request(gpus=N, mode="infer", global_batch=c["batch"] * N,
                    prompt_len=c["seq"] * 3 // 4, gen_len=c["seq"] // 4)
    return fixed_plan(spec, profile, r, 1, choices)


def headline(plan_or_run, mode: str) -> float:
    m = plan_or_run.predicted if hasattr(plan_or_run, "predicted") else plan_or_run.measured
    return m.step_time_s if mode == "train" else m.latency_s


def profile(work: Path, rnd: int, ranks: int) -> str:
    out = work / f"round{rnd}-local-{ranks}.json"
    subprocess.run(MOEPLAN + ["profile", "--nproc", str(ranks), "--quick", "--out", str(out)],
                   check=True, capture_output=True)
    return str(out)


def run(plan, path: Path, steps: int) -> RunRecord | str:
    """One `moerun` of `plan`: its record, or the last line of its error."""
    plan_path = path.with_suffix(".plan.json")
    plan_path.write_text(plan.to_json())
    err = run_once({}, plan_path, path, steps)
    return err if err else RunRecord.model_validate_json(path.read_text())


TERMS = {  # calibration terms compared between profiles: (group, getter)
    "peak_flops": ("compute", lambda p: p.device.peak_flops[p.default_dtype]),
    "hbm_Bps": ("compute", lambda p: p.device.hbm_Bps),
    "contention": ("compute", lambda p: p.device.framework.contention),
    "in_step": ("compute", lambda p: p.device.framework.in_step),
    "decode_in_step": ("compute", lambda p: p.device.framework.decode_in_step),
    "op_overhead_s": ("framework", lambda p: p.device.op_overhead_s),
    "attention_fixed_s": ("framework",
                          lambda p: p.device.framework.phases["dense.attention"].forward_s),
    "gate_fixed_s": ("framework", lambda p: p.device.framework.phases["moe.gate"].forward_s),
    "untimed_layer_s": ("framework", lambda p: p.device.framework.untimed_layer_s),
    "exchange_extra_s": ("communication", lambda p: p.device.framework.exchange_extra_s),
    "skew": ("communication", lambda p: p.device.framework.skew),
    "turn_share": ("communication", lambda p: p.device.framework.turn_share),
    "inter_latency_s": ("communication", lambda p: p.inter.latency_s),
}
GROUPS = ("compute", "framework", "communication")  # swapped one at a time (`swap`)


def swap(base, other, group: str):
    """`base` with one group of calibrated terms taken from `other`."""
    dev, odev = base.device, other.device
    fw, ofw = dev.framework, odev.framework
    if group == "compute":
        phases = {k: v.model_copy(update={"work_scale": ofw.phases[k].work_scale,
                                          "work_points": ofw.phases[k].work_points,
                                          "decode_points": ofw.phases[k].decode_points})
                  for k, v in fw.phases.items() if k in ofw.phases}
        fw = fw.model_copy(update={"phases": {**fw.phases, **phases}, **{
            k: getattr(ofw, k) for k in ("contention", "decode_contention", "in_step",
                                         "decode_in_step", "optimizer_param_s")}})
        dev = dev.model_copy(update={"peak_flops": odev.peak_flops, "hbm_Bps": odev.hbm_Bps,
                                     "gemm_efficiency": odev.gemm_efficiency, "framework": fw})
        return base.model_copy(update={"device": dev})
    if group == "framework":
        phases = {k: v.model_copy(update={"forward_s": ofw.phases[k].forward_s,
                                          "backward_s": ofw.phases[k].backward_s,
                                          "infer_s": ofw.phases[k].infer_s})
                  for k, v in fw.phases.items() if k in ofw.phases}
        fw = fw.model_copy(update={"phases": {**fw.phases, **phases}, **{
            k: getattr(ofw, k) for k in ("optimizer_tensor_s", "untimed_layer_s",
                                         "decode_untimed_layer_s", "untimed_fraction",
                                         "decode_untimed_fraction")}})
        dev = dev.model_copy(update={"op_overhead_s": odev.op_overhead_s, "framework": fw})
        return base.model_copy(update={"device": dev})
    fw = fw.model_copy(update={k: getattr(ofw, k) for k in (
        "exchange_extra_s", "decode_exchange_extra_s", "grad_sync_extra_s", "skew",
        "turn_share", "decode_turn_share")})
    return base.model_copy(update={"intra": other.intra, "inter": other.inter,
                                   "fitted": other.fitted, "exchanges": other.exchanges,
                                   "device": dev.model_copy(update={"framework": fw})})


def between_profiles(profiles: list[dict], configs: list[dict]) -> dict:
    """Each term's spread over the rounds' profiles, and how far each group of terms moves the
    first round's predictions when taken from the other rounds' profiles."""
    terms = {}
    for name, (group, get) in TERMS.items():  # the 4-rank profiles: two nodes, every term
        values = [get(load_cluster(p[4])) for p in profiles]
        lo, hi = min(values), max(values)
        terms[name] = {"group": group, "values": values,
                       "max_over_min": hi / lo if lo > 0 else None}
    moves: dict[str, list[float]] = {g: [] for g in GROUPS}
    moves["whole profile"] = []
    for c in configs:
        base = load_cluster(profiles[0][c["ranks"]])
        t0 = headline(plan_of(c, base), c["mode"])
        for other_paths in profiles[1:]:
            other = load_cluster(other_paths[c["ranks"]])
            moves["whole profile"].append(headline(plan_of(c, other), c["mode"]) / t0 - 1)
            for group in GROUPS:
                moves[group].append(headline(plan_of(c, swap(base, other, group)),
                                             c["mode"]) / t0 - 1)
    return {"terms": terms, "prediction_moves": {
        g: {"median_abs": median(abs(x) for x in v), "max_abs": max(abs(x) for x in v)}
        for g, v in moves.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="independent profiles (and runs)")
    ap.add_argument("--configs", type=int, default=8, help="random configurations per round")
    ap.add_argument("--seed", type=int, default=None, help="[default: drawn and printed]")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed {seed}", file=sys.stderr)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="moeplan-random-"))
    rows, profiles, t0 = [], [], time.perf_counter()
    for rnd in range(a.rounds):
        paths = {ranks: profile(work, rnd, ranks) for ranks in (2, 4)}
        profiles.append(paths)
        configs = [draw(rng) for _ in range(a.configs)]
        if rnd == 0:
            first = configs
        for i, c in enumerate(configs):
            p = plan_of(c, load_cluster(paths[c["ranks"]]))
            got = run(p, work / f"round{rnd}-{i}.run.json", a.steps)
            row = {"round": rnd, "config": c}
            if isinstance(got, str):
                row["failed"] = got
            else:
                predicted, measured = headline(p, c["mode"]), headline(got, c["mode"])
                band = p.predicted.band
                row.update(predicted_s=predicted, measured_s=measured,
                           error=(predicted - measured) / measured,
                           band=[band.p10_s, band.p90_s] if band else None,
                           inside=bool(band and band.p10_s <= measured <= band.p90_s))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), file=sys.stderr)
    ok = [r for r in rows if "error" in r]
    errs = sorted(abs(r["error"]) for r in ok)
    out = {"bench": "random_grid", "seed": seed, "rounds": a.rounds, "configs": a.configs,
           "work_dir": str(work), "wall_s": round(time.perf_counter() - t0, 1),
           "failed": [r for r in rows if "failed" in r],
           "median_abs_error": median(errs) if errs else None,
           "p90_abs_error": quantiles(errs, n=10, method="inclusive")[-1] if len(errs) > 1
           else None,
           "band_coverage": sum(r["inside"] for r in ok) / len(ok) if ok else None,
           "between_profiles": between_profiles(profiles, first) if a.rounds > 1 else None,
           "rows": rows}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
