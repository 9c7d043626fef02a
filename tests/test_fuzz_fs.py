"""Hostile file systems at every output path the program writes: a link to a victim outside, a
dangling link, a FIFO or a directory already there. The promise: exit code 0, or 2 with one
line on stderr, within a bound; the victim's bytes unchanged, nothing created through the
dangling link, the FIFO and the directory still there. An explicit `--out` that is a link to a
regular file is written through (documented, tests/test_file_safety.py): not asserted here."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import fuzzing
import pytest

from moeplan.cli.main import main as moeplan_main
from moeplan.cli.moerun import main as moerun_main
from moeplan.spec.errors import MoeplanError

LIMIT_S = 10.0  # a clean answer here takes < 3 s; a FIFO opened for writing blocks forever
KINDS = ["link", "dangling", "fifo", "dir"]
EXPLICIT = ["dangling", "fifo", "dir"]  # an explicit --out: a link to a file is written through
SEARCH = ["search", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "2",
          "--global-batch", "8", "--seq-len", "32", "--simulate-top", "2"]
SWEEP = ["sweep", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "2",
         "--global-batch", "8", "--seq-len", "32", "--simulate-top", "2", "--jobs", "1"]
REPORT = ["report", "--sweep", "sweep.json", "--jobs", "1"]
EXPORT = ["export", "plan.json", "--to", "deepspeed"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """plan.json, sweep.json, a report (report/) and an export (export/) of tiny-pr-moe: what a
    second run writes into or beside; made once, copied for each case."""
    d = tmp_path_factory.mktemp("fs-made")
    for argv in (SEARCH + ["--out", "plan.json"], SWEEP + ["--out", "sweep.json"],
                 REPORT + ["--out", "report"], EXPORT + ["--out", "export"]):
        got = fuzzing.outcome(moeplan_main, argv, d)
        assert got.rc == 0, got
    return d


@pytest.fixture
def work(tmp_path, made) -> Path:
    shutil.copytree(made, tmp_path / "work", symlinks=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_bytes(b"the victim's bytes\n")
    return tmp_path / "work"


def _tree(folder: Path) -> dict:
    """Every entry under `folder` (links not followed): its kind and a regular file's bytes."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for n in dirs + names:
            p = Path(root) / n
            out[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() and not p.is_symlink()
                                               else stat.S_IFMT(p.lstat().st_mode))
    return out


