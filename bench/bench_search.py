"""Benchmark `moeplan search`: whole-process wall time (start-up included) and search rate.

Prints one JSON object. Targets (issue 2): 1.3b-pr-moe on 64 GPUs under 1.0 s per process;
47b-moe-128 on 4096 GPUs, --mode infer, under 5 s. Run: python bench/bench_search.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "1.3b-pr-moe/64/train": ["--model", "1.3b-pr-moe", "--gpus", "64"],
    "1.3b-pr-moe/64/infer": ["--model", "1.3b-pr-moe", "--gpus", "64", "--mode", "infer"],
    "47b-moe-128/4096/infer": ["--model", "47b-moe-128", "--gpus", "4096", "--mode", "infer"],
    "47b-moe-128/4096/infer-throughput": ["--model", "47b-moe-128", "--gpus", "4096", "--mode",
                                          "infer", "--objective", "throughput",
                                          "--slo-ms", "200"],
}
TARGET_S = {"1.3b-pr-moe/64/train": 1.0, "47b-moe-128/4096/infer": 5.0}


def run_case(args: list[str], repeats: int) -> dict:
    walls, summary = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "moeplan.cli.main", "search", *args,
                                   "--json", "--out", str(Path(tmp) / "plan.json")],
                                  capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if proc.returncode:
                return {"error": proc.stderr.strip()}
            summary = json.loads(proc.stdout)
    s = summary["search"]
    return {
        "wall_s_median": statistics.median(walls), "wall_s_max": max(walls), "repeats": repeats,
        "search_s": s["elapsed_s"], "settings": s["settings"], "layer_options": s["layer_options"],
        "layer_options_per_s": s["layer_options_per_s"], "plans_covered": s["plans_covered"],
        "plans_covered_per_s": s["plans_covered_per_s"],
        "predicted": {k: v for k, v in summary["predicted"].items()
                      if k in ("step_time_s", "latency_s", "tokens_per_s",
                               "memory_per_gpu_bytes")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    out = {}
    for name, args in CASES.items():
        r = run_case(args, a.repeats)
        if name in TARGET_S and "wall_s_median" in r:
            r["target_s"] = TARGET_S[name]
            r["meets_target"] = r["wall_s_max"] < TARGET_S[name]
        out[name] = r
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
