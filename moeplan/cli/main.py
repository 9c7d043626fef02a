"""`moeplan`: search for a plan, list the model zoo and clusters, print schemas."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import click

from moeplan import __version__
from moeplan.cli import capacity
from moeplan.cli.errors import run
from moeplan.cli.options import finite, load_profile
from moeplan.cost_models.runtimes import DEEPSPEED_RUNTIMES, RUNTIME_HELP, RUNTIMES
from moeplan.spec.errors import CheckFailed, ConfigError, MoeplanError
from moeplan.spec.files import output_path, write_atomic
from moeplan.spec.model import PRINTABLE
from moeplan.spec.workload import MAX_COUNT, SLO_MS_RANGE


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moeplan")
def cli() -> None:
    """Plan DeepSpeed-MoE style parallelism per layer, predict its cost, and check it."""


def _load_cluster(cluster: str | None, profile: str | None):
    from moeplan.spec import load_cluster

    for flag, value in (("--cluster", cluster), ("--profile", profile)):
        if value is not None and not value.strip():
            raise ConfigError(f"{flag} is empty")
    if cluster and profile:
        raise ConfigError("give --cluster or --profile, not both")
    if profile:
        return load_profile(profile)
    return load_cluster(cluster or "ndv4-a100-40gb")


@cli.command()
@click.option("--model", "model_name", default="1.3b-pr-moe", show_default=True,
              help="Zoo name (see `moeplan models`) or a ModelSpec JSON file.")
@click.option("--gpus", type=int, default=64, show_default=True, help="Total GPUs.")
@click.option("--cluster", default=None,
              help="Built-in cluster (see `moeplan clusters`) [default: ndv4-a100-40gb].")
@click.option("--profile", default=None, help="ClusterProfile JSON file (e.g. from `moeplan profile`).")
@click.option("--mode", type=click.Choice(["train", "infer"]), default="train", show_default=True)
@click.option("--global-batch", type=click.IntRange(min=1, max=MAX_COUNT), default=None,
              help="Sequences per step (train, default 512) or in flight (infer, default = GPUs; "
                   "searched for --objective throughput).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Sequences per data-parallel rank per pass (train) [default: searched].")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Training sequence length [default: the model's positions, at most "
                   "4096].")
@click.option("--prompt-len", type=click.IntRange(min=1), default=None,
              help="Inference prompt tokens [default: 512].")
@click.option("--gen-len", type=click.IntRange(min=1), default=None,
              help="Inference generated tokens [default: 128].")
@click.option("--objective", type=click.Choice(["throughput", "latency"]), default=None,
              help="train: throughput; infer: latency (default) or throughput (under --slo-ms).")
@click.option("--slo-ms", type=click.FloatRange(*SLO_MS_RANGE), default=None,
              callback=finite,
              help="Infer throughput: the per-token latency limit in ms.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="[default: the cluster's]")
@click.option("--zero", "zero_stage", type=click.Choice(["0", "1", "2"]), default="1",
              show_default=True, help="ZeRO stage for training (optimizer / gradient partitioning).")
@click.option("--out", type=click.Path(dir_okay=False), default="plan.json", show_default=True,
              help="Where to write the plan.")
@click.option("--simulate-top", type=click.IntRange(min=0), default=16, show_default=True,
              help="Re-rank this many analytically best plans with the flow simulator (0: off).")
@click.option("--routing-skew", type=click.FloatRange(min=0, max=100), default=0.0,
              show_default=True, callback=finite,
              help="Expert-load skew the simulator samples (0: uniform routing).")
@click.option("--fix", "fixes", multiple=True, metavar="KEY=VALUE",
              help="Fix a degree instead of searching it (repeatable): tp, ep, es, edp, "
                   "a2a=flat|hierarchical, tp-coordinated=true|false, micro-batch, "
                   "recompute=true|false. Fixing all costs one configuration; an ep above a "
                   "layer's experts is clamped to them.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="moerun", show_default=True,
              help=RUNTIME_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
def search(model_name, gpus, cluster, profile, mode, global_batch, micro_batch, seq_len,
           prompt_len, gen_len, objective, slo_ms, dtype, zero_stage, simulate_top, routing_skew,
           out, fixes, runtime, as_json) -> None:
    """Find the fastest per-layer plan that fits, and write it as plan.json."""
    import time

    from moeplan.cli import render
    from moeplan.planner.planning import Request, plan
    from moeplan.planner.space import parse_fix
    from moeplan.spec import load_model

    t0 = time.perf_counter()
    spec = load_model(model_name)
    cl = _load_cluster(cluster, profile)
    req = Request(gpus=gpus, mode=mode, objective=objective, slo_ms=slo_ms,
                  global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len,
                  prompt_len=prompt_len, gen_len=gen_len, dtype=dtype, zero_stage=int(zero_stage),
                  simulate_top=simulate_top, routing_skew=routing_skew, fix=parse_fix(fixes),
                  runtime=runtime)
    the_plan, result = plan(spec, cl, req)
    write_atomic(out, the_plan.to_json())
    elapsed = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(render.summary(the_plan, result, out, elapsed), indent=2,
                              sort_keys=True))
    else:
        render.print_plan(the_plan, result, out, elapsed)


def _listing(kind: str, as_json: bool) -> None:
    from moeplan.cli import render

    rows = render.model_rows() if kind == "models" else render.cluster_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
    elif kind == "models":
        render.print_models(rows)
    else:
        render.print_clusters(rows)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the built-in model zoo with computed parameter counts."""
    _listing("models", as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def clusters(as_json: bool) -> None:
    """List the built-in cluster profiles."""
    _listing("clusters", as_json)


@cli.command()
@click.argument("what", type=click.Choice(["plan", "model", "cluster"]))
def schema(what: str) -> None:
    """Print the JSON Schema of a plan, model spec or cluster profile."""
    from moeplan.spec import ClusterProfile, ModelSpec
    from moeplan.spec.plan import Plan

    cls = {"plan": Plan, "model": ModelSpec, "cluster": ClusterProfile}[what]
    click.echo(json.dumps(cls.model_json_schema(), indent=2, sort_keys=True))


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), default="profile.json", show_default=True,
              help="Where to write the measured ClusterProfile.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Ranks to measure with [default: the GPUs NVML sees, or 4 CPU ranks].")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=None,
              help="Ranks per (emulated) node [default: the GPUs NVML sees; on CPU 2].")