def _place(path: Path, kind: str, victim: Path, folder: bool) -> None:
    """`kind` at `path`: for an output folder a link names the victim directory, for a file its
    file; a dangling link names a file in the victim directory (with the same suffix)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    if kind == "link":
        path.symlink_to(victim if folder else victim / "secret.txt")
    elif kind == "dangling":
        path.symlink_to(victim / ("created-through-a-link" + path.suffix))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
        (path / "keep.txt").write_bytes(b"the user's file\n")


def _check(got, path: Path, kind: str, victim: Path, before: dict) -> None:
    assert got.kind == "clean", (got.kind, got.why, got.rc, got.err[-500:])
    assert _tree(victim) == before, "the victim directory changed"
    if kind in ("link", "dangling"):
        assert path.is_symlink(), "the link was replaced"
    elif kind == "fifo":
        assert stat.S_ISFIFO(path.lstat().st_mode), "the FIFO was replaced"
    else:
        assert path.is_dir() and not path.is_symlink(), "the directory was replaced"
        assert (path / "keep.txt").read_bytes() == b"the user's file\n"


def _run(main, argv, work: Path, at: str, kind: str, folder: bool = False):
    path, victim = work / at, work.parent / "victim"
    _place(path, kind, victim, folder)
    before = _tree(victim)
    got = fuzzing.outcome(main, argv, work, limit_s=LIMIT_S)
    _check(got, path, kind, victim, before)


# ---- explicit result files: --out of search, sweep, moerun ----

@pytest.mark.parametrize("kind", EXPLICIT)
def test_search_out(work, kind):
    _run(moeplan_main, SEARCH + ["--out", "p.json"], work, "p.json", kind)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
@pytest.mark.parametrize("kind", EXPLICIT)
def test_sweep_out(work, kind, suffix):
    _run(moeplan_main, SWEEP + ["--out", f"s{suffix}"], work, f"s{suffix}", kind)


@pytest.mark.parametrize("kind", EXPLICIT)
def test_moerun_out(work, kind):
    """Checked before --print-torchrun returns (the run writes it later)."""
    _run(moerun_main, ["--plan", "plan.json", "--out", "r.json", "--print-torchrun"], work,
         "r.json", kind)


# ---- files the program names itself ----

@pytest.mark.parametrize("kind", KINDS)
def test_moerun_recosted_plan(work, kind):
    """`moerun --mode X` writes the plan re-costed for X as `<out>.plan.json` before
    --print-torchrun returns."""
    _run(moerun_main, ["--plan", "plan.json", "--mode", "infer", "--out", "r.json",
                       "--print-torchrun"], work, "r.plan.json", kind)


# ---- output folders, new and written before ----

@pytest.mark.parametrize("kind", KINDS)
def test_report_out(work, kind):
    _run(moeplan_main, REPORT + ["--out", "new"], work, "new", kind, folder=True)


@pytest.mark.parametrize("at, kind", [
    ("index.html", "link"), ("index.html", "dangling"), ("report.md", "fifo"),
    ("sweep.csv", "dir"), ("plans/tiny-pr-moe-local-cpu-train-2gpus.json", "link"),
    ("plans/tiny-pr-moe-local-cpu-train-2gpus.json", "dangling"), ("plans", "link"),
    (".moeplan-report", "link")])
def test_report_into_an_earlier_report(work, at, kind):
    """A report folder written before, with one of its files (or its plans folder) replaced."""
    _run(moeplan_main, REPORT + ["--out", "report"], work, f"report/{at}", kind,
         folder=at == "plans")


@pytest.mark.parametrize("kind", KINDS)
def test_export_out(work, kind):
    _run(moeplan_main, EXPORT + ["--out", "new"], work, "new", kind, folder=True)


@pytest.mark.parametrize("at", ["ds_config.json", "export.json"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_into_an_earlier_export(work, kind, at):
    """An export folder written before, with one of its files (or its marker) replaced."""
    _run(moeplan_main, EXPORT + ["--out", "export"], work, f"export/{at}", kind)


# ---- checkpoints: --save's folder and its lock ----

@pytest.mark.parametrize("kind", KINDS)
def test_moerun_save(work, kind):
    """Checked before --print-torchrun returns (the ranks save at the end)."""
    _run(moerun_main, ["--plan", "plan.json", "--save", "ckpt", "--print-torchrun"], work,
         "ckpt", kind, folder=True)


@pytest.mark.parametrize("kind", KINDS)
def test_moerun_save_lock(work, kind):
    _run(moerun_main, ["--plan", "plan.json", "--save", "ckpt", "--print-torchrun"], work,
         "ckpt.lock", kind)


def _save_main():
    """What rank 0 of `moerun --save ckpt` does at the end of a run (the runtime's own guard,
    as the launcher reports its errors): save tiny-pr-moe's weights."""
    from moeplan.runtime import checkpoint
    from moeplan.runtime.model import GPT
    from moeplan.spec import load_model

    try:
        checkpoint.save(GPT(load_model("tiny-pr-moe")), "ckpt", 1, "d", 0, 1)
    except MoeplanError as e:
        print(f"moerun: error: {e}", file=sys.stderr)
        sys.exit(2)


@pytest.mark.parametrize("at", ["ckpt", "ckpt.lock"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_save(work, kind, at):
    _run(_save_main, [], work, at, kind, folder=at == "ckpt")
