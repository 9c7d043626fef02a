"""Hostile input for every loader and option (hypothesis): exit code 0, or 2 with exactly one
line on stderr, within `fuzzing.LIMIT_S`. A few examples per target here; `python bench/fuzz.py`
draws many more and counts the outcomes."""

from __future__ import annotations

import json

import fuzzing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeplan.cli.moerun import main as moerun_main

TARGETS = ["model spec", "cluster profile", "plan (validate)", "plan (moerun)",
           "MoS plan (moerun)", "moerun options", "plan (export)", "export options",
           "Hugging Face config",
           "run record", "search options",
           "sweep options", "sweep file", "data file"]
OPTIONS_AND_PATHS = ["search names and paths", "sweep workload options", "report options",
                     "profile options", "validate options", "models, clusters, schema",
                     "moerun paths"]  # fewer examples each: 20
# what the work folder may hold: the prepared and drawn files, the named outputs
WRITTEN = {"plan.json", "run.json", "plan.out.json", "p.json", "-", "fuzz-model.json",
           "fuzz-cluster.json", "fuzz-plan.json", "fuzz-run.json", "sweep.json", "sweep.out.csv",
           "s.csv", "s.json", "fuzz-sweep.json", "report.out", "fuzz-data.txt", "fuzz-data.npy",
           "fuzz-data.bin", "ckpt", "ckpt.lock", "mos.json", "export.out", "fuzz-hf.json",
           "run.plan.json", "hostile", "run.out.plan.json", "nope.plan.json"}


class Work(tuple):
    def __repr__(self) -> str:  # hypothesis prints the fixture with every failure: keep it short
        return f"Work({self[0]})"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    fuzzing.prepare(d)
    return Work((d, fuzzing.targets(d)))


def _fed(work, target: str, data) -> None:
    d, targets = work
    strategy, feed = targets[target]
    drawn = data.draw(strategy, label=target)
    got = feed(drawn)
    assert got.kind == "clean", (got.kind, got.why, got.rc, got.err[-500:])
    # nothing written but the named outputs and the drawn files
    assert {p.name for p in d.iterdir()} <= WRITTEN


def _drawn(targets: list[str], examples: int):
    """A test drawing `examples` hostile inputs for each of `targets` (one test per group keeps
    hypothesis's example database apart per target)."""
    def wrap(test):
        test = given(data=st.data())(test)
        test = settings(max_examples=examples, deadline=None, derandomize=False,
                        suppress_health_check=[HealthCheck.function_scoped_fixture,
                                               HealthCheck.too_slow])(test)
        return pytest.mark.parametrize("target", targets)(test)
    return wrap


@_drawn(TARGETS, 30)
def test_hostile_input_is_rc_0_or_one_line_rc_2(work, target, data):
    _fed(work, target, data)


@_drawn(OPTIONS_AND_PATHS, 20)
def test_hostile_options_and_paths_are_rc_0_or_one_line_rc_2(work, target, data):
    _fed(work, target, data)


@pytest.mark.parametrize("count", [0, -1, 10**300], ids=["zero", "negative", "301-digits"])
def test_hugging_face_counts_at_the_edges(work, count):
    """Every integer key of each family's config at zero, negative and 301 digits: hypothesis
    reaches these rarely in a few examples."""
    _, targets = work
    _, feed = targets["Hugging Face config"]
    for base in fuzzing.hf_bases():
        for key in sorted(k for k, v in base.items() if type(v) is int):
            got = feed(json.dumps(dict(base, **{key: count})))
            assert got.kind == "clean", (base["model_type"], key, got.why, got.rc, got.err[-300:])


@pytest.mark.parametrize("case", [("model", "../../x"), ("model", "a/b"), ("cluster", "/etc/x"),
                                  ("options", "deep"), ("target", "deep")], ids="-".join)
def test_sweep_file_names_and_nesting(work, case):
    """A sweep file that agrees with itself under a model or cluster name that is a path (the
    report names files after it), or with 800 levels of nesting where it keeps any object."""
    d, targets = work
    _, feed = targets["sweep file"]
    sweep = json.loads((d / "sweep.json").read_text())
    where, what = case
    if what == "deep":
        sweep[where]["x"] = fuzzing.DEEP
        text = json.dumps(sweep).replace(json.dumps(fuzzing.DEEP), fuzzing.DEEP_JSON)
    else:
        old = {"model": "tiny-pr-moe", "cluster": "local-cpu"}[where]
        text = json.dumps(fuzzing.rename(sweep, old, what))
    got = feed(text)
    assert got.kind == "clean", (case, got.why, got.rc, got.err[-300:])
    assert {p.name for p in d.iterdir()} <= WRITTEN


@pytest.mark.parametrize("data", ["/", "hostile", "hostile/dir", "hostile/fifo",
                                  "hostile/link-dir", "hostile/dangling", "hostile/fifo-idx.bin",
                                  "hostile/fifo-idx.idx", "hostile/garbage-idx.bin"])
def test_moerun_data_paths(work, data):
    """`moerun --data` at each hostile path (`moerun paths` draws them among many options):
    refused, but for `/` (a directory, however large)."""
    _, targets = work
    _, feed = targets["moerun paths"]
    got = feed(["--plan", "plan.json", "--data", data, "--print-torchrun"])
    assert got.kind == "clean", (data, got.kind, got.why, got.rc, got.err[-300:])
    assert got.rc == 2 or data == "/", (data, "accepted")


def test_moerun_data_empty_is_refused(work, tmp_path):
    """`--data ""` names no file: refused, never read as the working directory's text (the
    fuzz folder's binary files would hide that)."""
    d, _ = work
    (tmp_path / "plan.json").write_bytes((d / "plan.json").read_bytes())
    (tmp_path / "notes.txt").write_text("text that is not a corpus\n" * 4000)
    got = fuzzing.outcome(moerun_main, ["--plan", "plan.json", "--data", "", "--print-torchrun"],
                          tmp_path)
    assert got.kind == "clean" and got.rc == 2, (got.kind, got.why, got.rc, got.err[-300:])