@click.option("--backend", type=click.Choice(["auto", "nccl", "gloo"]), default="auto",
              show_default=True, help="auto: NCCL when CUDA is available, else gloo.")
@click.option("--base", default=None,
              help="Profile to take unmeasured constants from [default: local-cpu on CPU, "
                   "ndv4-a100-40gb on GPUs].")
@click.option("--name", default=None, help="Name of the profile [default: measured-HOST].")
@click.option("--quick", is_flag=True, help="Fewer sizes and repeats (about 3x faster).")
def profile(out, nproc, gpus_per_node, backend, base, name, quick) -> None:
    """Measure this host's GPUs (or CPU ranks): NVML topology, GEMM, memory and collective
    microbenchmarks (both all-to-all algorithms across nodes), and the runtime's own model as a
    probe (framework cost per phase, contention, exchanges inside a running step), fitted into
    a ClusterProfile for `moeplan search --profile`."""
    import platform

    output_path(out)  # a bad --out ends here, not after minutes of profiling
    from moeplan.runtime.host import visible
    from moeplan.runtime.launch import launch
    from moeplan.runtime.nvml import topology
    from moeplan.spec import load_cluster

    topo = topology()
    # the GPUs the ranks may use: NVML's, less those CUDA_VISIBLE_DEVICES hides (as moerun
    # counts them)
    gpus = len(visible(topo["gpus"])) if topo["available"] else 0
    if not gpus and backend == "nccl":
        raise ConfigError("--backend nccl needs GPUs, and none is visible"
                          + ("" if topo["available"] else f" (NVML: {topo['reason']})"))
    use_gpu = gpus > 0 and backend != "gloo"
    nproc = nproc or (gpus if use_gpu else 4)
    if use_gpu and nproc > gpus:
        raise ConfigError(f"--nproc {nproc} exceeds the {gpus} visible GPUs")
    G = gpus_per_node or (min(gpus, nproc) if use_gpu else min(2, nproc))
    if nproc % G:
        raise ConfigError(f"--nproc {nproc} is not a whole number of {G}-rank nodes")
    base = base or ("ndv4-a100-40gb" if use_gpu else "local-cpu")
    load_cluster(base)  # an unknown base fails here, in one line, before any rank starts
    name = name or f"measured-{platform.node() or 'host'}"
    if len(name) > 200 or not re.fullmatch(PRINTABLE, name):  # the profile's own rule, checked now
        raise ConfigError(f"--name {name!r}: 1-200 printable characters, no control characters")
    if topo["available"]:
        click.echo(f"NVML: {len(topo['gpus'])} x {topo['gpus'][0]['name']}, driver "
                   f"{topo['driver']}", err=True)
    else:
        click.echo(f"NVML: {topo['reason']}", err=True)
    click.echo(f"profiling {nproc} {'GPU ranks with NCCL' if use_gpu else 'CPU ranks with gloo'}"
               f" as {nproc // G} node(s) of {G}{' (quick)' if quick else ''}; writing {out}",
               err=True)
    args = ["--out", out, "--gpus-per-node", str(G), "--base", base, "--name", name,
            "--backend", "nccl" if use_gpu else "gloo"]  # the ranks decide nothing themselves
    if topo["available"]:
        import json as _json
        import tempfile

        tf = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        _json.dump(topo, tf)
        tf.close()
        args += ["--topology", tf.name]
    launch(nproc, "moeplan.calibrate.measure", args + (["--quick"] if quick else []))
    from moeplan.cli import render

    render.print_profile(load_cluster(out))


