"""`moerun` end to end: a launch of 2 CPU ranks, run.json, checkpoints, errors, dead ranks.

The launches are real (`runtime.launch` starting gloo workers); each costs a few seconds, so
the module makes one plan and one checkpoint and reuses them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import invoke
from tolerance import F64_REL

from moeplan.cli import moerun as moerun_cli
from moeplan.spec.plan import Plan
from moeplan.spec.record import RunRecord

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
    assert step.rel_error == pytest.approx((step.predicted - step.measured) / step.measured, rel=F64_REL)
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
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "nan is not a finite number"),
    (["--timeout", "nan"], "nan is not a finite number"), (["--timeout", "inf"], "--timeout"),
    (["--seed", str(10**30)], "--seed"), (["--fault", "7:0"], "the plan has ranks 0-1"),
    (["--save", ""], "--save is empty"), (["--out", "/dev/full"], "not a regular file"),
    (["--teacher", "ckpt"], "distils from no teacher"), (["--kd-steps", "-1"], "--kd-steps"),
    (["--data", ""], "--data is empty"),  # was read as the working directory
])
def test_bad_inputs_are_one_line(work, argv, message, monkeypatch, capsys):
    d, _ = work
    monkeypatch.chdir(d)
    code, _, err = invoke(moerun_cli, ["--plan", "plan.json", *argv], monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_students_teacher_is_checked_before_any_rank_starts(work, monkeypatch, capsys):
    """A Mixture-of-Students plan needs its teacher's checkpoint (or --kd-steps 0); a checkpoint
    of another model is refused."""
    d, _ = work
    monkeypatch.chdir(d)
    r = sh(MOEPLAN + ["search", "--model", "tiny-pr-moe-mos", "--gpus", "2", "--cluster",
                      "local-cpu", "--global-batch", "8", "--seq-len", "32", "--out",
                      "mos.json"], d)
    assert r.returncode == 0, r.stderr
    for argv, message in (([], "distils from tiny-pr-moe: give a checkpoint of it"),
                          (["--teacher", "nothing-here"], "no checkpoint at nothing-here")):
        code, _, err = invoke(moerun_cli, ["--plan", "mos.json", *argv], monkeypatch, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    # the student's own checkpoint is not the teacher's model
    r = sh(MOERUN + ["--plan", "mos.json", "--steps", "1", "--kd-steps", "0", "--save",
                     "student", "--out", "s.json"], d)
    assert r.returncode == 0, r.stderr
    code, _, err = invoke(moerun_cli, ["--plan", "mos.json", "--teacher", "student"],
                          monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tiny-pr-moe" in err, err


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


def _moe(plan: dict) -> dict:
    return next(layer for layer in plan["layers"] if layer["kind"] == "moe")


@pytest.mark.parametrize("change, message", [
    (lambda p: _moe(p).update(ep=0), "layers.1.ep: Input should be greater than 0"),
    (lambda p: _moe(p).update(ep=-1, edp=-2), "layers.1.ep: Input should be greater than 0"),
    (lambda p: p["workload"].update(seq_len=4096), "exceeds the model's max_seq_len"),
    (lambda p: p["model"].update(vocab_size=2), "default corpus is bytes"),
    # one data-parallel rank's worth of sequences for two ranks: zero micro-steps each
    (lambda p: p["workload"].update(global_batch=p["workload"]["micro_batch"]),
     "is not a multiple of dp 2"),
    (lambda p: p["model"].update(capacity_factor=float("inf")), "finite number"),
    (lambda p: p["workload"].update(global_batch=10**9), "moerun runs at most 1,048,576"),
    (lambda p: _moe(p).update(ep=1, es=2, edp=1), "expert slicing (es 2) needs every expert"),
    (lambda p: p["model"].update(name="evil\x1b[31m"), "name: String should match pattern"),
])
def test_plans_a_rank_could_not_run_are_refused_before_any_starts(work, monkeypatch, capsys,
                                                                   tmp_path, change, message):
    """Each once ended inside the ranks (ZeroDivisionError, IndexError, zero micro-steps with
    loss 0.0) or was accepted: now one line, exit code 2, nothing started."""
    d, _ = work
    monkeypatch.chdir(tmp_path)
    plan = json.loads((d / "plan.json").read_text())
    change(plan)
    Path("p.json").write_text(json.dumps(plan))
    code, _, err = invoke(moerun_cli, ["--plan", "p.json", "--print-torchrun"], monkeypatch,
                          capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_print_torchrun(work, monkeypatch, capsys):
    d, _ = work
    monkeypatch.chdir(d)
    code, out, _ = invoke(moerun_cli, ["--plan", "plan.json", "--print-torchrun"], monkeypatch,
                          capsys)
    assert code == 0
    assert out.startswith("torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d")
    assert "-m moeplan.runtime.worker --plan plan.json --mode train" in out
    assert "--rdzv-id moerun-" in out and "--rdzv-id moerun " not in out  # a fresh id per job
    again = invoke(moerun_cli, ["--plan", "plan.json", "--print-torchrun"], monkeypatch, capsys)
    assert again[1].split("--rdzv-id ")[1][:24] != out.split("--rdzv-id ")[1][:24]
    assert "no authentication" in again[2] and again[2].count("\n") == 1


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
    from moeplan.spec.record import compare

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
    assert rows["untimed"].measured == pytest.approx(max(0.0, run.measured.step_time_s - timed), rel=F64_REL)


def test_validate_limits_fail_with_one_line_naming_the_figure(work, monkeypatch, capsys):
    from moeplan.cli import main as moeplan_cli

    d, _ = work
    monkeypatch.chdir(d)
    step = next(r for r in RunRecord.model_validate_json((d / "run.json").read_text()).comparison
                if r.phase == "step time")
    off = abs(step.rel_error) * 100
    code, _, err = invoke(moeplan_cli, ["validate", "plan.json", "run.json", "--max-error",
                                        f"{off / 2}"], monkeypatch, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "step time is" in err and f"beyond --max-error {off / 2:g}%" in err
    code, _, err = invoke(moeplan_cli, ["validate", "plan.json", "run.json", "--max-error",
                                        f"{off * 2 + 1}"], monkeypatch, capsys)
    assert code == 0 and err == ""
    # the per-token figure of an inference run, and the phases with --json
    code, out, err = invoke(moeplan_cli, ["validate", "infer.plan.json", "infer.json",
                                          "--max-error", "1e6", "--max-phase-error", "0",
                                          "--json"], monkeypatch, capsys)
    report = json.loads(out)
    assert code == 1 and report["limits"]["breaches"] and "phase " in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = invoke(moeplan_cli, ["validate", "infer.plan.json", "infer.json",
                                        "--max-error", "0"], monkeypatch, capsys)
    assert code == 1 and "decode latency is" in err


def test_limit_breaches_worst_first():
    from moeplan.spec.record import Comparison, limit_breaches

    rows = [Comparison(scope="step", phase="step time", predicted=1.0, measured=2.0,
                       rel_error=-0.5),
            Comparison(scope="all layers", phase="experts", predicted=1.15, measured=1.0,
                       rel_error=0.15),
            Comparison(scope="all layers", phase="attention", predicted=3.0, measured=1.0,
                       rel_error=2.0),
            Comparison(scope="all layers", phase="gate", predicted=1.0, measured=0.0,
                       rel_error=None),
            Comparison(scope="layer 2", phase="moe forward+backward", predicted=9.0,
                       measured=1.0, rel_error=8.0)]
    assert limit_breaches(rows, None, None) == []
    assert limit_breaches(rows, 0.5, 2.0) == []  # at the limit is within it
    got = limit_breaches(rows, 0.25, 0.1)  # 20×, 2× and 1.5× their limits; layers unchecked
    assert [g.split(" is ")[0] for g in got] == ["phase attention", "step time", "phase experts"]
    assert got[1] == ("step time is -50.0% off (predicted 1 s, measured 2 s), beyond "
                      "--max-error 25%")


@given(st.sampled_from(["--max-error", "--max-phase-error"]),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12)))
@settings(max_examples=60, deadline=5000)
def test_validate_limit_options_are_rc_0_1_or_2_with_one_line(work, flag, value):
    """Any value: a verdict (0 or 1) or a one-line refusal (2), never a traceback."""
    from moeplan.cli import main as moeplan_cli

    d, _ = work
    code, err = _in_process(moeplan_cli, ["validate", str(d / "plan.json"), str(d / "run.json"),
                                          "--json", f"{flag}={value}"])
    assert code in (0, 1, 2) and (code == 0) == (err == ""), (code, err)
    assert len(err.strip().splitlines()) <= 1, err


def _in_process(entry, argv: list[str]) -> tuple[int, str]:
    """rc and stderr of a CLI entry point run in this process (hypothesis-friendly)."""
    import contextlib
    import io

    err, old = io.StringIO(), sys.argv
    sys.argv = ["prog", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                entry.main()
                code = 0
            except SystemExit as e:
                code = e.code or 0
    finally:
        sys.argv = old
    return code, err.getvalue()


def test_host_guard_refuses_a_plan_the_host_cannot_hold(work, monkeypatch, capsys):
    """A 64-rank plan of the 31B model on this host: refused before any rank starts, with the
    numbers; the 2-rank plan on a host made to look too small: refused, and --force runs it."""
    from moeplan.runtime import host

    d, _ = work
    monkeypatch.chdir(d)
    r = sh(MOEPLAN + ["search", "--model", "1.3b-pr-moe", "--gpus", "64", "--out", "p64.json"], d)
    assert r.returncode == 0, r.stderr
    code, _, err = invoke(moerun_cli, ["--plan", "p64.json"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the plan starts 64 ranks" in err and "--print-torchrun" in err and "--force" in err
    tiny = host.Host(cores=1, available_bytes=2**28, gpus=0, gpu_memory_bytes=0.0)
    monkeypatch.setattr(host, "this_host", lambda: tiny)
    code, _, err = invoke(moerun_cli, ["--plan", "plan.json", "--steps", "1", "--out", "f.json"],
                          monkeypatch, capsys)
    assert code == 2 and "this host has 1 cores (at most 2 ranks) and 0.2 GiB available" in err
    assert not (d / "f.json").exists()
    code, out, err = invoke(moerun_cli, ["--plan", "plan.json", "--steps", "1", "--out",
                                         "f.json", "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert RunRecord.model_validate_json((d / "f.json").read_text()).measured_steps == 1


@pytest.mark.parametrize("ranks, memory, host_, refused", [
    (4, 1e9, dict(cores=2, available_bytes=24e9, gpus=0, gpu_memory_bytes=0), None),
    (5, 1e6, dict(cores=2, available_bytes=24e9, gpus=0, gpu_memory_bytes=0), "at most 4 ranks"),
    (2, 12e9, dict(cores=8, available_bytes=24e9, gpus=0, gpu_memory_bytes=0), "22.8 GiB"),
    (8, 39e9, dict(cores=2, available_bytes=1e9, gpus=8, gpu_memory_bytes=40e9), None),
    (16, 1e9, dict(cores=64, available_bytes=1e12, gpus=8, gpu_memory_bytes=80e9), "8 GPUs"),
    (8, 41e9, dict(cores=64, available_bytes=1e12, gpus=8, gpu_memory_bytes=40e9),
     "GPUs have 37.3 GiB"),
])
def test_host_refusal_rules(ranks, memory, host_, refused):
    from moeplan.runtime.host import Host, refusal

    why = refusal(ranks, memory, Host(**host_))
    assert (why is None) if refused is None else (refused in why), why


@pytest.mark.parametrize("names, indices", [
    (None, [0, 1, 2, 3]), ("2,0", [2, 0]), ("", []), ("1,7,2", [1]), ("3,-1,0", [3]),
    ("GPU-5f2c,1", [1, 1]),  # a UUID: one of them, counted at the smallest memory
])
def test_host_counts_only_the_gpus_cuda_may_use(names, indices, monkeypatch):
    """NVML lists every GPU of the host, CUDA only CUDA_VISIBLE_DEVICES's (stopping at the
    first entry it cannot use): the host check counts what the ranks will see."""
    from moeplan.runtime.host import visible

    gpus = [{"index": i, "memory_bytes": 40e9 + i} for i in range(4)]
    gpus[1]["memory_bytes"] = 1.0  # the smallest
    if names is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", names)
    assert [g["index"] for g in visible(gpus)] == indices


def test_validate_says_whether_the_run_fell_inside_the_band(work, monkeypatch, capsys):
    from moeplan.cli import main as moeplan_cli

    d, _ = work
    monkeypatch.chdir(d)
    code, out, _ = invoke(moeplan_cli, ["validate", "plan.json", "run.json", "--json"],
                          monkeypatch, capsys)
    band = json.loads(out)["band"]
    run = RunRecord.model_validate_json((d / "run.json").read_text())
    assert code == 0 and band["measured_s"] == run.measured.step_time_s
    assert band["inside"] == (band["p10_s"] <= band["measured_s"] <= band["p90_s"])
    code, out, _ = invoke(moeplan_cli, ["validate", "plan.json", "run.json"], monkeypatch, capsys)
    assert ("inside the predicted p10-p90 band" in out) == band["inside"]


def _listening(pids: list[int]) -> list[str]:
    """Local addresses ("ip:port") of the TCP sockets the processes `pids` listen on (Linux
    /proc: each process's socket inodes matched against /proc/net/tcp and tcp6)."""
    import socket
    import struct

    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, port = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints the address as 32-bit words in host order
            raw = b"".join(struct.pack("=I", int.from_bytes(raw[i:i + 4], "big"))
                           for i in range(0, len(raw), 4))
            out.append(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return out


def _ranks_running(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (d / "stat").read_text().split()[2]
            except OSError:
                continue
            if marker in cmd and state != "Z" and int(d.name) != os.getpid():
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_ranks_die_with_a_killed_launcher(work, tmp_path):
    """SIGKILL of `moerun` mid-run: its ranks end too (no orphan keeps training and later
    writes --out), within seconds. While it runs, it listens on loopback only."""
    import signal
    import time

    d, _ = work
    out = tmp_path / "orphan-check.json"
    proc = subprocess.Popen(MOERUN + ["--plan", str(d / "plan.json"), "--steps", "100000",
                                      "--out", str(out)], cwd=d, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the ranks are training
        if line.startswith("step 2/"):
            break
    ranks = _ranks_running(str(out))
    assert ranks, "no rank found"
    # a single-host job listens on loopback only: its store, gloo's pairs (issue: a stranger on
    # the network could set keys in a store open on every interface)
    listening = _listening([proc.pid, *ranks])
    assert listening and all(a.startswith(("127.0.0.1:", "::1:")) for a in listening), listening
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while _ranks_running(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ranks_running(str(out)) == [] and not out.exists()


def _long_run(d: Path, out: Path, *options: str):
    """A training job of many steps, past its second step: (launcher, its ranks' pids)."""
    proc = subprocess.Popen(MOERUN + ["--plan", str(d / "plan.json"), "--steps", "100000",
                                      *options, "--out", str(out)], cwd=d,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            break
    return proc, [pid for pid in _ranks_running(str(out)) if pid != proc.pid]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP a rank: POSIX")
def test_a_stopped_rank_ends_the_job_after_timeout(work, tmp_path):
    """`--timeout` reaches every group's collectives (not new_group's 30-minute default): with
    one rank stopped, the job fails instead of hanging."""
    import signal
    import time

    d, _ = work
    out = tmp_path / "stopped-rank.json"
    proc, ranks = _long_run(d, out, "--timeout", "5")
    assert len(ranks) == 2
    t0 = time.monotonic()
    os.kill(max(ranks), signal.SIGSTOP)
    try:
        code = proc.wait(timeout=120)
    finally:
        for pid in _ranks_running(str(out)):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert code == 1 and time.monotonic() - t0 < 120
    assert "failed" in proc.stderr.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups: POSIX")
def test_ctrl_c_is_one_line_and_exit_130(work, tmp_path):
    """Ctrl-C reaches the launcher and every rank (one process group, as in a terminal): one
    line, exit code 130, no traceback, no rank left (it printed over a hundred lines)."""
    import signal

    d, _ = work
    out = tmp_path / "interrupted.json"
    proc = subprocess.Popen(MOERUN + ["--plan", str(d / "plan.json"), "--steps", "100000",
                                      "--out", str(out)], cwd=d, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "moerun: interrupted; the job was stopped on all 2 ranks"
    assert _ranks_running(str(out)) == [] and not out.exists()


@pytest.mark.parametrize("change, message", [
    (lambda r: r["layers"].pop(), "not the plan's"),
    (lambda r: r["layers"].reverse(), "not the plan's"),
    (lambda r: r["layers"].append(dict(r["layers"][0])), "not the plan's"),
    (lambda r: r.update(mode="infer"), "the run measured infer"),
    (lambda r: r["measured"].update(step_time_s=float("nan")), "not a positive number"),
    (lambda r: r["measured"].update(step_time_s=-1.0), "not a positive number"),
])
def test_validate_refuses_an_inconsistent_run(work, tmp_path, monkeypatch, capsys, change,
                                              message):
    """A run.json with the plan's digest but missing, extra or reversed layers, another mode or
    a NaN step time: one line, exit 2 (they were accepted)."""
    from moeplan.cli import main as moeplan_cli

    d, _ = work
    run = json.loads((d / "run.json").read_text())
    change(run)
    bad = tmp_path / "bad-run.json"
    bad.write_text(json.dumps(run))
    code, _, err = invoke(moeplan_cli, ["validate", str(d / "plan.json"), str(bad)],
                          monkeypatch, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_diverged_loss_is_written_read_and_shown(work, capsys):
    """A NaN loss was written as null, then reading the run back crashed: null is "not finite"
    and the run still loads, validates and prints."""
    from moeplan.cli.render import print_comparison

    d, _ = work
    run = RunRecord.model_validate_json((d / "run.json").read_text())
    diverged = run.model_copy(update={"losses": [2.0, float("nan")], "eval_loss": float("inf")})
    back = RunRecord.model_validate_json(diverged.model_dump_json())
    assert back.losses == [2.0, None] and back.eval_loss is None
    print_comparison(Plan.model_validate_json((d / "plan.json").read_text()), back, None)
    out = capsys.readouterr().out
    assert "loss 2.0000 -> not finite" in out and "the loss diverged" in out


def test_resuming_says_where_it_continues(work, monkeypatch, capsys):
    """--load of a training checkpoint resumes it (1 warm-up + 3 steps were trained): moerun says
    from which step, with which schedule and data order — and when --seed draws other data."""
    d, _ = work
    monkeypatch.chdir(d)
    code, _, err = invoke(moerun_cli, ["--plan", "plan.json", "--load", "ckpt",
                                       "--print-torchrun"], monkeypatch, capsys)
    assert code == 0 and "resuming at step 4: weights, optimizer state, the 4-step" in err
    code, _, err = invoke(moerun_cli, ["--plan", "plan.json", "--load", "ckpt", "--seed", "5",
                                       "--print-torchrun"], monkeypatch, capsys)
    assert code == 0 and "--seed 5 draws other data" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals to a rank: POSIX")
def test_a_killed_rank_stops_the_job_and_leaves_the_last_checkpoint_whole(work, tmp_path):
    """SIGKILL of one rank while a job that will --save over an earlier checkpoint trains: the
    job ends with one line (exit 1), no rank is left, and the earlier checkpoint still loads
    with every checksum verified."""
    import shutil
    import signal

    from moeplan.runtime.checkpoint import load_full, read_manifest

    d, _ = work
    ckpt = tmp_path / "ckpt"
    shutil.copytree(d / "ckpt", ckpt)
    before = read_manifest(str(ckpt))
    out = tmp_path / "killed-rank.json"
    proc, ranks = _long_run(d, out, "--save", str(ckpt))
    assert len(ranks) == 2
    os.kill(max(ranks), signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err
    assert "killed by a signal" in err.strip().splitlines()[-1]
    assert _ranks_running(str(out)) == [] and not out.exists()
    assert read_manifest(str(ckpt)) == before
    load_full(str(ckpt))  # verifies every shard's checksum, id, dtypes and shapes
