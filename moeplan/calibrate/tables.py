"""The probe's phase tables: seconds per call of each layer's phase, forward and backward, keyed by
`Timed`; and their form in the profile's raw measurements (`<profile>.raw.json`, which
`build_profile` reads back), where a key is "f:<layer>:<phase>" or "b:<layer>:<phase>". This is
the one place that writes or reads that form."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from moeplan.spec.phases import HEAD_LAYER, LayerPhase, Phase


class Direction(str, Enum):
    FORWARD = "f"
    BACKWARD = "b"


class Timed(NamedTuple):
    """One entry of a phase table: one layer's phase, forward or backward."""

    direction: Direction
    layer: int | str  # 0-based layer index, or HEAD_LAYER
    phase: Phase


Table = dict[Timed, float]


def from_timer(forward_s: dict[LayerPhase, float], backward_s: dict[LayerPhase, float],
               calls: int) -> Table:
    """A phase timer's forward and backward seconds as a table, per call of `calls`."""
    return {Timed(direction, *key): v / calls
            for direction, seconds in ((Direction.FORWARD, forward_s),
                                       (Direction.BACKWARD, backward_s))
            for key, v in seconds.items()}


def seconds(table: Table, layer: int | str, phase: Phase) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's phase in `table`; 0 where it has none."""
    return (table.get(Timed(Direction.FORWARD, layer, phase), 0.0),
            table.get(Timed(Direction.BACKWARD, layer, phase), 0.0))


def to_raw(table: Table) -> dict[str, float]:
    """The table as the raw measurements store it, in the same order."""
    return {f"{Direction(k.direction).value}:{k.layer}:{Phase(k.phase).value}": v
            for k, v in table.items()}


def from_raw(raw: dict[str, float]) -> Table:
    """A stored table (`to_raw`) read back, in the same order."""
    out = {}
    for key, v in raw.items():
        direction, layer, phase = key.split(":")
        out[Timed(Direction(direction), layer if layer == HEAD_LAYER else int(layer),
                  Phase(phase))] = v
    return out
