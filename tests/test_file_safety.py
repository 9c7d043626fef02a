"""Never replace, delete or follow into anything the program did not create: result files
(`--out`) and checkpoint directories (`--save`)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from moeplan.cli import main as moeplan_cli
from moeplan.cli import moerun as moerun_cli
from moeplan.errors import ConfigError
from moeplan.files import output_path, write_atomic
from test_cli import invoke


def test_write_atomic_writes_through_a_link_and_leaves_nothing_behind(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # the file's mode is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


@pytest.mark.parametrize("target, message", [
    ("/dev/full", "not a regular file"), ("", "is empty"), ("   ", "is empty"),
    ("missing/plan.json", "does not exist"), (".", "not a regular file"),
])
def test_output_paths_that_are_refused(tmp_path, monkeypatch, target, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        output_path(target)


def test_search_never_replaces_a_device_or_follows_a_link_to_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("dev").symlink_to("/dev/null")
    for out in ("/dev/full", "dev", "", "nowhere/p.json"):
        code, _, err = invoke(moeplan_cli, ["search", "--out", out], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1, (out, err)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and Path("dev").is_symlink()


def test_profile_checks_its_output_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke(moeplan_cli, ["profile", "--out", "missing/p.json"], monkeypatch,
                          capsys)
    assert code == 2 and "folder missing does not exist" in err


def test_moerun_save_refuses_what_is_not_its_checkpoint(tmp_path, monkeypatch, capsys):
    """`--save` over a folder of the user's (or the working directory, or a link) ends before
    any rank starts, and the folder is untouched."""
    monkeypatch.chdir(tmp_path)
    code, _, _ = invoke(moeplan_cli, ["search", "--model", "tiny-pr-moe", "--gpus", "2",
                                      "--cluster", "local-cpu"], monkeypatch, capsys)
    assert code == 0
    Path("p").mkdir()
    Path("p/t.txt").write_text("x")
    Path("q.tmp").mkdir()
    Path("q.tmp/mine").write_text("y")
    Path("ln").symlink_to("p")
    for save, what in (("p", "p exists"), (str(tmp_path), "exists"), ("q", "q.tmp exists"),
                       ("ln", "ln exists"), ("", "--save is empty")):
        code, _, err = invoke(moerun_cli, ["--plan", "plan.json", "--steps", "1", "--save",
                                           save], monkeypatch, capsys)
        assert code == 2 and what in err and err.count("\n") == 1, (save, err)
    assert Path("p/t.txt").read_text() == "x" and Path("q.tmp/mine").read_text() == "y"
    assert Path("plan.json").exists() and not Path("run.json").exists()


def test_checkpoint_save_replaces_only_its_own(tmp_path):
    """The runtime's own guard (what `moerun` checked may change before the save): a partial
    directory it left is cleaned, a checkpoint it wrote is replaced, anything else refused."""
    import torch.distributed  # noqa: F401  (checkpoint imports it)

    from moeplan.profiles import load_model
    from moeplan.runtime import checkpoint
    from moeplan.runtime.model import GPT

    model = GPT(load_model("tiny-pr-moe"))
    ckpt = tmp_path / "ckpt"
    partial = tmp_path / "ckpt.tmp"
    partial.mkdir()
    (partial / checkpoint.PARTIAL).touch()  # an interrupted save of ours
    checkpoint.save(model, ckpt, 1, "d", 0, 1)
    checkpoint.save(model, ckpt, 2, "d", 0, 1)  # over its own checkpoint
    assert checkpoint.read_manifest(ckpt)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a moeplan checkpoint"):
        checkpoint.save(model, other, 1, "d", 0, 1)
    assert (other / "notes.txt").read_text() == "keep"
