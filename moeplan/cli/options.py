"""What several commands' options share: a finite-number check and reading a profile file."""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from moeplan.spec.errors import ConfigError


def finite(ctx, param, value: float | None) -> float | None:
    """A click callback: NaN passes click's ranges (every comparison with it is false), so a
    number option refuses it here."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


def load_profile(path: str):
    """The ClusterProfile in `path` (`--profile`)."""
    from moeplan.spec import ClusterProfile
    from moeplan.spec.zoo import parse_file

    if not os.path.lexists(path):  # a link loop exists, though nothing it names does
        raise ConfigError(f"--profile {path}: no such file")
    return parse_file(Path(path), ClusterProfile)
