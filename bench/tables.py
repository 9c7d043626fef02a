"""The accuracy page's result tables, generated from the JSON under bench/results/.

    python bench/tables.py           # rewrite the tables in docs/accuracy.md
    python bench/tables.py --check   # exit 1 if the page differs from the JSON (CI runs this)

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in the page; the prose
around the tables is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "accuracy.md"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _pct(x: float) -> str:
    return f"{x * 100:+.0f}%".replace("-", "−")


def _label(r: dict) -> str:
    model = Path(r["model"]).stem
    what = "infer (per token)" if r["mode"] == "infer" else "train"
    a2a = f", {r['a2a']}" if r["ranks"] > 2 else ""
    return f"{model}, {r['ranks']} ranks, {what}{a2a}"


def accuracy_table() -> str:
    d = _load("accuracy-cpu.json")
    quiet = {r["tag"]: r for r in d["against_quiet_run"]["results"]}
    lines = ["| plan | measured, each run | median run | predicted | error vs median run "
             "| vs lower-quartile run |", "|---|---|---|---|---|---|"]
    for r in d["against_median_run"]["results"]:
        runs = r["measured_rounds_s"]
        lines.append(f"| {_label(r)} | {min(runs) * 1e3:.1f}–{max(runs) * 1e3:.1f} ms "
                     f"| {r['measured_s'] * 1e3:.1f} ms | {r['analytic_s'] * 1e3:.1f} ms "
                     f"| {_pct(r['analytic_error'])} | {_pct(quiet[r['tag']]['analytic_error'])} |")
    s = d["against_median_run"]["step_or_token_time"]["analytic"]
    lines.append("")
    lines.append(f"Median |error| {s['median_abs'] * 100:.1f}%, worst {s['worst_abs'] * 100:.1f}% "
                 f"over {s['n']} plans ({d['rounds']} runs of each, {d['steps']} measured steps "
                 "or generations per run).")
    return "\n".join(lines)


def _reruns() -> list[Path]:
    """The accuracy bench's reruns in the order they were taken (rerun, rerun-2, rerun-3, …)."""
    return sorted(RESULTS.glob("accuracy-cpu-rerun*.json"),
                  key=lambda p: int(re.search(r"rerun-?(\d*)", p.stem).group(1) or 1))


def accuracy_runs_table() -> str:
    """Every stored run of the fixed plans, with the host speed its profiles measured."""
    lines = ["| run | host: fp32 GFLOP/s, 2 / 4 ranks | profiling | median / worst error vs "
             "median run (target 10% / 25%) | vs lower-quartile run |", "|---|---|---|---|---|"]
    for path in [RESULTS / "accuracy-cpu.json", *_reruns()]:
        d = json.loads(path.read_text())
        host = d.get("host")
        speed = " / ".join(f"{host[r]['fp32_gflops']:.0f}" for r in sorted(host)) if host else "—"
        med = d["against_median_run"]["step_or_token_time"]["analytic"]
        quiet = d["against_quiet_run"]["step_or_token_time"]["analytic"]
        met = med["median_abs"] <= 0.10 and med["worst_abs"] <= 0.25
        lines.append(f"| `{path.name}` | {speed} | {d['profile_s']:.0f} s "
                     f"| {med['median_abs'] * 100:.1f}% / {med['worst_abs'] * 100:.1f}% "
                     f"({'met' if met else 'missed'}) "
                     f"| {quiet['median_abs'] * 100:.1f}% / {quiet['worst_abs'] * 100:.1f}% |")
    return "\n".join(lines)


def random_grid_table() -> str:
    lines = ["| seed | configurations | median abs error (target 10%) | p90 (target 20%) "
             "| inside the p10–p90 band (target 80%) |", "|---|---|---|---|---|"]
    rows = []
    for path in sorted(RESULTS.glob("random-grid*.json")):
        d = json.loads(path.read_text())
        rows += d["rows"]
        inside = sum(r["inside"] for r in d["rows"])
        lines.append(f"| {d['seed']} | {d['rounds']} profiles × {d['configs']} "
                     f"| {d['median_abs_error'] * 100:.1f}% | {d['p90_abs_error'] * 100:.1f}% "
                     f"| {d['band_coverage'] * 100:.1f}% ({inside}/{len(d['rows'])}) |")
    errors = sorted(abs(r["error"]) for r in rows)
    p90 = statistics.quantiles(errors, n=10, method="inclusive")[8]
    inside = sum(r["inside"] for r in rows)
    lines.append(f"| all | {len(rows)} | {statistics.median(errors) * 100:.1f}% "
                 f"| {p90 * 100:.1f}% | {inside / len(rows) * 100:.1f}% ({inside}/{len(rows)}) |")
    return "\n".join(lines)


