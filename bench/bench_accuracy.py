"""Prediction accuracy on this machine: profile, plan, run, compare — over a grid of plans.

    python bench/bench_accuracy.py [--profile FILE] [--steps 16] [--rounds 5] [--quick]
                                   [--out accuracy.json]
    python bench/bench_accuracy.py --recost WORK_DIR [--out accuracy.json]

1. `moeplan profile --nproc N` measures this host (CPU ranks, gloo) for each rank count N of the
   grid: on a host with fewer cores than ranks the contention, and so every figure, depends on N.
2. For every grid point (tiny and small PR-MoE; 2 and 4 ranks; train and infer; flat and
   hierarchical all-to-all where the layout allows it), a plan with those degrees is costed on
   that profile (`fixed_plan`, with its simulation), run with `moerun` once per round (every
   plan in turn, `--rounds` times), and compared with its median run — what a user of this
   shared host sees, and the statistic the profile keeps (its calibrations pooled over its
   moments, its in-step sample the median) — and with a quiet run (the lower quartile of the
   rounds, the second shortest of five: the host's slow spells only ever add time).
3. Prints JSON: per plan the prediction error (predicted − measured) / measured of step time
   (train) or per-token latency (infer),
   for the analytic model and for the simulator, and of each phase (analytic); then the median
   and worst |error| over the grid, over the phases the targets name, and per phase.
Nothing is asserted; the figures are what they are on this machine. `host_gemm_gflops` records
how fast this host ran one fixed GEMM (numpy, fp32, 512³, median of 20) before and after the
profiles and before each round: a host that changes speed between profiling and running moves
every error the same way, and this shows by how much.

`--recost WORK_DIR` measures nothing: it rebuilds the profiles an earlier run left in its work
directory (printed as `work_dir`) from their raw measurements with the current code, plans again
and compares with the stored runs — how a change to the model or to the profile's estimators
would have done on measurements already taken.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

from moeplan.cost_models.env import LayerChoice
from moeplan.planner.planning import Request, fixed_plan
from moeplan.spec import load_cluster, load_model
from moeplan.spec.record import RunRecord, compare, summarize

HERE = Path(__file__).parent
MOEPLAN = [sys.executable, "-c", "from moeplan.cli.main import main; main()"]
MOERUN = [sys.executable, "-c", "from moeplan.cli.moerun import main; main()"]


def grid(quick: bool) -> list[dict]:
    points = []
    for model in ("tiny-pr-moe", str(HERE / "data" / "small-pr-moe.json")):
        for ranks in (2, 4):
            for mode in ("train", "infer"):
                for a2a in (("flat", "hierarchical") if ranks == 4 else ("flat",)):
                    points.append({"model": model, "ranks": ranks, "mode": mode, "a2a": a2a})
    return points[:8] if quick else points


def make_plan(point: dict, profile: str):
    spec = load_model(point["model"])
    cluster = load_cluster(profile)
    N = point["ranks"]
    choices = {i: LayerChoice(ep=min(E, N), es=1, a2a=point["a2a"] if min(E, N) == 4 else "flat",
                              coordinated=False)
               for i, E in enumerate(spec.experts) if E}
    if point["mode"] == "train":
        # ZeRO 0: the runtime keeps whole optimizer states on every rank
        r = Request(gpus=N, mode="train", global_batch=4 * N, seq_len=64, zero_stage=0)
    else:
        r = Request(gpus=N, mode="infer", global_batch=2 * N, prompt_len=48, gen_len=16)
    return fixed_plan(spec, cluster, r, 1, choices)


def tag_of(point: dict) -> str:
    return f"{Path(point['model']).stem}-{point['ranks']}-{point['mode']}-{point['a2a']}"


def run_once(point: dict, plan_path: Path, run_path: Path, steps: int) -> str | None:
    """One `moerun` of the plan; the last line of its error, if it failed."""
    r = subprocess.run(MOERUN + ["--plan", str(plan_path), "--out", str(run_path), "--steps",
                                 str(steps), "--warmup", "2"], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


def measured_of(run: RunRecord, mode: str) -> float:
    return run.measured.step_time_s if mode == "train" else run.measured.latency_s


def evaluate(point: dict, plan, runs: list[RunRecord], wall_s: float, against: str) -> dict:
    """Errors of the plan against one of its runs, its phases with it: the `median` run (whose
    step time / token latency is the median of the rounds) or the `quiet` one (the lower
    quartile)."""
    mode = point["mode"]
    ordered = sorted(runs, key=lambda r: measured_of(r, mode))
    run = ordered[(len(ordered) - 1) // (2 if against == "median" else 4)]
    rows = compare(plan, run)
    measured = measured_of(run, mode)
    analytic = plan.predicted.step_time_s if mode == "train" else plan.predicted.latency_s
    simulated = plan.predicted.simulated_time_s
    phases = {row.phase: row.rel_error for row in rows
              if row.scope == "all layers" and row.rel_error is not None}
    return {**point, "tag": tag_of(point), "measured_s": measured,
            "measured_rounds_s": [measured_of(r, mode) for r in runs],
            "analytic_s": analytic, "simulated_s": simulated,
            "analytic_error": (analytic - measured) / measured,
            "simulated_error": (simulated - measured) / measured,
            "phase_errors": phases, "summary": summarize(rows), "wall_s": round(wall_s, 1)}


def stats(values: list[float]) -> dict:
    a = [abs(v) for v in values]
    return {"median_abs": median(a), "worst_abs": max(a), "n": len(a)} if a else {}


KEY_PHASES = ("attention", "experts", "dispatch_a2a", "combine_a2a", "grad_sync")


def summary(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    return {
        "step_or_token_time": {"analytic": stats([r["analytic_error"] for r in ok]),
                               "simulated": stats([r["simulated_error"] for r in ok])},
        "phases_analytic": stats([e for r in ok for ph, e in r["phase_errors"].items()
                                  if ph in KEY_PHASES]),
        "per_phase_median_abs": {ph: median(abs(r["phase_errors"][ph]) for r in ok
                                            if ph in r["phase_errors"])
                                 for ph in sorted({p for r in ok for p in r["phase_errors"]})},
        "results": results}


def rebuilt_profiles(work: Path) -> dict[int, str]:
    """Each rank count's profile of an earlier run (`work`) rebuilt from its raw measurements
    by this code's `build_profile`, written beside it as local-N.rebuilt.json."""
    from moeplan.calibrate.build import build_profile
    from moeplan.spec.files import write_atomic

    out = {}
    for raw_path in sorted(work.glob("local-*.raw.json")):
        ranks = int(raw_path.name.split(".")[0].split("-")[1])
        raw = json.loads(raw_path.read_text())
        info = raw.pop("info")
        stored = load_cluster(str(work / f"local-{ranks}.json"))
        base = stored.source.split("base profile ")[1].split(" ")[0]
        profile = build_profile(base, stored.name, stored.gpus_per_node, info, raw)
        out[ranks] = str(work / f"local-{ranks}.rebuilt.json")
        write_atomic(Path(out[ranks]), profile.model_dump_json(indent=2) + "\n")
    return out


