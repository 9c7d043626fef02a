"""`moerun`: execute a plan with PyTorch on this host, then compare measured with predicted.

Ranks are started by PyTorch's own elastic launcher (torch.distributed.run, i.e. torchrun) running
`moeplan.runtime.worker`; `--print-torchrun` prints the same launch for several nodes.
Everything the user can get wrong is checked here, before any rank starts.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from moeplan.cli.errors import run
from moeplan.cli.options import finite
from moeplan.spec.errors import ConfigError

BYTE_VOCAB = 256  # runtime/data.py: the corpus is bytes
MAX_RANK_SEQUENCES = 1 << 20  # sequences one rank runs per step: beyond, a step never ends


def _load_plan(path: str, mode: str | None):
    """(plan to run, whether it was re-costed for `mode`)."""
    from moeplan.planner.planning import recost
    from moeplan.spec.plan import Plan
    from moeplan.spec.zoo import parse_file

    plan = parse_file(Path(path), Plan)
    if mode is not None and mode != plan.workload.mode:
        return recost(plan, mode), True
    return plan, False


def _worker_args(plan_file: str, mode: str, steps: int, warmup: int, out: str, lr: float,
                 seed: int, save: str | None, load: str | None, timeout: float,
                 fault: str | None, data: str | None, tokenizer: str | None,
                 schedule_steps: int | None, teacher: str | None = None,
                 kd_steps: int | None = None) -> list[str]:
    args = ["--plan", plan_file, "--mode", mode, "--steps", str(steps), "--warmup", str(warmup),
            "--out", out, "--lr", str(lr), "--seed", str(seed), "--timeout", str(timeout)]
    for flag, value in (("--save", save), ("--load", load), ("--fault", fault),
                        ("--data", data), ("--tokenizer", tokenizer),
                        ("--schedule-steps", schedule_steps and str(schedule_steps)),
                        ("--teacher", teacher),
                        ("--kd-steps", None if kd_steps is None else str(kd_steps))):
        if value:
            args += [flag, value]
    return args


def _check_teacher(plan, mode: str, teacher: str | None, kd_steps: int | None) -> str | None:
    """Distillation's options against the plan, and the teacher's checkpoint, before any rank
    starts; what to say about it."""
    if (teacher is not None or kd_steps is not None) and (plan.teacher is None
                                                          or mode != "train"):
        raise ConfigError(f"--teacher and --kd-steps train a Mixture-of-Students; this is a "
                          f"{mode} plan of {plan.model.name}, which distils from no teacher")
    if plan.teacher is None or mode != "train" or kd_steps == 0:
        return None
    name = plan.teacher.model.name
    if teacher is None:
        raise ConfigError(f"{plan.model.name} distils from {name}: give a checkpoint of it "
                          f"with --teacher DIR (moerun --save on a {name} plan), or --kd-steps 0 "
                          "to train without distillation")
    from moeplan.runtime.checkpoint import check_model, read_manifest, verify

    check_model(read_manifest(teacher), plan.teacher.model, teacher)
    verify(teacher)
    return (f"moerun: distilling from {name} ({teacher})"
            + (f" for {kd_steps} steps" if kd_steps is not None else ""))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default="plan.json",
              show_default=True, help="Plan written by `moeplan search`.")
@click.option("--mode", type=click.Choice(["train", "infer"]), default=None,
              help="Train or serve [default: the plan's mode; the other mode is re-costed with "
                   "the same degrees].")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Measured training steps, or measured generations (infer), after warm-up.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Steps (generations) run first and left out of the measurements.")
@click.option("--out", type=click.Path(dir_okay=False), default="run.json", show_default=True,
              help="Where to write the measurements next to the predictions.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Ranks to start on this host [default: the plan's GPU count].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True, max=1.0), default=3e-3,
              callback=finite,
              show_default=True, help="Peak AdamW learning rate: linear warm-up over the first "
                                      "tenth of the steps, cosine decay to a tenth of it.")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True,
              help="Weight initialisation and data order.")
@click.option("--save", type=click.Path(file_okay=False), default=None,
              help="Write a plan-independent checkpoint here at the end.")
@click.option("--load", type=click.Path(file_okay=False), default=None,
              help="Start from a checkpoint written under any plan of the same model.")
@click.option("--timeout", type=click.FloatRange(min=1, max=86400), default=120.0,
              show_default=True, callback=finite,
              help="Seconds a collective may wait for a peer before the job fails.")
@click.option("--print-torchrun", is_flag=True,
              help="Print the equivalent multi-node torchrun command and exit.")
@click.option("--force", is_flag=True,
              help="Start the ranks even when this host looks too small for them (more ranks "
                   "than GPUs or 2 per core, or more predicted memory than is available).")
@click.option("--schedule-steps", type=click.IntRange(min=1, max=2**40), default=None,
              help="Length of the learning-rate schedule in steps [default: this run's last "
                   "step; resuming: the checkpoint's]. Give the whole run's when you stop and "
                   "resume, so that the halves equal one straight run.")
@click.option("--data", default=None, metavar="PATH",
              help="Training text (a UTF-8 file or a directory of them, byte-level), token ids "
                   "(.npy, or Megatron .bin/.idx) [default: the Python standard library's "
                   "sources].")
@click.option("--tokenizer", default=None, metavar="tokenizer.json",
              help="Encode --data's text with this `tokenizers` tokenizer instead of bytes.")
@click.option("--teacher", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Mixture-of-Students: the teacher's checkpoint (a moerun --save of the "
                   "model the student's spec distils from); its forward gives the soft labels.")
@click.option("--kd-steps", type=click.IntRange(min=0, max=2**40), default=None,
              help="Distil for this many steps, then train on the LM loss alone (staged KD) "
                   "[default: the spec's stop_step, else throughout]; 0: no teacher.")
@click.option("--fault", default=None, hidden=True, help="RANK:STEP: that rank exits (tests).")
def cli(plan_path, mode, steps, warmup, out, nproc, lr, seed, save, load, timeout,
        print_torchrun, force, schedule_steps, data, tokenizer, teacher, kd_steps, fault) -> None:
    """Execute PLAN with torch.distributed (gloo on CPU, NCCL on CUDA), measure every layer and
    phase, write OUT, and print measured against predicted."""
    plan, recosted = _load_plan(plan_path, mode)
    notes: list[str | None] = []  # said once every check has passed: an error is one line
    mode = plan.workload.mode
    world = plan.cluster.gpus
    if nproc is not None and nproc != world:
        raise ConfigError(f"plan {plan_path} is for {world} ranks, --nproc is {nproc}")
    per_rank = plan.workload.global_batch // plan.parallel.dp
    if per_rank > MAX_RANK_SEQUENCES:
        raise ConfigError(f"the plan gives each rank {per_rank:,} sequences per step; moerun "
                          f"runs at most {MAX_RANK_SEQUENCES:,}")
    if plan.model.vocab_size < BYTE_VOCAB and data is None:
        raise ConfigError(f"moerun's default corpus is bytes ({BYTE_VOCAB} symbols); the plan's "
                          f"model has vocab_size {plan.model.vocab_size}: give token ids that "
                          "fit it with --data")
    if data is not None or tokenizer is not None:
        from moeplan.runtime.data import open_corpus

        corpus = open_corpus(data, tokenizer, plan.model.vocab_size, plan.workload.seq_len)
        notes.append(f"moerun: data: {corpus.source}")  # checked before any rank starts
    notes.append(_check_teacher(plan, mode, teacher, kd_steps))
    from moeplan.spec.record import runtime_note

    note = runtime_note(plan)
    notes.append(note and f"moerun: {note}")
    if load:
        from moeplan.runtime.checkpoint import check_model, read_manifest, verify

        check_model(read_manifest(load), plan.model, load)
        manifest = verify(load)  # every shard checked here, before any rank starts
        from moeplan.runtime.checkpoint import position

        pos = position(manifest)
        if mode == "train" and pos is not None:
            notes.append(f"moerun: resuming at step {pos.step}: weights, optimizer state, the "
                         f"{pos.schedule_steps}-step learning-rate schedule and the data order "
                         f"(seed {pos.seed})")
            if seed != pos.seed:
                notes.append(f"moerun: note: --seed {seed} draws other data than the "
                             f"checkpoint's run (seed {pos.seed})")
        elif mode == "train" and manifest.get("step"):
            notes.append("moerun: note: the checkpoint holds weights only; optimizer state and "
                         "learning-rate schedule start again from step 0")
    if save is not None:
        from moeplan.runtime.checkpoint import check_save_target

        check_save_target(save)
    from moeplan.spec.files import derived_output, output_path, write_atomic

    output_path(out)  # a bad --out ends here, not after the run
    if recosted:  # the ranks, and `moeplan validate` later, read the re-costed plan from here
        recosted_file = derived_output(Path(out).with_suffix(".plan.json"),
                                       f"the plan re-costed for --mode {mode}")
    if fault is not None and (len(fault.split(":")) != 2
                              or not all(x.isdigit() for x in fault.split(":"))):
        raise ConfigError(f"--fault must be RANK:STEP, got {fault!r}")
    if fault is not None and int(fault.split(":")[0]) >= world:
        raise ConfigError(f"--fault {fault}: the plan has ranks 0-{world - 1}")
    if not (force or print_torchrun):
        from moeplan.runtime.host import refusal, this_host

        why = refusal(world, plan.predicted.memory_per_gpu_bytes, this_host())
        if why:
            raise ConfigError(f"{why}; for a cluster, print its launch with `moerun --plan "
                              f"{plan_path} --print-torchrun`, or start here anyway with --force")
    for note in notes:
        if note:
            click.echo(note, err=True)
    plan_file = plan_path
    if recosted:
        plan_file = str(recosted_file)
        write_atomic(recosted_file, plan.to_json())
        click.echo(f"moerun: the plan re-costed for --mode {mode} is {plan_file}", err=True)
    wargs = _worker_args(plan_file, mode, steps, warmup, out, lr, seed, save, load, timeout,
                         fault, data and os.path.abspath(data),
                         tokenizer and os.path.abspath(tokenizer), schedule_steps,
                         teacher and os.path.abspath(teacher), kd_steps)
    if print_torchrun:
        G, nodes = plan.cluster.gpus_per_node, plan.cluster.nodes
        per_node = min(G, world)
        import secrets

        # a fresh rendezvous id per job: a fixed one lets another host join (or feed) the store
        click.echo(shlex.join(
            ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", "${MASTER_ADDR}:29500",
             "--rdzv-id", f"moerun-{secrets.token_hex(8)}", "-m", "moeplan.runtime.worker",
             *wargs]).replace("'${MASTER_ADDR}:29500'", "${MASTER_ADDR}:29500"))
        click.echo("moerun: note: torch.distributed's rendezvous store has no authentication; "
                   "make port 29500 on MASTER_ADDR reachable only from this job's hosts",
                   err=True)
        return
    click.echo(f"moerun: {mode} {plan.model.name} on {world} ranks "
               f"(tp={plan.parallel.tp} dp={plan.parallel.dp}), {steps} measured "
               f"{'steps' if mode == 'train' else 'generations'} after {warmup} warm-up",
               err=True)
    from moeplan.runtime.launch import launch

    launch(world, "moeplan.runtime.worker", wargs)
    from moeplan.cli.render import print_band_check, print_comparison, print_routing
    from moeplan.spec.record import RunRecord, band_check

    record = RunRecord.model_validate_json(Path(out).read_text())
    print_comparison(plan, record, out)
    print_band_check(band_check(plan, record))
    print_routing(record)


def main() -> None:
    run(cli, "moerun")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
