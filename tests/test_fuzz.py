"""Hostile input for every loader and `moeplan search` option (hypothesis): exit code 0, or 2
with exactly one line on stderr, within `fuzzing.LIMIT_S`. A few examples per target here; `python
bench/fuzz.py` draws many more and counts the outcomes."""

from __future__ import annotations

import fuzzing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TARGETS = ["model spec", "cluster profile", "plan (validate)", "plan (moerun)",
           "MoS plan (moerun)", "moerun options", "plan (export)", "export options",
           "Hugging Face config",
           "run record", "search options",
           "sweep options", "sweep file", "data file"]


class Work(tuple):
    def __repr__(self) -> str:  # hypothesis prints the fixture with every failure: keep it short
        return f"Work({self[0]})"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    fuzzing.prepare(d)
    return Work((d, fuzzing.targets(d)))


@pytest.mark.parametrize("target", TARGETS)
@settings(max_examples=30, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_input_is_rc_0_or_one_line_rc_2(work, target, data):
    d, targets = work
    strategy, feed = targets[target]
    drawn = data.draw(strategy, label=target)
    got = feed(drawn)
    assert got.kind == "clean", (got.kind, got.why, got.rc, got.err[-500:])
    # nothing written but the named outputs and the drawn files
    allowed = {"plan.json", "run.json", "plan.out.json", "p.json", "-", "fuzz-model.json",
               "fuzz-cluster.json", "fuzz-plan.json", "fuzz-run.json", "sweep.json",
               "sweep.out.csv", "s.csv", "s.json", "fuzz-sweep.json", "report.out",
               "fuzz-data.txt", "fuzz-data.npy", "fuzz-data.bin", "ckpt", "ckpt.lock",
               "mos.json", "export.out", "fuzz-hf.json", "run.plan.json"}
    assert {p.name for p in d.iterdir()} <= allowed