def gemm_gflops(n: int = 512, repeats: int = 20) -> float:
    """This host's speed now on one fixed GEMM (numpy's BLAS, fp32): the median of `repeats`."""
    a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    a @ b  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return round(2 * n ** 3 / median(times) / 1e9, 1)


def measure(a, work: Path, speed: dict) -> tuple[dict, float, dict, dict, dict, dict]:
    """Profile (unless --profile), plan, then run every plan once per round; `speed` gets the
    host's GEMM speed before and after profiling and before each round."""
    profiles = {}
    speed["before_profiles"] = gemm_gflops()
    t0 = time.perf_counter()
    for ranks in sorted({pt["ranks"] for pt in grid(a.quick)}):
        if a.profile:
            profiles[ranks] = a.profile
            continue
        profiles[ranks] = str(work / f"local-{ranks}.json")
        cmd = MOEPLAN + ["profile", "--nproc", str(ranks), "--out", profiles[ranks]]
        subprocess.run(cmd + (["--quick"] if a.quick else []), check=True, capture_output=True)
    profile_s = time.perf_counter() - t0
    speed["after_profiles"] = gemm_gflops()
    speed["rounds"] = []
    points = grid(a.quick)
    plans, runs, errors, wall = {}, {}, {}, {}
    for point in points:
        tag = tag_of(point)
        plans[tag] = make_plan(point, profiles[point["ranks"]])
        (work / f"{tag}.plan.json").write_text(plans[tag].to_json())
        runs[tag], wall[tag] = [], 0.0
    # every plan once per round, in turn: a slow spell of the host touches one run of a plan,
    # not all of them
    for rnd in range(a.rounds):
        speed["rounds"].append(gemm_gflops())
        for point in points:
            tag = tag_of(point)
            if tag in errors:
                continue
            t1 = time.perf_counter()
            run_path = work / f"{tag}-{rnd}.run.json"
            err = run_once(point, work / f"{tag}.plan.json", run_path, a.steps)
            wall[tag] += time.perf_counter() - t1
            if err:
                errors[tag] = err
            else:
                runs[tag].append(RunRecord.model_validate_json(run_path.read_text()))
            print(json.dumps({"round": rnd + 1, "tag": tag, "error": err, "measured_s": None
                              if err else measured_of(runs[tag][-1], point["mode"])}),
                  file=sys.stderr)
    return profiles, profile_s, plans, runs, errors, wall