def published_table() -> str:
    d = _load("published.json")
    rows = {r["case"]: r for r in d["rows"]}
    lines = ["| case | predicted | published | ratio |", "|---|---|---|---|"]
    for case, r in rows.items():
        unit = r["unit"]
        verdict = " (fitted)" if r["fitted"] else ("" if r["within_25pct"] else
                                                   " (target ±25%: missed)")
        lines.append(f"| {case} ({unit}) | {r['predicted']:.1f} | {r['published']:g} "
                     f"| {r['ratio']:.2f}{verdict} |")
    for b in d.get("bounds", []):
        verdict = "" if b["within_25pct_possible"] else " (target: missed)"
        lines.append(f"| {b['case']} (ms per token) | {b['predicted']:.1f} | under "
                     f"{b['published_under']:g} | {b['ratio_to_bound']:.2f} of the bound"
                     f"{verdict} |")
    ratio = d["train_ratio"]
    lines.append(f"| MoE / dense training throughput | {ratio:.2f}× | 5.3× | "
                 f"{'' if 4.2 <= ratio <= 6.5 else '(target 4.2–6.5×: missed)'} |")
    lines.append(f"| 52B latency, 8 → 64 GPUs | {d['latency_8_over_64']:.2f}× | 2.15× | "
                 f"{'' if 1.6 <= d['latency_8_over_64'] <= 2.8 else '(target 1.6–2.8×: missed)'} |")
    return "\n".join(lines)


def routers_table() -> str:
    d = _load("routers.json")
    lines = ["| MoE layer | dropped, mean | dropped, worst step | busiest expert / mean, mean "
             "| worst step |", "|---|---|---|---|---|"]
    for r in d["layers"]:
        lines.append(f"| {r['layer']} | {r['mean_dropped']:.1%} | {r['worst_step_dropped']:.1%} "
                     f"| {r['mean_load_max_over_mean']:.2f}× | "
                     f"{r['worst_load_max_over_mean']:.2f}× |")
    w = d["workload"]
    lines.append(f"\n{d['model']} on {d['gpus']} CPU ranks, {d['steps']} steps after "
                 f"{d['warmup']} of warm-up, global batch {w['global_batch']} × {w['seq_len']} "
                 f"tokens; loss {d['first_loss']:.3f} → {d['last_loss']:.3f} (held-out "
                 f"{d['eval_loss']:.3f}); "
                 f"{'healthy' if d['health']['healthy'] else 'not healthy'}.")
    return "\n".join(lines)


