"""`moerun`: execute a plan. This release checks a plan file against its schema and world size;
execution with torch.distributed is the runtime's work (see README, "Status")."""

from __future__ import annotations

import sys

import click

from moeplan.cli.errors import run
from moeplan.errors import ConfigError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default="plan.json",
              show_default=True, help="Plan written by `moeplan search`.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Ranks to start on this host [default: the plan's GPU count].")
def cli(plan_path: str, nproc: int | None) -> None:
    """Check PLAN and execute it with PyTorch (execution: not in this release)."""
    from pathlib import Path

    from moeplan.planner.plan import Plan
    from moeplan.profiles.zoo import parse_file

    p = parse_file(Path(plan_path), Plan)
    if nproc is not None and nproc != p.cluster.gpus:
        raise ConfigError(f"plan {plan_path} is for {p.cluster.gpus} ranks, --nproc is {nproc}")
    raise ConfigError(f"plan {plan_path} is valid ({p.cluster.gpus} ranks, tp={p.parallel.tp}); "
                      "executing plans is not implemented in this release")


def main() -> None:
    run(cli, "moerun")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
