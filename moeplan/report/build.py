"""Write a report directory: `index.html` (self-contained: figures inline, no network), `report.md`
(the same for a wiki or a pull request, figures beside it), `sweep.csv`, `sweep.json` and the
recommended points' `plans/*.json`.

The directory is created, or must be empty, or hold a previous report (its `.moeplan-report`
lists what it wrote): the report writes only its own names and never follows a link."""

from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from moeplan import __version__
from moeplan.planner import sweep as S
from moeplan.report import analysis as A
from moeplan.report import figures as F
from moeplan.spec import files
from moeplan.spec.files import write_atomic
from moeplan.spec.sweep import SweepFile, SweepRow

MARKER = ".moeplan-report"
FIGURES = "figures"
PLANS = "plans"
GiB = 2.0 ** 30

# In the page: an error or a figure that failed to load is written into <body data-check>, so a
# headless browser (bench/check_report.py) can tell a good page from a broken one.
SELF_CHECK = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e)); },
                        true);
window.addEventListener('load', function () {
  var broken = Array.prototype.filter.call(document.images, function (img) {
    return !img.complete || img.naturalWidth === 0; }).map(function (img) { return img.alt; });
  var bad = window.__errors.concat(broken.map(function (a) { return 'figure not loaded: ' + a; }));
  document.body.setAttribute('data-check', bad.length ? 'failed: ' + bad.join('; ') : 'ok');
  document.body.setAttribute('data-figures', String(document.images.length));
});
</script>"""
STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
</style>"""


def prepare_folder(out: str) -> Path:
    """The report's directory: created here, or an existing empty one, or a previous report."""
    return files.prepare_folder(out, MARKER, "a moeplan report")