def _percent(ctx, param, value: float | None) -> float | None:
    """A limit in percent (finite, not negative) as a fraction."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a percentage (a finite number >= 0)")
    return value / 100


@cli.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.argument("run_path", metavar="RUN", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--max-error", type=float, default=None, callback=_percent, metavar="PCT",
              help="Fail (exit 1) when the step time (train) or per-token latency (infer) is "
                   "off by more than PCT percent.")
@click.option("--max-phase-error", type=float, default=None, callback=_percent, metavar="PCT",
              help="Fail (exit 1) when any phase, summed over the layers, is off by more than "
                   "PCT percent.")
def validate(plan_path: str, run_path: str, as_json: bool, max_error: float | None,
             max_phase_error: float | None) -> None:
    """Compare what RUN (run.json from moerun) measured with what PLAN predicted.

    Exit code 0, or 1 when a --max-error / --max-phase-error limit is broken (one line on stderr
    names the worst figure), or 2 for a bad input."""
    from moeplan.cli import render
    from moeplan.spec.plan import Plan
    from moeplan.spec.record import (
        RunRecord,
        band_check,
        check_pair,
        compare,
        limit_breaches,
        runtime_note,
        summarize,
    )
    from moeplan.spec.zoo import parse_file

    plan = parse_file(Path(plan_path), Plan)
    record = parse_file(Path(run_path), RunRecord)
    check_pair(plan, record)
    rows = compare(plan, record)
    summary = summarize(rows)
    breaches = limit_breaches(rows, max_error, max_phase_error)
    band = band_check(plan, record)
    note = runtime_note(plan)
    if note:
        click.echo(note, err=True)
    if as_json:
        click.echo(json.dumps({"plan": plan_path, "run": run_path, "summary": summary,
                               "rows": [r.model_dump() for r in rows], "band": band,
                               "limits": {"max_error": max_error,
                                          "max_phase_error": max_phase_error,
                                          "breaches": breaches}}, indent=2, sort_keys=True))
    else:
        render.print_comparison(plan, record.model_copy(update={"comparison": rows}), None)
        render.print_error_summary(summary)
        render.print_band_check(band)
    if breaches:
        more = f" (and {len(breaches) - 1} more)" if len(breaches) > 1 else ""
        raise CheckFailed(breaches[0] + more)


EXPORT_MARKER = "export.json"  # the summary; its presence marks a folder this command wrote


@cli.command("export")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--to", "engine", type=click.Choice(["deepspeed", "megatron-deepspeed",
                                                   "megatron-core"]), required=True,
              help="The engine whose configuration to write.")
@click.option("--out", default=None, metavar="DIR",
              help="Write the files here (created; or a folder an earlier export wrote) "
                   "[default: export-ENGINE].")
@click.option("--profile", default=None,
              help="The ClusterProfile the plan was made with, when it is not built in: the "
                   "closest configuration is costed on it.")
@click.option("--runtime", type=click.Choice(DEEPSPEED_RUNTIMES), default=None,
              help="Whose kernels cost a DeepSpeed engine's closest configuration: "
                   "deepspeed-sparse (DeepSpeed 0.19.4 and later, the default) or deepspeed "
                   "(0.19.3 and before: one-hot einsum dispatch).")
def export_cmd(plan_path: str, engine: str, out: str | None, profile: str | None,
               runtime: str | None) -> None:
    """Write PLAN as ENGINE's configuration: DeepSpeed's config JSON and each MoE layer's
    `deepspeed.moe.layer.MoE` arguments; Megatron-DeepSpeed's or Megatron-Core's
    `pretrain_gpt.py` arguments (args.txt, one per line). What the engine cannot express is a
    note, and the closest configuration it can run is costed beside the plan."""
    from moeplan.planner.export import closest, export, plan_cluster
    from moeplan.spec.files import folder_file, prepare_folder
    from moeplan.spec.plan import Plan
    from moeplan.spec.zoo import parse_file

    plan = parse_file(Path(plan_path), Plan)
    cluster = load_profile(profile) if profile is not None else None
    ex = export(plan, engine, runtime)
    base = plan_cluster(plan, cluster)
    summary: dict = {"engine": engine, "plan": plan_path, "notes": ex.notes,
                     "files": sorted(ex.files), "closest": None}
    headline = "step_time_s" if plan.workload.mode == "train" else "latency_s"
    if base is not None:
        try:
            near = closest(plan, ex, base)
        except MoeplanError as e:  # e.g. the engine's configuration does not fit
            summary["closest"] = {"runtime": ex.runtime, "error": str(e)}
        else:
            got, want = getattr(near.predicted, headline), getattr(plan.predicted, headline)
            summary["closest"] = {"runtime": ex.runtime, headline: got,
                                  "plan_" + headline: want,
                                  "memory_per_gpu_bytes": near.predicted.memory_per_gpu_bytes}
    folder = prepare_folder(f"export-{engine}" if out is None else out, EXPORT_MARKER,
                            "a moeplan export")
    contents = {**ex.files, EXPORT_MARKER: json.dumps(summary, indent=2, sort_keys=True) + "\n"}
    targets = {name: folder_file(folder, name) for name in contents}  # all checked, then written
    for name, content in contents.items():
        write_atomic(targets[name], content)
    for note in ex.notes:
        click.echo(f"note: {note}")
    c = summary["closest"]
    what = "step" if plan.workload.mode == "train" else "per-token latency"
    if c is None:
        click.echo(f"not costed: the plan's profile {plan.cluster.name} is not built in; give "
                   "it with --profile")
    elif "error" in c:
        click.echo(f"{engine}'s closest configuration: {c['error']}")
    else:
        got, want = c[headline], c["plan_" + headline]
        click.echo(f"{engine}'s closest configuration: {what} {got:.4g} s (the plan: "
                   f"{want:.4g} s, {100 * (got / want - 1):+.1f}%), costed with {ex.runtime}'s "
                   "kernels")
    click.echo(f"wrote {', '.join(sorted(ex.files))} and {EXPORT_MARKER} in {folder}")


cli.add_command(capacity.sweep)
cli.add_command(capacity.report)


def main() -> None:
    run(cli, "moeplan")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