def zero_table() -> str:
    d = _load("zero.json")
    stages = d["stages"]
    terms = sorted({t for s in stages.values() for t in s["memory"]})
    lines = ["| term (largest rank) | " + " | ".join(f"ZeRO {z}: counted / predicted"
                                                 for z in stages) + " |",
             "|---|" + "---|" * len(stages)]
    for t in terms:
        cells = []
        for s in stages.values():
            v = s["memory"].get(t)
            cells.append("—" if v is None else
                         f"{v['counted'] / 2**20:.3f} / {v['predicted'] / 2**20:.3f} MiB")
        lines.append(f"| {t.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for name in ("grad_sync", "optimizer", "step"):
        cells = [f"{s['times_s'][name][1] * 1e3:.1f} / {s['times_s'][name][0] * 1e3:.1f} ms"
                 for s in stages.values()]
        lines.append(f"| {name.replace('_', ' ')} time (measured / predicted) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table() -> str:
    """Every seed's run (quality.json is seed 0, quality-seed-N.json the others)."""
    runs = [_load("quality.json")] + [
        _load(p.name) for p in sorted(RESULTS.glob("quality-seed-*.json"))]
    seeds = [str(d.get("seed", 0)) for d in runs]
    lines = ["| variant | parameters | " + " | ".join(f"held-out loss, seed {x}" for x in seeds)
             + " |", "|---|---|" + "---|" * len(runs)]
    order = ["dense", "moe-top1", "moe-top2", "residual", "pr-moe", "mos-no-kd", "mos-kd",
             "mos-staged-kd"]
    for name in sorted(runs[0]["variants"], key=lambda k: order.index(k) if k in order
                       else len(order)):
        r = runs[0]["variants"][name]
        lines.append(f"| {name} | {r['params']:,} | " + " | ".join(
            f"{d['variants'][name]['held_out_loss']:.4f}" for d in runs) + " |")
    lines += ["", "| claim (paper) | " + " | ".join(f"seed {x}" for x in seeds) + " |",
              "|---|" + "---|" * len(runs)]
    for i, c in enumerate(runs[0]["claims"]):
        cells = [f"{'holds' if d['claims'][i]['holds'] else 'does not hold'} "
                 f"({d['claims'][i]['figures']})" for d in runs]
        lines.append(f"| {c['claim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


KNOWN_ERROR = ROOT / "moeplan" / "spec" / "data" / "known_error.json"


def known_error() -> dict:
    """The model's measured error, for the reports' assumptions section (packaged data)."""
    pub = _load("published.json")
    checks = [abs(r["ratio"] - 1) for r in pub["rows"] if not r["fitted"]]
    out = {"source": "generated by bench/tables.py from bench/results", "entries": [{
        "scope": f"GPU: DeepSpeed-MoE's published figures on {pub['cluster']} and "
                 "Megatron-LM's (SC 2021, Table 1, no pipeline) on dgx-a100-80gb "
                 "(--runtime deepspeed; the fitted point excluded)",
        "points": len(checks), "median_abs_error": statistics.median(checks),
        "worst_abs_error": max(checks), "result": "bench/results/published.json"}]}
    for name in ("accuracy-cpu.json", _reruns()[-1].name):
        d = _load(name)
        s = d["against_median_run"]["step_or_token_time"]["analytic"]
        host = d.get("host", {}).get("2", {}).get("fp32_gflops")
        out["entries"].append({
            "scope": "CPU ranks: 12 fixed plans run by moerun"
                     + (f" (host {host:g} GFLOP/s fp32)" if host else ""),
            "points": s["n"], "median_abs_error": s["median_abs"],
            "worst_abs_error": s["worst_abs"], "result": f"bench/results/{name}"})
    return out


def blocks_table() -> str:
    d = _load("blocks.json")
    lines = ["| model | predicted step | measured step | error |", "|---|---|---|---|"]
    for name, m in sorted(d["models"].items()):
        lines.append(f"| {name} ({m['plan']}) | {m['predicted_step_s']:.2f} s | "
                     f"{m['measured_step_s']:.2f} s | {_pct(m['error'])} |")
    miss = d["ratio_predicted"] / d["ratio_measured"] - 1
    lines.append(f"| today's blocks / DeepSpeed-MoE's | {d['ratio_predicted']:.2f}× | "
                 f"{d['ratio_measured']:.2f}× | {_pct(miss)} |")
    return "\n".join(lines)


def known_error_text() -> str:
    return json.dumps(known_error(), indent=1) + "\n"


TABLES = {"accuracy": accuracy_table, "accuracy-runs": accuracy_runs_table,
          "random-grid": random_grid_table, "published": published_table,
          "routers": routers_table, "zero": zero_table, "quality": quality_table,
          "blocks": blocks_table}


def render(page: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)",
                             re.S)
        if not pattern.search(page):
            raise SystemExit(f"docs/accuracy.md has no <!-- table:{name} --> block")
        page = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), page)
    return page


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    a = ap.parse_args(argv)
    page = PAGE.read_text()
    new = render(page)
    if a.check:
        if new != page or KNOWN_ERROR.read_text() != known_error_text():
            print("docs/accuracy.md or moeplan/spec/data/known_error.json differs from "
                  "bench/results: run python bench/tables.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    KNOWN_ERROR.write_text(known_error_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
