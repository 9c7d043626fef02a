"""How long a capacity sweep takes: 4 models x 7 GPU counts x 2 modes on one cluster.

    python bench/bench_sweep.py [--jobs N] [--out bench/results/sweep.json]

Target: under 15 s on a 2-core machine with the defaults of `moeplan sweep` (simulation of the 16
best candidates per point, one worker per CPU). Prints the measured wall time, the time per point
and the slowest points.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from moeplan.planner import sweep as S
from moeplan.spec import load_cluster, load_model

MODELS = ["1.3b-pr-moe", "1.3b-moe-128", "1.3b-pr-moe-mos", "6.7b"]
CLUSTER = "ndv4-a100-40gb"
GPUS = "8-512"  # 8, 16, ..., 512: 7 counts
TARGET_S = 15.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=None, help="[default: one per CPU]")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    specs = {m: load_model(m) for m in MODELS}
    clusters = {CLUSTER: load_cluster(CLUSTER)}
    points = S.points_for(specs, clusters, GPUS, S.MODES, [8])
    timed: list[tuple[float, S.Point]] = []
    t0 = time.perf_counter()
    rows = S.sweep(specs, clusters, points, S.Options(), a.jobs)
    wall = time.perf_counter() - t0
    for pt in points[:: max(1, len(points) // 8)]:  # a sample, each alone: the cost of a point
        t = time.perf_counter()
        S.cost_point(specs[pt.model], clusters[CLUSTER], pt, S.Options())
        timed.append((time.perf_counter() - t, pt))
    feasible = sum(r.feasible for r in rows)
    print(f"{len(points)} points ({feasible} feasible) in {wall:.1f} s on "
          f"{os.cpu_count()} CPUs, {a.jobs or os.cpu_count()} workers "
          f"({'met' if wall < TARGET_S else 'MISSED'}: target < {TARGET_S:g} s)")
    for t, pt in sorted(timed, key=lambda x: -x[0])[:3]:
        print(f"  {pt.model} {pt.mode} {pt.gpus} GPUs alone: {t:.2f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"bench": "sweep", "points": len(points), "feasible": feasible,
                       "wall_s": wall, "cpus": os.cpu_count(), "workers": a.jobs or os.cpu_count(),
                       "target_s": TARGET_S, "met": wall < TARGET_S,
                       "python": platform.python_version(),
                       "sample_point_s": {f"{p.model} {p.mode} {p.gpus}": t for t, p in timed}},
                      f, indent=1)
            f.write("\n")
    return 0 if wall < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
