"""The phase vocabulary as keys: a `Phase` member stands for its name in every dict, JSON file and
pydantic contract, and the probe's phase tables keep their stored form in the raw measurements."""

from __future__ import annotations

import json

from moeplan.calibrate.tables import Direction, Timed, from_raw, to_raw
from moeplan.spec.phases import HEAD_PHASE, LayerPhase, Phase
from moeplan.spec.record import LayerMeasure


def test_a_phase_key_writes_as_its_name():
    typed = {Phase.TP_COMM: 2.0, Phase.ATTENTION: 1.0, Phase.HEAD: 3.0}
    named = {"tp_comm": 2.0, "attention": 1.0, "head": 3.0}
    assert typed == named and {"mlp": 1}[Phase.MLP] == 1
    for kwargs in ({}, {"indent": 2, "sort_keys": True}):
        assert json.dumps(typed, **kwargs) == json.dumps(named, **kwargs)
    a = LayerMeasure(index=1, kind="moe", phases_s=typed, phases_max_s=typed, dropped=0, routed=0)
    b = LayerMeasure(index=1, kind="moe", phases_s=named, phases_max_s=named, dropped=0, routed=0)
    assert a.model_dump_json(indent=2) == b.model_dump_json(indent=2)
    assert all(type(k) is str for k in a.phases_s)
    assert f"moe.{Phase.EXPERTS}" == "moe.experts"


def test_phase_tables_keep_their_stored_form():
    table = {Timed(Direction.FORWARD, 0, Phase.ATTENTION): 1.0,
             Timed(Direction.BACKWARD, 2, Phase.EXPERTS): 2.0,
             Timed(Direction.FORWARD, *HEAD_PHASE): 3.0}
    raw = to_raw(table)
    assert list(raw.items()) == [("f:0:attention", 1.0), ("b:2:experts", 2.0),
                                 ("f:head:head", 3.0)]
    assert list(from_raw(raw).items()) == list(table.items())
    assert Timed(Direction.FORWARD, *LayerPhase(0, Phase.ATTENTION)) in from_raw(raw)
