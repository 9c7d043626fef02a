"""Never replace, delete or follow into anything the program did not create: result files
(`--out`) and checkpoint directories (`--save`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_cli import invoke

from moeplan.cli import main as moeplan_cli
from moeplan.cli import moerun as moerun_cli
from moeplan.spec.errors import ConfigError
from moeplan.spec.files import output_path, write_atomic


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
    for save, what in (("p", "p exists"), (str(tmp_path), "the working directory"),
                       ("q", "q.tmp exists"),
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

    from moeplan.runtime import checkpoint
    from moeplan.runtime.model import GPT
    from moeplan.spec import load_model

    model = GPT(load_model("tiny-pr-moe"))
    ckpt = tmp_path / "ckpt"
    partial = tmp_path / "ckpt.tmp"
    partial.mkdir()
    (partial / checkpoint.PARTIAL).touch()  # an interrupted save of ours
    checkpoint.save(model, ckpt, 1, "d", 0, 1)
    checkpoint.save(model, ckpt, 2, "d", 0, 1)  # over its own checkpoint
    assert checkpoint.read_manifest(ckpt)["step"] == 2
    # the lock stays: removing it could let two jobs hold two locks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.lock"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a moeplan checkpoint"):
        checkpoint.save(model, other, 1, "d", 0, 1)
    assert (other / "notes.txt").read_text() == "keep"


def _saved(tmp_path):
    from moeplan.runtime import checkpoint
    from moeplan.runtime.model import GPT
    from moeplan.spec import load_model

    model = GPT(load_model("tiny-pr-moe"))
    return checkpoint, model, checkpoint.save(model, tmp_path / "ckpt", 3, "d", 0, 1)


def test_corrupted_or_foreign_shards_are_refused(tmp_path):
    """Flipped bytes, a tensor replaced by int64s, a shard of another checkpoint: one line each
    (the issue's reproductions loaded silently)."""
    import torch

    checkpoint, model, ckpt = _saved(tmp_path)
    full, manifest = checkpoint.load_full(ckpt)
    assert manifest["step"] == 3 and len(manifest["id"]) == 32
    shard = ckpt / "rank0.pt"
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match its checksum"):
        checkpoint.load_full(ckpt)
    # a consistent file whose tensor is int64: the checksum matches the manifest, the dtype not
    pieces = torch.load(io_bytes(good), weights_only=True)
    name = next(iter(pieces["pieces"]))
    spec, tensor = pieces["pieces"][name]
    pieces["pieces"][name] = (spec, tensor.long())
    torch.save(pieces, shard)
    resign(checkpoint, ckpt)
    with pytest.raises(ConfigError, match="is not a float32 tensor"):
        checkpoint.load_full(ckpt)
    # another checkpoint's shard, checksum updated: its id differs
    other = checkpoint.save(model, tmp_path / "other", 1, "d", 0, 1)
    (ckpt / "rank0.pt").write_bytes((other / "rank0.pt").read_bytes())
    resign(checkpoint, ckpt)
    with pytest.raises(ConfigError, match="belongs to another checkpoint"):
        checkpoint.load_full(ckpt)


def io_bytes(b: bytes):
    import io

    return io.BytesIO(b)


def resign(checkpoint, ckpt: Path) -> None:
    """Rewrite the manifest's checksum of rank0.pt (what a careless copy would not do)."""
    import json

    m = json.loads((ckpt / "manifest.json").read_text())
    m["sha256"]["rank0.pt"] = checkpoint._sha256(ckpt / "rank0.pt")
    (ckpt / "manifest.json").write_text(json.dumps(m))


def test_an_interrupted_swap_loads_the_previous_copy_and_saves_are_locked(tmp_path):
    import fcntl

    checkpoint, model, ckpt = _saved(tmp_path)
    ckpt.rename(tmp_path / "ckpt.old")  # killed between moving aside and moving in
    full, manifest = checkpoint.load_full(ckpt)
    assert manifest["step"] == 3 and full
    with open(tmp_path / "ckpt.lock", "a") as held:  # another job is saving there
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another job is saving to"):
            checkpoint.save(model, ckpt, 4, "d", 0, 1)
    checkpoint.save(model, ckpt, 5, "d", 0, 1)
    assert checkpoint.read_manifest(ckpt)["step"] == 5 and not (tmp_path / "ckpt.old").exists()


def _plan_here(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, _ = invoke(moeplan_cli, ["search", "--model", "tiny-pr-moe", "--gpus", "2",
                                      "--cluster", "local-cpu", "--global-batch", "4",
                                      "--seq-len", "32"], monkeypatch, capsys)
    assert code == 0


def test_save_targets_that_would_hang_or_break_the_check(tmp_path, monkeypatch, capsys):
    """`--save .`, a folder whose manifest.json is a FIFO (never opened: reading one blocks) or
    JSON nested 100,000 deep: one line each, before any rank starts, the folder untouched."""
    _plan_here(tmp_path, monkeypatch, capsys)
    Path("fifo").mkdir()
    os.mkfifo("fifo/manifest.json")
    Path("deep").mkdir()
    Path("deep/manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    for save, what in ((".", "the working directory"), ("..", "the working directory"),
                       ("fifo", "fifo exists"), ("deep", "deep exists")):
        code, _, err = invoke(moerun_cli, ["--plan", "plan.json", "--steps", "1", "--save",
                                           save], monkeypatch, capsys)
        assert code == 2 and what in err and err.count("\n") == 1, (save, err)
    assert stat.S_ISFIFO(os.stat("fifo/manifest.json").st_mode) and not Path("run.json").exists()


def _edited_manifest(ckpt: Path, **fields) -> None:
    import json

    m = json.loads((ckpt / "manifest.json").read_text())
    m.update(fields)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def test_a_bad_checkpoint_is_refused_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    """Corrupted shards and malformed manifests end in the launcher, on one line (the ranks
    used to find them, each printing its own error, after starting)."""
    import shutil

    _plan_here(tmp_path, monkeypatch, capsys)
    from moeplan.runtime import checkpoint
    from moeplan.runtime.model import GPT
    from moeplan.spec.plan import Plan

    plan = Plan.model_validate_json(Path("plan.json").read_text())
    good = checkpoint.save(GPT(plan.model), tmp_path / "good", 1, "d", 0, 1)
    cases = {
        "flipped": ("does not match its checksum", None),
        "deep": ("too deep", None),
        "world-text": ("is not a number of ranks", {"world": "two"}),
        "world-zero": ("is not a number of ranks", {"world": 0}),
        "world-three": ("do not name the 3 shards", {"world": 3}),
        "shapes-list": ("do not name the same tensors", {"shapes": []}),
        "sha-text": ("do not name the 1 shards", {"sha256": "x"}),
    }
    for name, (what, fields) in cases.items():
        ckpt = tmp_path / name
        shutil.copytree(good, ckpt)
        if name == "flipped":
            data = bytearray((ckpt / "rank0.pt").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (ckpt / "rank0.pt").write_bytes(bytes(data))
        elif name == "deep":
            (ckpt / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
        else:
            _edited_manifest(ckpt, **fields)
        code, out, err = invoke(moerun_cli, ["--plan", "plan.json", "--steps", "1", "--load",
                                             str(ckpt)], monkeypatch, capsys)
        assert code == 2 and what in err and err.count("\n") == 1 and "rank" not in out, (
            name, err)
    assert not Path("run.json").exists()


def test_a_link_loop_is_named_as_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("loop.json").symlink_to("loop.json")
    Path("a.json").symlink_to("b.json")
    Path("b.json").symlink_to("a.json")
    for argv in (["--model", "loop.json"], ["--model", "a.json"], ["--profile", "loop.json"]):
        code, _, err = invoke(moeplan_cli, ["search", "--gpus", "2", *argv], monkeypatch, capsys)
        assert code == 2 and "symbolic links" in err and err.count("\n") == 1, (argv, err)


def test_a_number_beyond_pythons_digit_limit_is_one_line(tmp_path, monkeypatch, capsys):
    """json.loads raises a plain ValueError (not a JSONDecodeError) for an integer of more than
    4,300 digits: every document reader turns it into one line (found in review)."""
    monkeypatch.chdir(tmp_path)
    Path("big.json").write_text('{"hidden": ' + "9" * 5000 + "}")
    for argv in (["--model", "big.json"], ["--profile", "big.json"]):
        code, _, err = invoke(moeplan_cli, ["search", "--gpus", "2", *argv], monkeypatch, capsys)
        assert code == 2 and "a number too long" in err and err.count("\n") == 1, (argv, err)
