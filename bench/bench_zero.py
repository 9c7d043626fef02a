"""ZeRO stages in moerun: memory counted on each rank against the plan's, and the step's parts.

    python bench/bench_zero.py [--model tiny-pr-moe] [--gpus 4] [--steps 4]
                               [--out bench/results/zero.json]

For ZeRO 0, 1 and 2: `moeplan search --zero N` on `local-cpu` (the search's own degrees; a global
batch of 64 so each run takes seconds), then `moerun` of that plan. Prints, per stage, every memory
term run.json counts on the largest rank (weights, whole gradients, optimizer states; expert and
non-expert apart) beside the plan's, and the measured step, gradient sync and optimizer times
beside the predicted ones. Counted bytes are exact (tensor sizes); times are this host's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moeplan.spec.plan import Plan
from moeplan.spec.record import RunRecord

MOEPLAN = [sys.executable, "-c", "from moeplan.cli.main import main; main()"]
MOERUN = [sys.executable, "-c", "from moeplan.cli.moerun import main; main()"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-pr-moe")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    stages = {}
    with tempfile.TemporaryDirectory() as tmp:
        for zero in (0, 1, 2):
            plan_path, run_path = Path(tmp, f"plan{zero}.json"), Path(tmp, f"run{zero}.json")
            subprocess.run(MOEPLAN + ["search", "--model", a.model, "--gpus", str(a.gpus),
                                      "--cluster", "local-cpu", "--global-batch", "64",
                                      "--zero", str(zero), "--out", str(plan_path)],
                           check=True, capture_output=True)
            subprocess.run(MOERUN + ["--plan", str(plan_path), "--steps", str(a.steps),
                                     "--out", str(run_path)], check=True, capture_output=True)
            plan = Plan.model_validate_json(plan_path.read_text())
            run = RunRecord.model_validate_json(run_path.read_text())
            pred, meas = plan.predicted, run.measured
            stages[zero] = {
                "memory": {r.phase: {"predicted": r.predicted, "counted": r.measured}
                           for r in run.memory_comparison},
                "times_s": {"step": [pred.step_time_s, meas.step_time_s],
                            "grad_sync": [pred.head_phases_s.get("grad_sync", 0.0) + sum(
                                l.predicted.phases_s.get("grad_sync", 0.0)
                                for l in plan.layers), meas.grad_sync_s],
                            "optimizer": [pred.head_phases_s.get("optimizer", 0.0) + sum(
                                l.predicted.phases_s.get("optimizer", 0.0)
                                for l in plan.layers), meas.optimizer_s]},
                "degrees": f"tp={plan.parallel.tp} dp={plan.parallel.dp}",
            }
            s = stages[zero]
            print(f"ZeRO {zero} ({s['degrees']}), largest rank, counted / predicted:")
            for term, v in s["memory"].items():
                print(f"  {term:24s} {v['counted'] / 2**20:8.3f} MiB / "
                      f"{v['predicted'] / 2**20:8.3f} MiB")
            for name, (p, m) in s["times_s"].items():
                print(f"  {name:24s} measured {m * 1e3:8.2f} ms, predicted {p * 1e3:8.2f} ms")
    if a.out:
        Path(a.out).write_text(json.dumps({"bench": "zero", "model": a.model, "gpus": a.gpus,
                                           "steps": a.steps, "stages": stages},
                                          indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
