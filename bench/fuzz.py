"""Hostile input, many examples: every loader and `moeplan search` option, outcomes counted.

    python bench/fuzz.py [--examples 300] [--seed S] [--out FILE]

The same targets and promise as tests/test_fuzz.py (tests/fuzzing.py): exit code 0, or 2 with
exactly one stderr line, within a time bound. Prints, per target, how many were tried and how
many ended clean, with a traceback (or more than one line) or over the bound, and the first
few failures of each kind; writes them as JSON with --out. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzzing  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hseed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300, help="per target")
    ap.add_argument("--seed", type=int, default=None, help="[default: drawn and printed]")
    ap.add_argument("--out", default=None)
    ap.add_argument("--target", action="append", default=None,
                    help="only this target (repeatable) [default: all]")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed {seed}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="moeplan-fuzz-"))
    fuzzing.prepare(work)
    report, t0 = {}, time.perf_counter()
    for name, (strategy, feed) in fuzzing.targets(work).items():
        if a.target and name not in a.target:
            continue
        counts, failures = Counter(), []

        @hseed(seed)
        @settings(max_examples=a.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(drawn):
            got = feed(drawn)
            counts[got.kind] += 1
            if got.kind != "clean" and len(failures) < 5:
                kept = work / f"failure-{name.replace(' ', '-')}-{len(failures)}.txt"
                kept.write_text(repr(drawn))  # the whole input, to replay it
                failures.append({"kind": got.kind, "why": got.why, "rc": got.rc,
                                 "stderr": got.err[-400:], "input": repr(drawn)[:400],
                                 "kept": str(kept)})

        one()
        report[name] = {"tried": sum(counts.values()), **{k: counts[k] for k in
                                                           ("clean", "traceback", "hang")},
                        "failures": failures}
        r = report[name]
        print(f"{name:16s} tried {r['tried']:4d}  clean {r['clean']:4d}  traceback "
              f"{r['traceback']:3d}  hang {r['hang']:3d}", flush=True)
        for f in failures:
            print(f"    {f['kind']}: {f['why'] or f['stderr'][-200:]!r} <- {f['input'][:160]}")
    out = {"bench": "fuzz", "seed": seed, "examples_per_target": a.examples,
           "wall_s": round(time.perf_counter() - t0, 1), "targets": report}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    if any(r["failures"] for r in report.values()):
        print(f"inputs and outputs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work)  # ours alone (mkdtemp), nothing found to look at


if __name__ == "__main__":
    main()