def stored_runs(work: Path) -> dict[str, list[RunRecord]]:
    """The runs an earlier run of this benchmark left in `work`, per plan that has any."""
    runs = {}
    for point in grid(False):
        tag = tag_of(point)
        found = sorted(work.glob(f"{tag}-[0-9]*.run.json"),
                       key=lambda f: int(f.name[len(tag) + 1:].split(".")[0]))
        if found:
            runs[tag] = [RunRecord.model_validate_json(f.read_text()) for f in found]
    return runs


def host_speed(profiles: dict[str, str]) -> dict[str, dict[str, float]]:
    """What each profile measured of the host's speed, to tell one VM from another."""
    out = {}
    for ranks, path in profiles.items():
        device = json.loads(Path(path).read_text())["device"]
        out[ranks] = {"fp32_gflops": round(device["peak_flops"]["fp32"] / 1e9, 1),
                      "memory_GBps": round(device["hbm_Bps"] / 1e9, 1),
                      "op_overhead_us": round(device["op_overhead_s"] * 1e6, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", help="use this profile for every plan instead of measuring")
    p.add_argument("--quick", action="store_true", help="8 grid points, quick profile")
    p.add_argument("--steps", type=int, default=16,
                   help="measured training steps (inference: generations) per plan and round; "
                        "the host's slow spells last seconds, so short runs scatter widely")
    p.add_argument("--rounds", type=int, default=5,
                   help="runs of every plan, in turn; each plan is compared with its median run "
                        "and with its lower-quartile run")
    p.add_argument("--recost", metavar="WORK_DIR",
                   help="measure nothing: rebuild an earlier run's profiles from their raw "
                        "measurements with this code, re-plan, and compare with its stored runs")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    speed: dict = {}
    if a.recost:
        work = Path(a.recost)
        if not list(work.glob("local-*.raw.json")):
            p.error(f"{work}: no local-N.raw.json of an earlier run of this benchmark")
        profiles, profile_s = rebuilt_profiles(work), 0.0
        runs = stored_runs(work)
        errors, wall = {}, {tag: 0.0 for tag in runs}
        plans = {tag_of(pt): make_plan(pt, profiles[pt["ranks"]]) for pt in grid(False)
                 if tag_of(pt) in runs and pt["ranks"] in profiles}
    else:
        work = Path(tempfile.mkdtemp(prefix="moeplan-accuracy-"))
        profiles, profile_s, plans, runs, errors, wall = measure(a, work, speed)
    points = [pt for pt in grid(a.quick and not a.recost) if tag_of(pt) in plans]
    out = {"bench": "prediction_accuracy", "profiles": profiles,
           "host": host_speed(profiles), "profile_s": round(profile_s, 1), "plans": len(points),
           "rounds": max(len(r) for r in runs.values()), "steps": a.steps,
           "failed": sorted(errors), "work_dir": str(work),
           **({"host_gemm_gflops": speed} if speed else {}),
           **({"recost_of": str(work)} if a.recost else {})}
    # against the median run (what a user sees, slow spells of the host included) and against
    # a quiet run (the lower quartile: the machine outside the host's slow spells)
    for against in ("median", "quiet"):
        results = [{**pt, "tag": tag_of(pt), "error": errors[tag_of(pt)]} if tag_of(pt) in errors
                   else evaluate(pt, plans[tag_of(pt)], runs[tag_of(pt)], wall[tag_of(pt)],
                                 against)
                   for pt in points]
        out[f"against_{against}_run"] = summary(results)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
