"""Router health over a long run of the README's laptop loop, with moerun's defaults.

    python bench/bench_routers.py [--steps 300] [--model tiny-pr-moe] [--gpus 4]
                                  [--global-batch 64] [--out bench/results/routers.json]

Plans `--model` for `--gpus` CPU ranks of `local-cpu` (`moeplan search`, its default
sequence length; a smaller global batch than the search's default 512 so that a long run takes
minutes on a laptop: each rank's gate still routes thousands of tokens per step), trains it with
`moerun --steps N` (the paper's recipe: AdamW 0.9/0.95, weight decay 0.1, clip 1, warm-up then
cosine decay; DeepSpeed's random token selection; the model's gate options), and reads the
routing run.json records per MoE layer and step. Prints per layer, after warm-up (the first
tenth of the steps, the learning rate's warm-up): the mean and the worst step's dropped share
and the busiest expert's load over the mean; the target (issue: healthy routers) is under 10%
dropped per step on average and no expert above twice the mean load in any step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moeplan.spec.record import HEALTHY_DROPPED, HEALTHY_LOAD, RunRecord, router_health

MOEPLAN = [sys.executable, "-c", "from moeplan.cli.main import main; main()"]
MOERUN = [sys.executable, "-c", "from moeplan.cli.moerun import main; main()"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--model", default="tiny-pr-moe")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the per-layer summary as JSON here")
    a = ap.parse_args(argv)
    warmup = max(1, a.steps // 10)
    with tempfile.TemporaryDirectory() as tmp:
        plan, run = Path(tmp, "plan.json"), Path(tmp, "run.json")
        subprocess.run(MOEPLAN + ["search", "--model", a.model, "--gpus", str(a.gpus),
                                  "--cluster", "local-cpu", "--global-batch",
                                  str(a.global_batch), "--out", str(plan)],
                       check=True, capture_output=True)
        subprocess.run(MOERUN + ["--plan", str(plan), "--steps", str(a.steps - warmup),
                                 "--warmup", str(warmup), "--out", str(run)],
                       check=True, capture_output=True)
        record = RunRecord.model_validate_json(run.read_text())
        tokens = json.loads(plan.read_text())["workload"]
    layers = []
    print(f"{a.model} on {a.gpus} CPU ranks, {a.steps} steps ({warmup} warm-up), "
          f"global batch {tokens['global_batch']} x {tokens['seq_len']} tokens")
    for layer in record.layers:
        if not layer.dropped_share:
            continue
        dropped = layer.dropped_share[warmup:]
        load = layer.load_max_over_mean[warmup:]
        row = {"layer": layer.index, "mean_dropped": sum(dropped) / len(dropped),
               "worst_step_dropped": max(dropped), "mean_load_max_over_mean":
               sum(load) / len(load), "worst_load_max_over_mean": max(load)}
        layers.append(row)
        print(f"  layer {row['layer']}: dropped mean {row['mean_dropped']:.1%} "
              f"(worst step {row['worst_step_dropped']:.1%}), busiest expert mean "
              f"{row['mean_load_max_over_mean']:.2f}x (worst step "
              f"{row['worst_load_max_over_mean']:.2f}x)")
    health = router_health(record)
    losses = [x for x in record.losses if x is not None]
    print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out {record.eval_loss:.3f}")
    verdict = "healthy" if health and health["healthy"] else "NOT healthy"
    print(f"routers after warm-up: {verdict} (targets: under {HEALTHY_DROPPED:.0%} dropped, "
          f"at most {HEALTHY_LOAD:g}x the mean load)")
    if a.out:
        out = {"model": a.model, "gpus": a.gpus, "steps": a.steps, "warmup": warmup,
               "workload": tokens, "layers": layers, "health": health,
               "first_loss": losses[0], "last_loss": losses[-1], "eval_loss": record.eval_loss}
        Path(a.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0 if health and health["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
