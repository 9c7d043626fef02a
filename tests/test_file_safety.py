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