@dataclass
class _Writer:
    folder: Path
    written: list[str]

    def __call__(self, name: str, content: str | bytes) -> str:
        path = files.folder_file(self.folder, name)
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, content)
        self.written.append(name)
        return name


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def tokens(n: float) -> str:
    """300000000000 -> 300B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _time(r: SweepRow) -> str:
    t = A.headline_s(r)
    return f"{t:.3f} s / step" if r.mode == "train" else f"{t * 1e3:.2f} ms / token"


def _slug(name: str) -> str:
    """A model or cluster name as one file-name component: only letters, digits, '.', '_', '-'
    (a sweep file's names may hold '/' or '..'), never starting with a dot."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def _plan_names(rows: list[SweepRow]) -> dict[int, str]:
    """A file name per row with a plan (by id), unique even where two names slug alike."""
    out: dict[int, str] = {}
    for r in rows:
        if r.plan is None:
            continue
        batch = f"-x{r.per_gpu_batch}" if r.per_gpu_batch else ""
        stem = f"{PLANS}/{_slug(r.model)}-{_slug(r.cluster)}-{r.mode}{batch}-{r.gpus}gpus"
        name, n = f"{stem}.json", 2
        while name in out.values():
            name, n = f"{stem}-{n}.json", n + 1
        out[id(r)] = name
    return out


class Page:
    """One report written twice: HTML (figures inline) and Markdown (figures as files)."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md += [f"{'#' * level} {text}", ""]

    def para(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.html.append(f"<p{cls}>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                         + "</tr>" + "".join("<tr>" + "".join(
                             f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                             for row in rows) + "</table>")
        clean = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(row) + " |" for row in clean]
        self.md.append("")

    def figure(self, name: str, png: bytes | None, caption: str, write) -> None:
        if png is None:
            return
        path = write(f"{FIGURES}/{name}.png", png)
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<figure><img alt="{html.escape(name)}" '
                         f'src="data:image/png;base64,{data}"><figcaption class="note">'
                         f"{html.escape(caption)}</figcaption></figure>")
        self.md += [f"![{name}]({path})", "", f"*{caption}*", ""]


def write_report(doc: SweepFile, folder: Path, baseline: str | None = None,
                 runs: list[Path] | None = None, jobs: int | None = None) -> list[str]:
    """Analyse the sweep and write the report's files; returns the names written."""
    write = _Writer(folder, [])
    chosen = A.recommended(doc)
    variants = A.variants(doc, chosen, baseline)
    measured = A.measured_runs(runs or [])
    sens = A.sensitivity(doc, chosen, jobs)
    front = A.pareto(doc.rows)
    usable = {name: c.device.usable_bytes for name, c in doc.clusters.items()}
    options = S.options_from(doc.options)

    write("sweep.csv", S.csv_text(doc.rows))
    write("sweep.json", doc.model_dump_json(indent=1))
    names = _plan_names(chosen)
    for r in chosen:
        if r.plan is not None:
            write(names[id(r)], r.plan.to_json())

    page = Page()
    models = ", ".join(doc.models)
    clusters = ", ".join(f"{c.name} ({c.device.name})" for c in doc.clusters.values())
    counts = sorted({r.gpus for r in doc.rows})
    page.heading(f"Capacity plan: {models}", 1)
    page.para(f"{len(doc.rows)} points: models {models}; clusters {clusters}; GPUs "
              f"{', '.join(map(str, counts))}; modes "
              f"{', '.join(dict.fromkeys(r.mode for r in doc.rows))}. Each point is one "
              f"`moeplan search` ({options.runtime} runtime, simulation of the best "
              f"{options.simulate_top} candidates). moeplan {__version__}.")
    _recommendations(page, doc, chosen, options, names)
    page.heading("Scaling")
    page.figure("scaling", F.scaling(doc), "Per-token latency and throughput per GPU against "
                "the GPU count, per model (the view of DeepSpeed-MoE's Figures 10 and 11).", write)
    page.figure("cost", F.cost(doc), "Cost per million tokens trained or generated.", write)
    page.heading("Recommended plans")
    page.figure("memory", F.memory(chosen, usable), "Memory per GPU by term; the black mark is "
                "the GPU's usable memory.", write)
    page.figure("layers", F.layers(chosen), "Expert parallelism per MoE layer (bar height: ep; "
                "labels: expert slicing and expert data parallelism; colour: all-to-all).", write)
    _front(page, doc, front, write)
    _variants(page, variants, baseline, write)
    _sensitivity(page, sens, write)
    _runs(page, measured, write)
    _all_points(page, doc)
    _assumptions(page, doc)

    md = "\n".join(page.md)
    write("report.md", md)
    body = "\n".join(page.html)
    write("index.html", "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
          f"<title>Capacity plan: {html.escape(models)}</title>{SELF_CHECK}{STYLE}</head>"
          f"<body>\n{body}\n</body></html>\n")
    write(MARKER, json.dumps({"moeplan_version": __version__,
                              "files": sorted(set(write.written + [MARKER]))}, indent=1))
    return write.written


def _recommendations(page: Page, doc: SweepFile, chosen: list[SweepRow], options,
                     names: dict[int, str]) -> None:
    page.heading("Answer" if doc.answers else "Recommended points")
    for a in doc.answers:
        page.para(f"{a.model}, {a.mode}: {a.text}")
    if not doc.answers:
        page.para("Training: the lowest cost per token; inference: the fewest GPUs within 10% of "
                  "the model's lowest latency per token.", note=True)
    rows = []
    for r in chosen:
        run = (f"{r.run_days:.1f} days, {r.run_gpu_hours:,.0f} GPU-h"
               + (f", ${r.run_usd:,.0f}" if r.run_usd is not None else "")
               + (f", ≤{r.run_energy_kwh_max / 1e3:,.1f} MWh" if r.run_energy_kwh_max else "")
               if r.mode == "train" else "-")
        rows.append([r.model, r.mode + (f" x{r.per_gpu_batch}" if r.per_gpu_batch else ""),
                     r.cluster, str(r.gpus), _time(r), f"{r.tokens_per_s:,.0f}",
                     f"{r.tokens_per_s_per_gpu:,.0f}", f"{r.memory_per_gpu_bytes / GiB:.1f}",
                     _f(r.usd_per_m_tokens, ".4f"), run, r.degrees,
                     names.get(id(r), "-")])
    page.table(["model", "mode", "cluster", "GPUs", "time", "tokens/s", "per GPU",
                "GiB/GPU", "$ per M tokens",
                f"training run ({tokens(options.train_tokens)} tokens)",
                "degrees", "plan"], rows)
    if any(r.run_energy_kwh_max for r in chosen):
        page.para("Energy is GPU-hours times the boards' maximum power: an upper bound that "
                  "leaves out hosts, network and cooling.", note=True)


def _front(page: Page, doc: SweepFile, front: list[SweepRow], write) -> None:
    if not front:
        return
    page.heading("Inference: latency against throughput")
    page.figure("pareto", F.pareto(doc, front), "Every inference point; each model's line joins "
                "its points that none of its others beats on both latency and throughput per "
                "GPU.", write)
    page.table(["model", "cluster", "GPUs", "sequences per GPU", "ms per token",
                "tokens/s per GPU"],
               [[r.model, r.cluster, str(r.gpus), str(r.per_gpu_batch),
                 f"{r.latency_s * 1e3:.2f}", f"{r.tokens_per_s_per_gpu:,.0f}"] for r in front])


def _variants(page: Page, items, baseline: str | None, write) -> None:
    if len({v.row.model for v in items}) < 2:
        return
    page.heading("Model variants")
    page.para("GPU-hours per million tokens at each model's recommended point"
              + (f", and its ratio to the baseline {baseline} on the same cluster and mode "
                 "(the paper compares against the quality-equivalent dense model)."
                 if baseline else "; name the quality-equivalent dense model with --baseline."))
    page.figure("variants", F.variants(items, baseline), "Cost per token of each model.", write)
    page.table(["model", "mode", "GPUs", "GPU-hours per M tokens", "$ per M tokens",
                "vs baseline"],
               [[v.row.model, v.row.mode, str(v.row.gpus),
                 f"{v.row.gpu_hours_per_m_tokens:.3f}", _f(v.row.usd_per_m_tokens, ".4f"),
                 "-" if v.vs_baseline is None else f"{v.vs_baseline:.2f}x"] for v in items])


def _sensitivity(page: Page, items, write) -> None:
    if not items:
        return
    page.heading("Sensitivity")
    page.para("Each recommended point searched again with one group of the cluster's constants "
              f"moved by -{A.SENSITIVITY:.0%} and +{A.SENSITIVITY:.0%}: how far its time moves, "
              "and whether the plan itself changes — which constant the decision rests on. "
              + " ".join(f"{k}: {v}." for k, v in A.KNOBS.items()), note=True)
    page.figure("sensitivity", F.sensitivity(items), "Change of each recommended point's time; "
                "hatched bars: the search picked another plan.", write)
    page.table(["point", "constant", "change", "time", "plan"],
               [[f"{s.row.model} {s.row.mode} {s.row.gpus} GPUs", s.knob,
                 f"{s.factor - 1:+.0%}", "-" if s.degrees == A.OUT_OF_BOUNDS else
                 "does not fit" if s.change is None else f"{s.change:+.1%}",
                 "same" if s.same_plan else s.degrees] for s in items])


def _runs(page: Page, items, write) -> None:
    if not items:
        return
    page.heading("Predicted against measured")
    page.figure("runs", F.runs(items), "Each run's step time or per-token latency.", write)
    page.table(["run", "mode", "ranks", "predicted", "measured", "error"],
               [[os.path.basename(m.path), m.mode, str(m.world), f"{m.predicted_s * 1e3:.2f} ms",
                 f"{m.measured_s * 1e3:.2f} ms", f"{m.error:+.1%}"] for m in items])


def _all_points(page: Page, doc: SweepFile) -> None:
    page.heading("Every point")
    page.table(["model", "cluster", "GPUs", "mode", "time", "tokens/s", "per GPU", "GiB/GPU",
                "$ per M tokens", "degrees or limit"],
               [[r.model, r.cluster, str(r.gpus),
                 r.mode + (f" x{r.per_gpu_batch}" if r.per_gpu_batch else ""),
                 _time(r) if r.feasible else "-",
                 _f(r.tokens_per_s, ",.0f"), _f(r.tokens_per_s_per_gpu, ",.0f"),
                 "-" if r.memory_per_gpu_bytes is None else
                 f"{r.memory_per_gpu_bytes / GiB:.1f}",
                 _f(r.usd_per_m_tokens, ".4f"), r.degrees if r.feasible else r.limit]
                for r in doc.rows])


def _assumptions(page: Page, doc: SweepFile) -> None:
    page.heading("Assumptions")
    page.para("Every cluster constant the figures rest on, and where it comes from: measured "
              "(`moeplan profile`), fitted, a datasheet or list price, or assumed.", note=True)
    page.table(["cluster", "constant", "value", "kind", "source"],
               [[c.cluster, c.name, c.value, c.kind, c.source]
                for cl in doc.clusters.values() for c in A.constants(cl)])
    known = A.known_error()
    page.para("The cost model's known error, from the project's validation runs "
              "(|predicted − measured| / measured):")
    page.table(["scope", "points", "median", "worst"],
               [[e["scope"], str(e["points"]), f"{e['median_abs_error']:.1%}",
                 f"{e['worst_abs_error']:.1%}"] for e in known["entries"]])
