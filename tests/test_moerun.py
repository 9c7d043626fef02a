"""`moerun` end to end: torchrun launch on 2 CPU ranks, run.json, checkpoints, errors, dead ranks.

The launches are real (torch.distributed.run starting gloo workers); each costs a few seconds, so
the module makes one plan and one checkpoint and reuses them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeplan.cli import moerun as moerun_cli
from moeplan.planner.plan import Plan
from moeplan.planner.record import RunRecord

from test_cli import invoke

MOERUN = [sys.executable, "-c", "from moeplan.cli.moerun import main; main()"]
MOEPLAN = [sys.executable, "-c", "from moeplan.cli.main import main; main()"]


def sh(cmd, cwd, timeout=180):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("moerun")
    r = sh(MOEPLAN + ["search", "--model", "tiny-pr-moe", "--gpus", "2", "--cluster", "local-cpu",
                      "--global-batch", "8", "--seq-len", "32", "--out", "plan.json"], d)
    assert r.returncode == 0, r.stderr
    r = sh(MOERUN + ["--plan", "plan.json", "--steps", "3", "--save", "ckpt", "--out",
                     "run.json"], d)
    assert r.returncode == 0, r.stderr + r.stdout
    return d, r


def test_train_run_writes_measurements_beside_predictions(work):
    d, r = work
    plan = Plan.model_validate_json((d / "plan.json").read_text())
    record = RunRecord.model_validate_json((d / "run.json").read_text())
    assert record.mode == "train" and record.world == 2 and record.measured_steps == 3
    assert len(record.losses) == 4  # warm-up + measured
    assert record.measured.step_time_s > 0 and record.measured.tokens_per_s > 0
    assert [l.index for l in record.layers] == [l.index for l in plan.layers]
    moe = [l for l in record.layers if l.kind == "moe"]
    assert all(l.routed > 0 and {"gate", "dispatch", "experts", "combine"} <= set(l.phases_s)
               for l in moe)
    figures = {(row.scope, row.phase) for row in record.comparison}
    assert {("step", "step time"), ("all layers", "experts"), ("all layers", "grad_sync"),
            ("layer 2", "moe forward+backward")} <= figures
    step = next(row for row in record.comparison if row.phase == "step time")
    assert step.predicted == plan.predicted.step_time_s
    assert step.rel_error == pytest.approx((step.predicted - step.measured) / step.measured)
    assert "measured vs predicted" in r.stdout and "dropped tokens" in r.stdout
    manifest = json.loads((d / "ckpt" / "manifest.json").read_text())
    assert manifest["world"] == 2 and not (d / "ckpt.tmp").exists()


def test_infer_from_checkpoint_with_recosted_plan(work):
    d, _ = work
    r = sh(MOERUN + ["--plan", "plan.json", "--mode", "infer", "--load", "ckpt", "--steps", "1",
                     "--out", "infer.json"], d)
    assert r.returncode == 0, r.stderr + r.stdout
    record = RunRecord.model_validate_json((d / "infer.json").read_text())
    assert record.mode == "infer" and record.measured.latency_s > 0
    assert record.measured.prefill_s > 0
    assert any(row.phase == "decode latency" and row.predicted > 0 for row in record.comparison)


def test_dead_rank_ends_the_job_with_a_clear_message(work):
    d, _ = work
    r = sh(MOERUN + ["--plan", "plan.json", "--steps", "5", "--fault", "1:2", "--out", "x.json"],
           d, timeout=120)
    assert r.returncode == 1
    assert "moerun: error: rank 1 failed (exit code 17)" in r.stderr
    assert not (d / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "3"], "is for 2 ranks, --nproc is 3"),
    (["--load", "missing-ckpt"], "no checkpoint at missing-ckpt"),
    (["--fault", "x"], "--fault must be RANK:STEP"),
    (["--steps", "0"], "--steps"),
])
def test_bad_inputs_are_one_line(work, argv, message, monkeypatch, capsys):
    d, _ = work
    monkeypatch.chdir(d)
    code, _, err = invoke(moerun_cli, ["--plan", "plan.json", *argv], monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_malformed_and_foreign_plans(work, monkeypatch, capsys, tmp_path):
    d, _ = work
    monkeypatch.chdir(tmp_path)
    Path("bad.json").write_text("{not json")
    code, _, err = invoke(moerun_cli, ["--plan", "bad.json"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    plan = json.loads((d / "plan.json").read_text())
    plan["parallel"]["dp"] = 3
    Path("wrong.json").write_text(json.dumps(plan))
    code, _, err = invoke(moerun_cli, ["--plan", "wrong.json"], monkeypatch, capsys)
    assert code == 2 and "tp 1 × dp 3 != 2 GPUs" in err
    # a checkpoint of another model is refused before any rank starts
    other = json.loads((d / "ckpt" / "manifest.json").read_text())
    other["model"]["hidden"] = 128
    Path("other").mkdir()
    Path("other/manifest.json").write_text(json.dumps(other))
    code, _, err = invoke(moerun_cli, ["--plan", str(d / "plan.json"), "--load", "other"],
                          monkeypatch, capsys)
    assert code == 2 and "is of another model: hidden 128 there, 64 in the plan" in err


def test_print_torchrun(work, monkeypatch, capsys):
    d, _ = work
    monkeypatch.chdir(d)
    code, out, _ = invoke(moerun_cli, ["--plan", "plan.json", "--print-torchrun"], monkeypatch,
                          capsys)
    assert code == 0
    assert out.startswith("torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d")
    assert "-m moeplan.runtime.worker --plan plan.json --mode train" in out


def test_validate_compares_and_refuses_foreign_runs(work, monkeypatch, capsys):
    from moeplan.cli import main as moeplan_cli

    d, _ = work
    monkeypatch.chdir(d)
    code, out, _ = invoke(moeplan_cli, ["validate", "plan.json", "run.json", "--json"],
                          monkeypatch, capsys)
    assert code == 0
    report = json.loads(out)
    assert report["summary"]["step"]["count"] == 1
    assert report["summary"]["phases"]["median_abs_error"] >= 0
    assert any(r["phase"] == "step time" for r in report["rows"])
    # the inference run was measured for the re-costed plan moerun wrote beside it
    assert (d / "infer.plan.json").exists()
    code, _, _ = invoke(moeplan_cli, ["validate", "infer.plan.json", "infer.json"], monkeypatch,
                        capsys)
    assert code == 0
    code, _, err = invoke(moeplan_cli, ["validate", "plan.json", "infer.json"], monkeypatch, capsys)
    assert code == 2 and "measured for another plan" in err


def test_validate_never_imports_torch(work):
    d, _ = work
    code = ("import sys; from moeplan.cli.main import main; "
            "sys.argv=['moeplan','validate','plan.json','run.json','--json']\n"
            "try: main()\nexcept SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_validate_shows_the_untimed_share_where_the_plan_predicts_one(work):
    """A plan from a measured profile predicts the step's `untimed` seconds (outside every
    phase timer); `compare` then measures it as the step time less every timed phase."""
    from moeplan.planner.record import compare

    d, _ = work
    plan = Plan.model_validate_json((d / "plan.json").read_text())
    run = RunRecord.model_validate_json((d / "run.json").read_text())
    assert not any(r.phase == "untimed" for r in compare(plan, run))
    heads = {**plan.predicted.head_phases_s, "untimed": 1e-3}
    plan = plan.model_copy(update={"predicted": plan.predicted.model_copy(
        update={"head_phases_s": heads})})
    rows = {r.phase: r for r in compare(plan, run) if r.scope == "all layers"}
    timed = sum(r.measured for k, r in rows.items() if k != "untimed")
    assert rows["untimed"].predicted == 1e-3
    assert rows["untimed"].measured == pytest.approx(max(0.0, run.measured.step_time_s - timed))
