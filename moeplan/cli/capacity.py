"""`moeplan sweep` and `moeplan report`: capacity planning over models, clusters and GPU counts."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from moeplan.cli.options import finite, load_profile
from moeplan.cost_models.runtimes import RUNTIME_HELP, RUNTIMES
from moeplan.spec import workload as W
from moeplan.spec.errors import ConfigError
from moeplan.spec.files import output_path, write_atomic


def _batches(ctx, param, value: str) -> list[int]:
    try:
        out = sorted({int(x) for x in value.split(",")})
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of whole numbers", ctx=ctx,
                                 param=param) from None
    if not out or out[0] < 1 or out[-1] > 65536:
        raise click.BadParameter(f"{value!r}: sequences per GPU run from 1 to 65536", ctx=ctx,
                                 param=param)
    return out


def sweep_options(f):
    """The options `sweep` and `report` share: what to sweep, the workload, targets, prices."""
    opts = [
        click.option("--model", "models", multiple=True, metavar="NAME|FILE",
                     help="Model (repeatable) [default: 1.3b-pr-moe]."),
        click.option("--cluster", "clusters", multiple=True,
                     help="Built-in cluster (repeatable) [default: ndv4-a100-40gb]."),
        click.option("--profile", "profiles", multiple=True, metavar="FILE",
                     help="ClusterProfile JSON (repeatable), e.g. from `moeplan profile`."),
        click.option("--gpus", default="8-512", show_default=True,
                     help="GPU counts: A-B (whole nodes, powers of two) or a list A,B,C."),
        click.option("--mode", type=click.Choice(["train", "infer", "both"]), default="both",
                     show_default=True),
        click.option("--global-batch", type=click.IntRange(1, W.MAX_COUNT), default=None,
                     help="Training: sequences per step [default: the search's, 512]."),
        click.option("--micro-batch", type=click.IntRange(1, W.MAX_COUNT), default=None),
        click.option("--seq-len", type=click.IntRange(1, W.MAX_COUNT), default=None),
        click.option("--per-gpu-batch", default="8", show_default=True, callback=_batches,
                     metavar="N[,N...]",
                     help="Inference: sequences in flight per GPU (a list sweeps them too)."),
        click.option("--prompt-len", type=click.IntRange(1, W.MAX_COUNT), default=None),
        click.option("--gen-len", type=click.IntRange(1, W.MAX_COUNT), default=None),
        click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None),
        click.option("--zero", "zero_stage", type=click.Choice(["0", "1", "2"]), default="1",
                     show_default=True, help="ZeRO stage for training."),
        click.option("--fix", "fixes", multiple=True, metavar="KEY=VALUE",
                     help="Fix a degree at every point, as `moeplan search --fix`."),
        click.option("--runtime", type=click.Choice(RUNTIMES), default="moerun",
                     show_default=True, help=RUNTIME_HELP),
        click.option("--simulate-top", type=click.IntRange(0, W.MAX_SIMULATE_TOP), default=16,
                     show_default=True, help="As `moeplan search` (0: analytic only, faster)."),
        click.option("--price-per-gpu-hour",
                     type=click.FloatRange(0, W.MAX_PRICE, min_open=True),
                     default=None, callback=finite, metavar="USD",
                     help="Price instead of each cluster's dated list price."),
        click.option("--train-tokens", type=click.FloatRange(1, W.MAX_TRAIN_TOKENS), default=300e9,
                     show_default=True, callback=finite,
                     help="Tokens of a training run (the paper's 300B)."),
        click.option("--days", type=click.FloatRange(*W.DAYS_RANGE), default=None,
                     callback=finite, help="Target: train --train-tokens within this many days."),
        click.option("--target-tokens-per-s", type=click.FloatRange(0, 1e15, min_open=True),
                     default=None, callback=finite, help="Target: tokens/s (trained or served)."),
        click.option("--slo-ms", type=click.FloatRange(*W.SLO_MS_RANGE), default=None,
                     callback=finite, help="Target: inference latency per token."),
        click.option("--jobs", type=click.IntRange(1, 256), default=None,
                     help="Worker processes [default: one per CPU]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _inputs(models, clusters, profiles, gpus, mode, per_gpu_batch):
    from moeplan.planner import sweep as S
    from moeplan.spec import load_cluster, load_model

    specs = {}
    for name in models or ("1.3b-pr-moe",):
        spec = load_model(name)
        specs[spec.name] = spec
    profs = {}
    for name in clusters:
        c = load_cluster(name)
        profs[c.name] = c
    for path in profiles:
        c = load_profile(path)
        if c.name in profs:
            raise ConfigError(f"two clusters are named {c.name}: give each profile its own name")
        profs[c.name] = c
    if not profs:
        c = load_cluster("ndv4-a100-40gb")
        profs[c.name] = c
    modes = ("train", "infer") if mode == "both" else (mode,)
    points = S.points_for(specs, profs, gpus, modes, per_gpu_batch)
    return specs, profs, points


def _options(global_batch, micro_batch, seq_len, prompt_len, gen_len, dtype, zero_stage, fixes,
             runtime, simulate_top, price_per_gpu_hour, train_tokens):
    from moeplan.planner import sweep as S
    from moeplan.planner.space import parse_fix

    return S.Options(global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len,
                     prompt_len=prompt_len, gen_len=gen_len, dtype=dtype,
                     zero_stage=int(zero_stage), fix=parse_fix(fixes), runtime=runtime,
                     simulate_top=simulate_top, price_per_gpu_hour=price_per_gpu_hour,
                     train_tokens=train_tokens)


def run_sweep(params: dict):
    """The sweep the options describe, with a progress bar on a terminal: a SweepFile."""
    from moeplan.planner import sweep as S

    specs, clusters, points = _inputs(params["models"], params["clusters"], params["profiles"],
                                      params["gpus"], params["mode"], params["per_gpu_batch"])
    options = _options(*(params[k] for k in (
        "global_batch", "micro_batch", "seq_len", "prompt_len", "gen_len", "dtype", "zero_stage",
        "fixes", "runtime", "simulate_top", "price_per_gpu_hour", "train_tokens")))
    target = S.Target(tokens_per_s=params["target_tokens_per_s"],
                      slo_s=params["slo_ms"] / 1e3 if params["slo_ms"] else None,
                      train_tokens=params["train_tokens"], days=params["days"])
    if params["mode"] == "train" and params["slo_ms"] is not None:
        raise ConfigError("--slo-ms applies to inference: add --mode infer or both")
    if params["mode"] == "infer" and params["days"] is not None:
        raise ConfigError("--days applies to training: add --mode train or both")
    rows = _with_progress(lambda progress: S.sweep(specs, clusters, points, options,
                                                   params["jobs"], progress), len(points))
    return S.document(specs, clusters, options, target, rows)


def _with_progress(work, total: int):
    if not sys.stderr.isatty():
        return work(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("sweep", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("sweep", total=total)
        return work(lambda row: bar.advance(task))


@click.command()
@sweep_options
@click.option("--out", default="sweep.csv", show_default=True, type=click.Path(dir_okay=False),
              help="Where the sweep goes: a .csv table, or a .json sweep file for `report`.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows and answers as JSON.")
def sweep(out, as_json, **params) -> None:
    """Cost every model x cluster x GPU count x mode point; size to a target."""
    t0 = time.perf_counter()
    target_path = output_path(out)
    if target_path.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out {out}: name a .csv or .json file")
    doc = run_sweep(params)
    from moeplan.planner import sweep as S

    if target_path.suffix.lower() == ".csv":
        write_atomic(out, S.csv_text(doc.rows))
    else:
        write_atomic(out, doc.model_dump_json(indent=1))
    elapsed = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps({"out": out, "wall_s": elapsed,
                               "rows": [r.table() for r in doc.rows],
                               "answers": [a.model_dump() for a in doc.answers]}, indent=2))
        return
    print_sweep(doc, out, elapsed)


def print_sweep(doc, out: str, elapsed_s: float) -> None:
    """The rows as a table, then the sizing answers or the recommended points."""
    from rich.table import Table

    from moeplan.cli.render import _bytes, _console, _seconds
    from moeplan.planner import sweep as S
    from moeplan.report.build import tokens

    con = _console()
    one_cluster = len(doc.clusters) == 1
    header = ["model", "cluster", "GPUs", "mode", "step / token", "tokens/s", "per GPU",
              "memory/GPU", "$/M tokens", "degrees"]
    lines = []
    for r in doc.rows:
        if not r.feasible:
            cells = ["-"] * 5 + ["does not fit" if "does not fit" in r.limit else r.limit]
        else:
            t = r.step_time_s if r.mode == "train" else r.latency_s
            cells = [_seconds(t), f"{r.tokens_per_s:,.0f}", f"{r.tokens_per_s_per_gpu:,.0f}",
                     _bytes(r.memory_per_gpu_bytes),
                     "-" if r.usd_per_m_tokens is None else f"{r.usd_per_m_tokens:.4f}",
                     r.degrees]
        lines.append([r.model, r.cluster, str(r.gpus), _mode(r), *cells])
    keep = [i for i in range(len(header)) if not (one_cluster and header[i] == "cluster")]
    title = f"sweep: {len(doc.rows)} points" + (f" on {doc.rows[0].cluster}" if one_cluster
                                                 and doc.rows else "")
    table = Table(title=title, title_justify="left")
    widths = {i: min(50, max([len(header[i])] + [len(line[i]) for line in lines])) for i in keep}
    for i in keep:
        table.add_column(header[i], justify="left" if i in (0, 1, 3, 9) else "right",
                         no_wrap=True, overflow="ellipsis", min_width=widths[i],
                         max_width=widths[i])
    for line in lines:
        table.add_row(*(line[i] for i in keep))
    con.width = max(con.width, sum(widths.values()) + 3 * len(keep) + 1)  # one line per point
    con.print(table)
    for a in doc.answers:
        con.print(f"{'answer' if a.met else 'no answer'} ({a.model}, {a.mode}): {a.text}")
    if not doc.answers:
        for r in S.recommend(doc.rows):
            what = (f"${r.usd_per_m_tokens:.4f} per M tokens" if r.usd_per_m_tokens is not None
                    else f"{r.tokens_per_s_per_gpu:,.0f} tokens/s per GPU")
            if r.mode == "train" and r.run_days is not None:
                what += f", {tokens(r.run_tokens)} tokens in {r.run_days:.1f} days"
                if r.run_usd is not None:
                    what += f" (${r.run_usd:,.0f})"
            else:
                what = f"{r.latency_s * 1e3:.2f} ms per token, " + what
            con.print(f"recommended ({r.model}, {_mode(r)}): {r.gpus} GPUs of {r.cluster}: {what}")
    con.print(f"wrote {out} in {elapsed_s:.1f} s")


def _mode(r) -> str:
    return r.mode if r.mode == "train" else f"infer x{r.per_gpu_batch}"


@click.command()
@sweep_options
@click.option("--sweep", "sweep_file", default=None, type=click.Path(dir_okay=False),
              help="Report on this sweep file (`moeplan sweep --out X.json`) instead of sweeping.")
@click.option("--baseline", default=None, metavar="MODEL",
              help="The quality-equivalent dense model the others are compared with (one of "
                   "the swept models).")
@click.option("--runs", multiple=True, type=click.Path(dir_okay=False), metavar="RUN.json",
              help="Measured runs (moerun's run.json) to set against their predictions.")
@click.option("--out", default="report", show_default=True, type=click.Path(file_okay=False),
              help="The report's directory (created; an existing one must be empty or a "
                   "previous report).")
def report(sweep_file, baseline, runs, out, **params) -> None:
    """Write a capacity-planning report: index.html, report.md, the CSV and recommended plans."""
    from moeplan.planner import sweep as S
    from moeplan.report import build as R

    t0 = time.perf_counter()
    if sweep_file and (params["models"] or params["clusters"] or params["profiles"]):
        raise ConfigError("--sweep reports on a sweep file: give it, or --model/--cluster/"
                          "--profile to sweep now, not both")
    created = not Path(out).exists()
    folder = R.prepare_folder(out)  # a bad --out ends here, before a long sweep
    try:
        doc = S.load_document(Path(sweep_file)) if sweep_file else run_sweep(params)
        written = R.write_report(doc, folder, baseline=baseline, runs=[Path(r) for r in runs],
                                 jobs=params["jobs"])
    except BaseException:
        if created:  # the empty folder made above, nothing else (rmdir refuses a full one)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    click.echo(f"report: {folder / 'index.html'} ({len(written)} files, "
               f"{time.perf_counter() - t0:.1f} s)")
