"""Capacity planning: `moeplan sweep` rows equal single searches, prices and sizing add up by
hand, and `moeplan report` writes a self-contained page whose numbers are the sweep's."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from tolerance import F64_REL

from moeplan.cli.main import cli
from moeplan.planner import sweep as S
from moeplan.planner.planning import plan
from moeplan.report import analysis as A
from moeplan.report import build as R
from moeplan.spec import load_cluster, load_model
from moeplan.spec.errors import ConfigError, SpecError
from moeplan.spec.sweep import SweepFile

CLUSTER = "ndv4-a100-40gb"


@pytest.fixture(scope="module")
def swept():
    specs = {m: load_model(m) for m in ("1.3b-pr-moe", "6.7b")}
    clusters = {CLUSTER: load_cluster(CLUSTER)}
    points = S.points_for(specs, clusters, "8-32", S.MODES, [8])
    rows = S.sweep(specs, clusters, points, S.Options(), jobs=2)
    return specs, clusters, rows


def test_gpu_counts():
    eight = load_cluster(CLUSTER)  # 8 GPUs per node
    assert S.gpu_counts("8-512", eight) == [8, 16, 32, 64, 128, 256, 512]
    assert S.gpu_counts("1-16", eight) == [1, 2, 4, 8, 16]  # below a node: divisors of it
    assert S.gpu_counts("24,8,64", eight) == [8, 24, 64]
    for bad in ("", "12", "0-8", "64-8", "8-x", "a,b", "9-15", "8,-8", "1" * 9, "\u00b2"):
        with pytest.raises(ConfigError):
            S.gpu_counts(bad, eight)
    with pytest.raises(ConfigError, match="nodes"):
        S.gpu_counts("8-64", eight.model_copy(update={"max_nodes": 4}))


def test_each_row_is_the_single_search_and_priced_by_hand(swept):
    specs, clusters, rows = swept
    cluster = clusters[CLUSTER]
    price, power = cluster.pricing.usd_per_gpu_hour, cluster.device.board_power_w
    for row in rows:
        req = S.request(S.Point(row.model, row.cluster, row.gpus, row.mode, row.per_gpu_batch),
                        S.Options())
        if not row.feasible:
            with pytest.raises(Exception) as e:
                plan(specs[row.model], cluster, req)
            assert row.limit == str(e.value).splitlines()[0]
            continue
        single, _ = plan(specs[row.model], cluster, req)
        assert row.plan == single
        tps = single.predicted.tokens_per_s
        assert row.tokens_per_s == tps
        # dollars per million tokens: the GPUs' hourly price over the tokens of an hour
        assert row.usd_per_m_tokens == pytest.approx(price * row.gpus / (tps * 3600) * 1e6,
                                                     rel=F64_REL)
        if row.mode == "train":
            hours = 300e9 / tps / 3600
            assert row.run_days == pytest.approx(hours / 24, rel=F64_REL)
            assert row.run_usd == pytest.approx(hours * row.gpus * price, rel=F64_REL)
            assert row.run_energy_kwh_max == pytest.approx(hours * row.gpus * power / 1e3,
                                                           rel=F64_REL)
        else:
            assert single.workload.global_batch == 8 * row.gpus


def test_sizing_takes_the_fewest_gpus_that_meet_the_target(swept):
    _, _, rows = swept
    train = sorted((r for r in rows if r.mode == "train" and r.feasible
                    and r.model == "1.3b-pr-moe"), key=lambda r: r.gpus)
    assert len(train) >= 2
    # a target between the two largest points' throughputs: the larger one answers it
    need = (train[-2].tokens_per_s + train[-1].tokens_per_s) / 2
    answer = {(a.model, a.mode): a for a in S.size(rows, S.Target(tokens_per_s=need))}
    got = answer[("1.3b-pr-moe", "train")]
    assert got.row is train[-1] and str(train[-1].gpus) in got.why
    # a training run: tokens in days is tokens/s
    days = 300e9 / train[-2].tokens_per_s / 86400 * 0.999  # just beyond the smaller point
    got = {(a.model, a.mode): a for a in S.size(rows, S.Target(days=days))}[
        ("1.3b-pr-moe", "train")]
    assert got.row is train[-1]
    # out of reach: no answer, the closest point and what it falls short of
    far = {(a.model, a.mode): a for a in S.size(rows, S.Target(tokens_per_s=1e12))}
    miss = far[("1.3b-pr-moe", "train")]
    assert miss.row is None and miss.closest is train[-1] and "needed" in miss.why
    slo = {(a.model, a.mode): a for a in S.size(rows, S.Target(slo_s=1e-6))}
    assert slo[("6.7b", "infer")].row is None and "SLO" in slo[("6.7b", "infer")].why


def test_over_clusters_the_cheapest_meets_the_target():
    a = load_cluster(CLUSTER)
    cheap = a.model_copy(update={"name": "cheap", "pricing": a.pricing.model_copy(
        update={"usd_per_gpu_hour": 1.0})})
    specs = {"6.7b": load_model("6.7b")}
    clusters = {a.name: a, "cheap": cheap}
    rows = S.sweep(specs, clusters, S.points_for(specs, clusters, "8", ["infer"], [8]),
                   S.Options(simulate_top=0), jobs=1)
    answer = S.size(rows, S.Target(tokens_per_s=1.0))[0]
    assert answer.row.cluster == "cheap"


def _invoke(args, cwd: Path):
    """Run the CLI in a fresh folder under `cwd`; the result and the files it wrote there."""
    work = Path(tempfile.mkdtemp(dir=cwd))
    old = os.getcwd()
    os.chdir(work)
    try:
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(old)
    return r, {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}


def test_sweep_cli_writes_csv_and_json(tmp_path):
    args = ["sweep", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "2,4",
            "--global-batch", "8", "--seq-len", "32", "--simulate-top", "2", "--jobs", "1"]
    r, files = _invoke(args + ["--out", "s.csv"], tmp_path)
    assert r.exit_code == 0, r.output
    table = list(csv.DictReader(files["s.csv"].decode().splitlines()))
    assert [(t["gpus"], t["mode"]) for t in table] == [("2", "train"), ("4", "train"),
                                                       ("2", "infer"), ("4", "infer")]
    assert "recommended (tiny-pr-moe, train)" in r.output
    r, files = _invoke(args + ["--out", "s.json", "--target-tokens-per-s", "1"], tmp_path)
    doc = SweepFile.model_validate_json(files["s.json"])
    assert len(doc.rows) == 4 and {a.mode for a in doc.answers} == {"train", "infer"}
    assert all(a.met for a in doc.answers) and "answer (tiny-pr-moe, train)" in r.output


@pytest.mark.parametrize("extra, message", [
    (["--out", "s.txt"], "name a .csv or .json"),
    (["--gpus", "3"], "whole number"),
    (["--mode", "train", "--slo-ms", "5"], "--slo-ms applies to inference"),
    (["--per-gpu-batch", "0"], "per GPU"),
    (["--fix", "tp=banana"], "tp"),
])
def test_sweep_cli_refuses_bad_input_in_one_line(tmp_path, extra, message):
    r = subprocess.run([sys.executable, "-c", "from moeplan.cli.main import main; main()",
                        "sweep", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus",
                        "2", "--jobs", "1", *extra], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of two models over a small sweep, from a sweep file."""
    d = tmp_path_factory.mktemp("report")
    r, files = _invoke(["sweep", "--model", "350m-pr-moe", "--model", "350m", "--gpus", "8,16",
                        "--simulate-top", "2", "--out", "s.json"], d)
    assert r.exit_code == 0, r.output
    (d / "s.json").write_bytes(files["s.json"])
    runner = CliRunner()
    out = d / "rep"
    r = runner.invoke(cli, ["report", "--sweep", str(d / "s.json"), "--baseline", "350m",
                            "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return SweepFile.model_validate_json(files["s.json"]), out


def test_report_holds_every_figure_inline_and_nothing_from_the_network(report):
    doc, out = report
    page = (out / "index.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    names = {p.stem for p in (out / "figures").iterdir()}
    assert {n for n, _ in images} == names
    assert names >= {"scaling", "cost", "memory", "layers", "pareto", "variants", "sensitivity"}
    for name, data in images:
        assert base64.b64decode(data) == (out / "figures" / f"{name}.png").read_bytes()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    md = (out / "report.md").read_text()
    assert all(f"(figures/{n}.png)" in md for n in names)


def test_report_numbers_are_the_sweeps(report):
    doc, out = report
    md = (out / "report.md").read_text()
    for r in doc.rows:
        if r.feasible:
            assert f"{r.tokens_per_s:,.0f}" in md
    chosen = A.recommended(doc)
    names = R._plan_names(chosen)
    for r in chosen:
        written = json.loads((out / names[id(r)]).read_text())
        assert written == json.loads(r.plan.to_json())
    assert (out / "sweep.csv").read_text() == S.csv_text(doc.rows)
    assert "vs baseline" in md and "Sensitivity" in md and "Assumptions" in md
    assert "known error" in md


def test_report_sensitivity_moves_the_time_the_right_way(report):
    doc, _ = report
    chosen = [r for r in A.recommended(doc) if r.mode == "train"]
    items = [s for s in A.sensitivity(doc, chosen, jobs=1) if s.knob == "GEMM efficiency"]
    faster = {s.factor: s.change for s in items}
    assert faster[0.8] > 0 > faster[1.2]  # slower GEMMs: a longer step


def test_a_constant_at_its_bound_is_not_moved_out_of_it(report):
    """A profile whose link bandwidth sits at the bound (1 B/s; a fuzzed sweep file) cannot be
    moved 20% lower: that sensitivity point is marked, the others are re-planned (this raised
    a validation traceback)."""
    doc, _ = report
    chosen = [r for r in A.recommended(doc) if r.mode == "train"][:1]
    cluster = doc.clusters[chosen[0].cluster]
    low = cluster.model_copy(update={"intra": cluster.intra.model_copy(
        update={"bandwidth_Bps": 1.0})})
    doc = doc.model_copy(update={"clusters": {**doc.clusters, chosen[0].cluster: low}})
    items = A.sensitivity(doc, chosen, jobs=1)
    marked = [s for s in items if s.degrees == A.OUT_OF_BOUNDS]
    assert [(s.knob, s.factor) for s in marked] == [("link bandwidth", 0.8)]
    assert len(items) == 2 * len(A.KNOBS)  # every knob both ways, in order
    assert [(s.knob, s.factor) for s in items][:2] == [(next(iter(A.KNOBS)), 0.8),
                                                       (next(iter(A.KNOBS)), 1.2)]


def test_report_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a moeplan report"):
        R.prepare_folder(str(tmp_path))
    link = tmp_path.parent / f"{tmp_path.name}-link"
    link.symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="symbolic link"):
        R.prepare_folder(str(link))
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_a_report_does_not_write_through_a_planted_link(report, tmp_path):
    doc, out = report
    again = tmp_path / "again"
    again.mkdir()
    (again / R.MARKER).write_text("{}")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (again / "report.md").symlink_to(victim)
    with pytest.raises(ConfigError, match="not a regular file"):
        R.write_report(doc, R.prepare_folder(str(again)), jobs=1)
    assert victim.read_text() == "keep"


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium package")
def test_the_page_renders_whole_in_a_browser_and_a_broken_one_is_caught(report, tmp_path):
    _, out = report
    check = [sys.executable, str(Path(__file__).parent.parent / "bench" / "check_report.py")]
    good = subprocess.run(check + [str(out), "--screenshot", str(tmp_path / "good.png")],
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    assert (tmp_path / "good.png").stat().st_size > 10_000
    broken = tmp_path / "broken"
    broken.mkdir()
    page = (out / "index.html").read_text()
    (broken / "index.html").write_text(page.replace("base64,iVBOR", "base64,AAAA", 1))
    bad = subprocess.run(check + [str(broken)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "figure not loaded" in bad.stdout, bad.stdout


def test_runs_are_set_against_their_predictions(report, tmp_path):
    from moeplan.spec.record import Comparison, Measured, RunRecord

    doc, _ = report
    record = RunRecord(plan_digest="sha256:x", mode="train", world=2, backend="gloo",
                       device="cpu", measured_steps=2, warmup_steps=1,
                       measured=Measured(step_time_s=0.5, tokens_per_s=1.0,
                                         peak_memory_bytes=1.0, memory_kind="cpu",
                                         head_phases_s={}),
                       layers=[], comparison=[Comparison(scope="step", phase="step time",
                                                         predicted=0.4, measured=0.5,
                                                         rel_error=-0.2)])
    run = tmp_path / "run.json"
    run.write_text(record.model_dump_json())
    got = A.measured_runs([run])
    assert [(m.predicted_s, m.measured_s, m.error) for m in got] == [(0.4, 0.5, -0.2)]
    out = tmp_path / "rep"
    R.write_report(doc, R.prepare_folder(str(out)), runs=[run], jobs=1)
    md = (out / "report.md").read_text()
    assert "Predicted against measured" in md and "| run.json | train | 2 | 400.00 ms | " \
        "500.00 ms | -20.0% |" in md and (out / "figures" / "runs.png").is_file()
    empty = tmp_path / "empty.json"
    empty.write_text(record.model_copy(update={"comparison": []}).model_dump_json())
    with pytest.raises(Exception, match="no comparison"):
        A.measured_runs([empty])


def test_the_pareto_front_is_each_models_undominated_points(report):
    doc, _ = report
    front = A.pareto(doc.rows)
    infer = [r for r in doc.rows if r.mode == "infer" and r.feasible]

    def beats(a, b) -> bool:  # a at least as good on both and better on one
        return (a.latency_s <= b.latency_s and a.tokens_per_s_per_gpu >= b.tokens_per_s_per_gpu
                and (a.latency_s, a.tokens_per_s_per_gpu) != (b.latency_s,
                                                               b.tokens_per_s_per_gpu))

    for r in infer:
        rivals = [o for o in infer if o.model == r.model]
        on_front = any(f is r for f in front)
        assert on_front == (not any(beats(o, r) for o in rivals)) or not on_front and any(
            f.model == r.model and f.latency_s == r.latency_s for f in front)


@pytest.mark.parametrize("change, message", [
    # a feasible point without its figures once broke the recommendation's sort (fuzz)
    (lambda d: d["rows"][0].update(tokens_per_s_per_gpu=None),
     "a feasible point needs tokens_per_s_per_gpu"),
    (lambda d: d["answers"].append({"model": "350m", "mode": "train", "met": True,
                                    "point": None, "text": "met"}),
     "a met answer points at no feasible row"),
    # options out of the command line's bounds reached the search (fuzz)
    (lambda d: d["options"].update(prompt_len=-1),
     "prompt_len: Input should be greater than or equal to 1"),
    (lambda d: d["options"].update(runtime="vllm"), "runtime"),
    # a nested target could not be written back into the report's sweep.json (audit)
    (lambda d: d["target"].update(deep={"a": {"b": 1}}), "target.deep"),
])
def test_a_sweep_file_that_contradicts_itself_is_one_line(report, tmp_path, change, message):
    doc, _ = report
    data = json.loads(doc.model_dump_json())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises((SpecError, ConfigError), match=message) as e:
        S.load_document(path)
    assert "\n" not in str(e.value)


def _deep(n: int) -> dict:
    node: dict = {}
    for _ in range(n):
        node = {"a": node}
    return node


def test_a_sweep_files_names_and_unknown_options_stay_inside_the_report(report, tmp_path):
    """A model named "../../x" once wrote its plan outside the report folder, and an unknown
    option nested 800 deep could not be written back (audit): the names become file names, and
    the options are the sweep's own."""
    doc, _ = report
    data = json.loads(doc.model_dump_json())
    name = data["rows"][0]["model"]
    evil = "../../victim/x"
    data["models"][evil] = data["models"].pop(name)
    for row in data["rows"]:
        if row["model"] == name:
            row["model"] = evil
    data["options"]["unknown"] = _deep(800)
    (tmp_path / "s.json").write_text(json.dumps(data))
    runner = CliRunner()
    (tmp_path / "a").mkdir()
    r = runner.invoke(cli, ["report", "--sweep", str(tmp_path / "s.json"), "--jobs", "1",
                            "--out", str(tmp_path / "a" / "rep")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "s.json"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["rep"]
    assert any(p.name.startswith("_.._victim_x-") for p in (tmp_path / "a/rep/plans").iterdir())
    row = next(r for r in A.recommended(S.load_document(tmp_path / "s.json")) if r.plan)
    assert len(set(R._plan_names([row, row.model_copy()]).values())) == 2  # names that slug alike
    assert "unknown" not in json.loads((tmp_path / "a/rep/sweep.json").read_text())["options"]
