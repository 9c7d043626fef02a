"""`moeplan profile`: fits recover known parameters, profiles round-trip and drive the search,
bad profiles are refused in one line, NVML's absence is handled, and a real CPU run works."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import invoke
from tolerance import F64_REL

from moeplan.calibrate import fit
from moeplan.calibrate.build import build_profile
from moeplan.cli import main as moeplan_cli
from moeplan.spec import load_cluster
from moeplan.spec.cluster import ClusterProfile


def noisy(t: float, rng: random.Random, outlier: bool = False) -> float:
    return t * (1 + rng.uniform(-0.02, 0.02)) * (5.0 if outlier else 1.0)


def test_robust_median_ignores_outliers():
    assert fit.robust_median([1.0, 1.01, 0.99, 1.02, 50.0]) == pytest.approx(1.005, rel=1e-3)


def test_alpha_beta_fit_recovers_latency_and_bandwidth():
    rng = random.Random(0)
    lat, bw, p = 20e-6, 5e9, 4
    sizes = [2 ** k for k in range(12, 25)]
    steps = [p - 1] * len(sizes)
    vols = [s * (p - 1) / p for s in sizes]
    times = [noisy(st * lat + v / bw, rng) for st, v in zip(steps, vols)]
    got_lat, got_bw, r2 = fit.fit_alpha_beta(steps, vols, times)
    assert got_lat == pytest.approx(lat, rel=0.1) and got_bw == pytest.approx(bw, rel=0.05)
    assert r2 > 0.99


def test_gemm_and_memory_fits():
    rng = random.Random(1)
    peak, half = 80e9, 2e6
    flops = [2.0 * m * 256 * 256 for m in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    times = [noisy((f + half) / peak, rng) for f in flops]
    got_peak, got_half, _ = fit.fit_gemm(flops, times)
    assert got_peak == pytest.approx(peak, rel=0.05) and got_half == pytest.approx(half, rel=0.15)
    sizes = [2.0 ** k for k in range(13, 26)]
    bw, overhead, _ = fit.fit_memory(sizes, [noisy(3e-6 + s / 20e9, rng) for s in sizes])
    assert bw == pytest.approx(20e9, rel=0.05) and overhead == pytest.approx(3e-6, rel=0.2)


def synthetic_measurements(rng: random.Random) -> dict:
    sizes = [2.0 ** k for k in range(12, 24)]
    coll = []
    for tier, lat, bw in (("intra", 30e-6, 4e9), ("inter", 80e-6, 1e9)):
        for name in ("allreduce", "allgather", "reduce_scatter", "all_to_all"):
            m = 2 if name == "allreduce" else 1
            for s in sizes:
                coll.append({"collective": name, "tier": tier, "group_size": 2, "bytes": s,
                             "time_s": noisy(m * (lat + s / 2 / bw), rng)})
    gemm = [{"flops": 2.0 * m * 256 * 256, "time_s": (2.0 * m * 256 * 256 + 1e6) / 40e9}
            for m in (16, 64, 256, 1024)]
    copy = [{"bytes": s, "time_s": 2e-6 + s / 10e9} for s in sizes]
    scores = [{"elements": n, "time_s": noisy(4e-6 + n * 2e-9, rng)}
              for n in (8192, 32768, 131072, 262144)]
    return {"gemm": gemm, "copy": copy, "scores": scores, "op_overhead_s": 15e-6,
            "collectives": coll}


def test_built_profile_round_trips_and_drives_the_search(tmp_path, monkeypatch, capsys):
    info = {"host": "test", "ranks": 4, "backend": "gloo", "date": "2026-11-23",
            "device": "cpu", "dtype": "fp32"}
    prof = build_profile("local-cpu", "synthetic", 2, info, synthetic_measurements(
        random.Random(2)))
    a2a = prof.fitted_for("all_to_all", "inter")
    assert a2a.bandwidth_Bps == pytest.approx(1e9, rel=0.1)
    assert a2a.latency_s == pytest.approx(80e-6, rel=0.2)
    assert prof.intra.latency_s == pytest.approx(30e-6, rel=0.2)
    assert prof.device.peak_flops["fp32"] == pytest.approx(40e9, rel=0.01)
    assert prof.device.score_element_s == pytest.approx(2e-9, rel=0.1)
    older = {k: v for k, v in synthetic_measurements(random.Random(2)).items() if k != "scores"}
    assert build_profile("local-cpu", "old", 2, info, older).device.score_element_s == 0.0
    path = tmp_path / "p.json"
    path.write_text(prof.model_dump_json(indent=2))
    assert ClusterProfile.model_validate_json(path.read_text()) == prof
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(moeplan_cli, ["search", "--model", "tiny-pr-moe", "--gpus", "4",
                                          "--profile", "p.json", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["cluster"] == "synthetic"


def test_profile_summary_shows_what_a_running_step_costs(capsys):
    """`moeplan profile`'s summary: the in-step factors and untimed time, and where ranks share
    cores the contention and the turn share; an older profile's untimed share as a fraction."""
    from moeplan.cli.render import print_profile
    from moeplan.spec.cluster import FrameworkOverhead

    cluster = load_cluster("local-cpu")

    def shown(**fw) -> str:
        print_profile(cluster.model_copy(update={"device": cluster.device.model_copy(update={
            "framework": FrameworkOverhead(phases={}, optimizer_tensor_s=1e-5, **fw)})}))
        return " ".join(capsys.readouterr().out.split())

    out = shown(ranks=4, cores=2, contention=2.1, in_step=1.47, turn_share=0.88,
                untimed_layer_s=2.6e-3)
    assert "compute x1.47" in out and "untimed 2.60 ms per layer and micro-step" in out
    assert "4 ranks on 2 cores: contention 2.10, turn share 0.88" in out
    out = shown(ranks=2, cores=2, untimed_fraction=0.094)
    assert "untimed 9.4% of the step" in out and "turn share" not in out


def test_exchange_scales_recover_how_each_algorithm_combines_its_tiers():
    """Flat measured with overlapping messages (half the per-peer latency) and the hierarchical
    exchange with a costly second call (twice its latency): the fitted factors come back, the
    cost model then reproduces both measurements, and which algorithm is cheaper follows them."""
    from moeplan.cost_models import collectives as coll

    info = {"host": "test", "ranks": 4, "backend": "gloo", "date": "2026-11-23",
            "device": "cpu", "dtype": "fp32"}
    m = synthetic_measurements(random.Random(3))
    tiers_only = build_profile("local-cpu", "synthetic", 2, info, m)
    assert tiers_only.exchanges == []  # nothing measured over nodes: the tier model as it is
    span = coll.GroupSpan(size=4, per_node=2, nodes=2)
    truth = {"flat": (0.5, 1.2), "hierarchical": (2.0, 1.0)}
    parts = {"flat": coll.all_to_all_flat_parts,
             "hierarchical": coll.all_to_all_hierarchical_parts}
    rng, rows = random.Random(4), []
    for algo, (k_lat, k_bytes) in truth.items():
        for s in [2.0 ** k for k in range(12, 24)]:
            lat, tr = parts[algo](s, span, tiers_only)
            rows.append({"algorithm": algo, "group_size": 4, "per_node": 2, "bytes": s,
                         "time_s": noisy(k_lat * lat + k_bytes * tr, rng)})
    prof = build_profile("local-cpu", "synthetic", 2, info, {**m, "exchanges": rows})
    for algo, (k_lat, k_bytes) in truth.items():
        got = prof.exchange_for(algo)
        assert got.latency_scale == pytest.approx(k_lat, rel=0.1)
        assert got.transfer_scale == pytest.approx(k_bytes, rel=0.1)
    small = 2.0 ** 12
    before = (coll.all_to_all_flat_s(small, span, tiers_only),
              coll.all_to_all_hierarchical_s(small, span, tiers_only))
    after = (coll.all_to_all_flat_s(small, span, prof),
             coll.all_to_all_hierarchical_s(small, span, prof))
    assert before[1] < before[0] and after[0] < after[1]  # the measurements flip the choice
    for algo, t in zip(truth, after):
        measured = next(r["time_s"] for r in rows if r["algorithm"] == algo and r["bytes"] == small)
        assert t == pytest.approx(measured, rel=0.1)
    one_node = coll.GroupSpan(size=2, per_node=2, nodes=1)  # not what was measured: unscaled
    assert coll.all_to_all_flat_s(small, one_node, prof) == coll.all_to_all_flat_s(
        small, one_node, tiers_only)


def test_rested_exchanges_give_back_a_token_bucket_that_the_step_refills():
    """Links behind a token bucket (credit 9 ms): back to back the flat exchange pays 4× its
    per-peer latency, rested half of it; the fit recovers both and the credit, an
    exchange after idle time is shorter by at most the credit and never below rested, a layer
    whose compute refills the bucket is charged less — enough here to turn the planner from
    hierarchical to flat — and groups on one node and profiles without rested timings are
    untouched."""
    from moeplan.calibrate.in_situ import predicted_phases_s
    from moeplan.cost_models import collectives as coll
    from moeplan.cost_models.env import LayerChoice
    from moeplan.planner.planning import Request, fixed_plan
    from moeplan.spec import load_model

    info = {"host": "test", "ranks": 4, "backend": "gloo", "date": "2026-11-30",
            "device": "cpu", "dtype": "fp32"}
    m = synthetic_measurements(random.Random(5))
    tiers = build_profile("local-cpu", "synthetic", 2, info, m)
    span, credit = coll.GroupSpan(size=4, per_node=2, nodes=2), 9e-3
    parts = {"flat": coll.all_to_all_flat_parts,
             "hierarchical": coll.all_to_all_hierarchical_parts}
    busy = {"flat": (4.0, 1.0), "hierarchical": (1.5, 1.0)}
    rested = {"flat": (0.5, 0.5), "hierarchical": (1.2, 0.5)}
    rows = []
    for algo in parts:
        for s in [2.0 ** k for k in range(12, 27)]:
            lat, tr = parts[algo](s, span, tiers)
            t_busy = busy[algo][0] * lat + busy[algo][1] * tr
            t_rest = rested[algo][0] * lat + rested[algo][1] * tr
            row = {"algorithm": algo, "group_size": 4, "per_node": 2, "bytes": s}
            rows += [{**row, "time_s": t_busy},
                     {**row, "rested": True, "time_s": max(t_rest, t_busy - credit)}]
    prof = build_profile("local-cpu", "synthetic", 2, info, {**m, "exchanges": rows})
    no_rest = build_profile("local-cpu", "synthetic", 2, info, {
        **m, "exchanges": [r for r in rows if not r.get("rested")]})
    assert [e.credit_s for e in no_rest.exchanges] == [0.0, 0.0]
    for algo, e in zip(parts, prof.exchanges):
        assert e.algorithm == algo and e.credit_s == pytest.approx(credit, rel=0.05)
        assert (e.latency_scale, e.transfer_scale) == pytest.approx(busy[algo], rel=0.05)
        # the rested fit sees the bucket's end at the largest sizes too: its latency is what
        # the small sizes, all under the credit, measured
        assert e.rested_latency_scale == pytest.approx(rested[algo][0], rel=0.2)
    small = 2.0 ** 14
    flat = [coll.all_to_all_flat_s(small, span, prof, idle) for idle in (0.0, 1e-4, 1.0)]
    lat, tr = coll.all_to_all_flat_parts(small, span, prof)
    e = prof.exchange_for("flat")
    assert flat[0] == pytest.approx(e.latency_scale * lat + e.transfer_scale * tr, rel=F64_REL)
    assert flat[1] == pytest.approx(flat[0] - 1e-4, rel=F64_REL)
    assert flat[2] == pytest.approx(e.rested_latency_scale * lat + e.rested_transfer_scale * tr, rel=F64_REL)
    big = 2.0 ** 26  # beyond the bucket: rested saves the credit, no more
    lat, tr = coll.all_to_all_flat_parts(big, span, prof)
    assert coll.all_to_all_flat_s(big, span, prof, 1.0) == pytest.approx(
        coll.all_to_all_flat_s(big, span, prof) - e.credit_s, rel=F64_REL)
    assert coll.all_to_all_flat_s(big, span, prof, 1.0) > (e.rested_latency_scale * lat
                                                          + e.rested_transfer_scale * tr)
    one_node = coll.GroupSpan(size=2, per_node=2, nodes=1)
    assert coll.all_to_all_flat_s(small, one_node, prof, 1.0) == coll.all_to_all_flat_s(
        small, one_node, prof)
    # a training step of tiny-pr-moe over the two nodes: its compute rests the links
    spec = load_model("tiny-pr-moe")
    req = Request(gpus=4, mode="train", global_batch=4, seq_len=16, zero_stage=0,
                  simulate_top=0)

    def a2a(profile, algo: str) -> float:
        choices = {i: LayerChoice(ep=4, es=1, a2a=algo, coordinated=False)
                   for i, E in enumerate(spec.experts) if E >= 4}
        return predicted_phases_s(fixed_plan(spec, profile, req, 1, choices),
                                  ("dispatch_a2a", "combine_a2a"))

    slow = prof.model_copy(update={"device": prof.device.model_copy(update={
        "peak_flops": {"fp32": 2e8}})})  # compute long enough to refill the bucket
    assert a2a(slow, "flat") < a2a(no_rest.model_copy(update={"device": slow.device}), "flat")
    assert a2a(no_rest, "hierarchical") < a2a(no_rest, "flat")
    assert a2a(slow, "flat") < a2a(slow, "hierarchical")
    # the bucket is the link's: a scattered size that inflates one algorithm's estimate (flat
    # "saves" 90% at the largest size, several credits) leaves both with the other's 9 ms;
    # where only one algorithm saved clearly, both take its credit
    biggest = max(r["bytes"] for r in rows)

    def rested_as(algo: str, time_of) -> list[dict]:
        return [{**r, "time_s": time_of(r)} if r.get("rested") and r["algorithm"] == algo
                else r for r in rows]

    busy_at = {(r["algorithm"], r["bytes"]): r["time_s"] for r in rows if not r.get("rested")}
    assert busy_at["flat", biggest] > 3 * credit
    scattered = rested_as("flat", lambda r: busy_at["flat", biggest] / 10
                          if r["bytes"] == biggest else r["time_s"])
    no_hier = rested_as("hierarchical", lambda r: 10.0)  # resting never helped
    for rs in (scattered, no_hier):
        assert [e.credit_s for e in build_profile("local-cpu", "synthetic", 2, info, {
            **m, "exchanges": rs}).exchanges] == pytest.approx([credit] * 2, rel=0.05)


def test_in_situ_extras_are_what_a_running_step_took_beyond_the_model():
    """The probe's plans costed on a profile, run "measured" at the prediction plus a known
    extra per all-to-all call and per gradient sync: the extras come back, and a plan on the
    profile that carries them is charged exactly that much more."""
    from moeplan.calibrate.in_situ import exchanges_per_pass, in_situ_extras
    from moeplan.calibrate.shapes import in_situ_plans
    from moeplan.planner.planning import Request, fixed_plan
    from moeplan.spec import load_model
    from moeplan.spec.cluster import FrameworkOverhead

    cluster = load_cluster("local-cpu")
    cluster = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "framework": FrameworkOverhead(phases={}, optimizer_tensor_s=1e-5)})})
    plans = in_situ_plans(cluster, 4)
    assert exchanges_per_pass(plans["train"]) == 8 and exchanges_per_pass(plans["infer"]) == 4

    def a2a(plan) -> float:
        return sum(l.predicted.phases_s.get(ph, 0.0) for l in plan.layers
                   for ph in ("dispatch_a2a", "combine_a2a"))

    def sync(plan) -> float:
        return plan.predicted.head_phases_s.get("grad_sync", 0.0) + sum(
            l.predicted.phases_s.get("grad_sync", 0.0) for l in plan.layers)

    measured = {"world": 4,
                "train": {"a2a_s": a2a(plans["train"]) + 8 * 3e-4,
                          "grad_sync_s": sync(plans["train"]) + 2e-3,
                          "step_s": 0.11, "timed_s": 0.1},
                "infer": {"a2a_s": a2a(plans["infer"]) + 4 * 5e-4, "grad_sync_s": 0.0,
                          "step_s": 0.0103, "timed_s": 0.01}}
    got = in_situ_extras(measured, cluster)
    layers = len(plans["train"].layers)  # one micro-step a step
    assert got == pytest.approx({"exchange_extra_s": 3e-4, "decode_exchange_extra_s": 5e-4,
                                 "grad_sync_extra_s": 2e-3, "untimed_layer_s": 0.01 / layers,
                                 "decode_untimed_layer_s": 3e-4 / layers}, rel=F64_REL)
    slower = {**measured, "train": {"a2a_s": 0.0, "grad_sync_s": 0.0}}
    assert in_situ_extras(slower, cluster)["exchange_extra_s"] == 0.0  # never below the model
    with_extras = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "framework": cluster.device.framework.model_copy(update=got)})})
    again = in_situ_plans(with_extras, 4)
    assert a2a(again["train"]) == pytest.approx(a2a(plans["train"]) + 8 * 3e-4, rel=F64_REL)
    assert a2a(again["infer"]) == pytest.approx(a2a(plans["infer"]) + 4 * 5e-4, rel=F64_REL)
    assert sync(again["train"]) == pytest.approx(sync(plans["train"]) + 2e-3, rel=F64_REL)
    # the untimed time: an `untimed` head phase, per layer and micro-step — the run's back
    for mode, t in (("train", 0.01), ("infer", 3e-4)):
        assert again[mode].predicted.head_phases_s["untimed"] == pytest.approx(t, rel=F64_REL)
    assert "untimed" not in plans["train"].predicted.head_phases_s
    # a plan of twice the layers and several micro-steps: that many times the untimed time
    spec = load_model("tiny-pr-moe")
    wide = fixed_plan(spec.model_copy(update={"num_layers": 2 * layers,
                                              "experts": [0] * (2 * layers)}),
                      with_extras, Request(gpus=4, mode="train", global_batch=64, seq_len=16,
                                           zero_stage=0, simulate_top=0), 1, {}, micro_batch=4)
    w = wide.workload
    micro_steps = w.global_batch // (wide.parallel.dp * w.micro_batch)
    assert micro_steps > 1
    assert wide.predicted.head_phases_s["untimed"] == pytest.approx(
        got["untimed_layer_s"] * 2 * layers * micro_steps, rel=F64_REL)


def test_turn_share_is_the_share_of_the_turns_ranks_waited_at_the_exchanges():
    """Four ranks on two cores: the probe's plans "measured" with their all-to-alls at the
    collectives + 0.6 (training) and 0.9 (decode) of the turn waits the model charges: the
    shares come back, and plans on the profile that carries them are charged exactly the
    measured all-to-all time. Ranks that do not take turns: nothing."""
    from moeplan.calibrate.in_situ import _without_waits, in_situ_turns, predicted_phases_s
    from moeplan.calibrate.shapes import in_situ_plans
    from moeplan.spec.cluster import FrameworkOverhead
    from moeplan.spec.phases import EXCHANGE

    cluster = load_cluster("local-cpu")
    fw = FrameworkOverhead(phases={}, optimizer_tensor_s=1e-5, ranks=4, cores=2)
    cluster = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "framework": fw})})
    share = {"train": 0.6, "infer": 0.9}
    charged, bare = in_situ_plans(cluster, 4), in_situ_plans(_without_waits(cluster), 4)
    measured = {"world": 4}
    for mode in share:
        coll = predicted_phases_s(bare[mode], EXCHANGE)
        waits = predicted_phases_s(charged[mode], EXCHANGE) - coll
        assert waits > 0
        measured[mode] = {"a2a_s": coll + share[mode] * waits}
    got = in_situ_turns(measured, cluster)
    assert got == pytest.approx({"turn_share": 0.6, "decode_turn_share": 0.9}, rel=F64_REL)
    fitted = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "framework": fw.model_copy(update=got)})})
    again = in_situ_plans(fitted, 4)
    for mode in share:
        assert predicted_phases_s(again[mode], EXCHANGE) == pytest.approx(
            measured[mode]["a2a_s"], rel=F64_REL)
    apart = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "framework": fw.model_copy(update={"cores": 4})})})
    assert in_situ_turns(measured, apart) == {}


def test_in_step_factor_recovers_a_known_slowdown_of_compute():
    """The probe's plans "measured" with their compute 1.3× (training) and 1.6× (decode) the
    prediction and their all-to-alls and gradient sync as predicted: the factors come back,
    stay within their bounds, and a plan on the profile that carries them charges every compute
    phase, the head and the optimizer that much more and its exchanges no less."""
    from moeplan.calibrate.in_situ import (
        IN_STEP_RANGE,
        in_situ_factors,
        predicted_compute_s,
    )
    from moeplan.calibrate.shapes import in_situ_plans
    from moeplan.spec.cluster import FrameworkOverhead

    cluster = load_cluster("local-cpu")
    cluster = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "framework": FrameworkOverhead(phases={}, optimizer_tensor_s=1e-5)})})
    plans = in_situ_plans(cluster, 2)

    def phase(plan, name: str) -> float:
        return plan.predicted.head_phases_s.get(name, 0.0) + sum(
            l.predicted.phases_s.get(name, 0.0) for l in plan.layers)

    def run(factor: float, mode: str) -> dict:
        p = plans[mode]
        a2a, sync = phase(p, "dispatch_a2a") + phase(p, "combine_a2a"), phase(p, "grad_sync")
        return {"a2a_s": a2a, "grad_sync_s": sync,
                "timed_s": factor * predicted_compute_s(p) + a2a + sync, "step_s": 1.0}

    got = in_situ_factors({"world": 2, "train": run(1.3, "train"), "infer": run(1.6, "infer")},
                          cluster)
    assert got == pytest.approx({"in_step": 1.3, "decode_in_step": 1.6}, rel=F64_REL)
    wild = in_situ_factors({"world": 2, "train": run(9.0, "train"), "infer": run(0.1, "infer")},
                           cluster)
    assert wild == {"in_step": IN_STEP_RANGE[1], "decode_in_step": IN_STEP_RANGE[0]}
    slowed = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "framework": cluster.device.framework.model_copy(update=got)})})
    again = in_situ_plans(slowed, 2)
    for mode, f in (("train", 1.3), ("infer", 1.6)):
        assert predicted_compute_s(again[mode]) == pytest.approx(f * predicted_compute_s(
            plans[mode]), rel=F64_REL)
        for name in ("attention", "experts", "head") + (("optimizer",) if mode == "train" else ()):
            assert phase(again[mode], name) == pytest.approx(f * phase(plans[mode], name), rel=F64_REL)
        for name in ("dispatch_a2a", "combine_a2a"):
            assert phase(again[mode], name) >= phase(plans[mode], name)


def test_bad_profiles_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = json.loads(load_cluster("local-cpu").model_dump_json())
    cases = {"notjson.json": "{", "negative.json": json.dumps(
        {**good, "intra": {**good["intra"], "bandwidth_Bps": -1}}),
        "extra.json": json.dumps({**good, "bogus": 1})}
    for name, text in cases.items():
        Path(name).write_text(text)
        code, _, err = invoke(moeplan_cli, ["search", "--model", "tiny-pr-moe", "--gpus", "4",
                                            "--profile", name], monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and name in err, err


def test_nvml_absent_is_reported_not_raised(monkeypatch):
    from moeplan.runtime import nvml

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    topo = nvml.topology()
    assert topo["available"] is False and "nvidia-ml-py" in topo["reason"]
    monkeypatch.undo()
    topo = nvml.topology()  # this machine has no driver: the CPU path, with a reason
    assert topo["available"] in (True, False) and ("reason" in topo or "gpus" in topo)


def test_profile_on_cpu_ranks_end_to_end(tmp_path, monkeypatch):
    cmd = [sys.executable, "-c", "from moeplan.cli.main import main; main()", "profile",
           "--nproc", "2", "--gpus-per-node", "1", "--quick", "--out", "local.json"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    prof = load_cluster(str(tmp_path / "local.json"))
    assert prof.gpus_per_node == 1 and prof.device.peak_flops["fp32"] > 1e8
    assert {(f.collective, f.tier) for f in prof.fitted} == {
        (c, "inter") for c in ("allreduce", "allgather", "reduce_scatter", "all_to_all")}
    assert "not measured" in prof.intra.source  # one rank per node: no intra-node groups
    assert "NVML" in r.stderr
    raw = json.loads((tmp_path / "local.raw.json").read_text())
    assert raw["gemm"] and raw["collectives"] and raw["framework"]["work_all_ranks"]
    fw = prof.device.framework  # the runtime's own model, measured
    assert fw is not None and fw.ranks == 2 and fw.cores and fw.contention >= 1.0
    assert {"dense.attention", "moe.gate", "moe.experts", "head"} <= set(fw.phases)
    # the experts' fixed part is a line over the local experts, its intercept clamped at 0 (a
    # noisy host can measure it below 0): one local expert must cost something
    per_local = fw.phases["moe.experts_per_local"]
    assert fw.phases["moe.experts"].forward_s + per_local.forward_s > 0
    free = [k for k, o in fw.phases.items()
            if o.forward_s <= 0 and k not in ("moe.experts", "moe.experts_per_local")]
    assert not free, free
    situ = raw["in_situ"]  # the probe run by moerun's own loops, experts over both ranks
    assert situ["world"] == 2 and situ["train"]["a2a_s"] > 0 and situ["infer"]["a2a_s"] > 0
    assert len(situ["samples"]) == 3  # one at each of three moments (--quick)
    # every calibration pooled over the three moments, two repeats (four for the model's
    # training tables) at each
    assert {r["samples"] for r in raw["gemm"]} == {3 * 2}
    assert raw["framework"]["samples"] == {"tables": 3 * 4, "skew": 3 * 3 * 2}
    assert situ["train"]["grad_sync_s"] > 0
    # the spread of each calibration group over the three moments: the band on predictions
    assert set(prof.spread) == {"compute", "framework", "communication", "model"}
    assert all(sp.p10 <= 1.0 <= sp.p90 and "measured" in sp.source
               for sp in prof.spread.values())
    assert fw.exchange_extra_s >= 0 and fw.grad_sync_extra_s >= 0
    # the accuracy benchmark's --recost rebuilds a profile from its raw measurements with the
    # current code: from the same code, the profile that was written
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import bench_accuracy

    work = tmp_path / "work"
    work.mkdir()
    for src, dst in (("local.json", "local-2.json"), ("local.raw.json", "local-2.raw.json")):
        (work / dst).write_text((tmp_path / src).read_text())
    rebuilt = bench_accuracy.rebuilt_profiles(work)
    assert load_cluster(rebuilt[2]) == prof
    assert bench_accuracy.stored_runs(work) == {}  # no runs in it


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "3"], "not a whole number of 2-rank nodes"),
    (["--base", "nope"], "unknown cluster 'nope'"),
    (["--backend", "nccl"], "--backend nccl needs GPUs"),
    (["--nproc", "0"], "--nproc"),
    (["--name", "bad\x01name"], "no control characters"),  # was refused after measuring
])
def test_profile_bad_inputs_are_one_line(argv, message, monkeypatch, capsys, tmp_path):
    from moeplan.runtime import nvml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nvml, "topology", lambda: {"available": False, "reason": "no driver"})
    code, _, err = invoke(moeplan_cli, ["profile", *argv], monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_in_situ_keeps_the_median_sample_whole():
    from moeplan.calibrate.in_situ import in_situ_medians, median_sample

    def smp(step_ms: float, a2a_ms: float) -> dict:
        return {"a2a_s": a2a_ms / 1e3, "grad_sync_s": 0.003, "step_s": step_ms / 1e3,
                "timed_s": 0.9 * step_ms / 1e3}

    fast, slow = [smp(38, 5), smp(40, 9), smp(43, 6)], [smp(70, 20), smp(90, 30), smp(120, 40)]
    # the host's two speeds, three samples each: the lower of the middle two, its figures
    # together (its own all-to-all, not the median of the all-to-alls)
    got = median_sample([slow[2], fast[0], slow[0], fast[2], slow[1], fast[1]])
    assert got == fast[2] and got is not fast[2]
    assert median_sample([slow[1], fast[0], slow[0]]) == slow[0]  # three (--quick)
    assert median_sample([fast[1]]) == fast[1]
    # a profile's raw file keeps the samples: building it takes their median, whatever was kept
    kept = {"world": 2, "samples": [{"train": t, "infer": i} for t, i in zip(slow, fast)],
            "train": slow[0], "infer": fast[0]}
    got = in_situ_medians(kept)
    assert got["train"] == slow[1] and got["infer"] == fast[1] and got["world"] == 2
    assert in_situ_medians({"world": 2, "train": slow[0]}) == {"world": 2, "train": slow[0]}


def test_a_fit_that_fails_keeps_the_base_term_and_says_so():
    """Launch-bound GEMM and copy times (flat with size, as a GPU shows at CPU-sized sweeps)
    cannot be fitted: the profile keeps the base profile's peak, curve and bandwidth and names
    the failed fits in its source, instead of ending without a profile."""
    info = {"host": "test", "ranks": 4, "backend": "gloo", "date": "2026-12-01",
            "device": "cpu", "dtype": "fp32"}
    m = synthetic_measurements(random.Random(2))
    flat = {**m, "gemm": [{**r, "time_s": 5e-6} for r in m["gemm"]],
            "copy": [{**r, "time_s": 5e-6} for r in m["copy"]]}
    prof = build_profile("local-cpu", "flat", 2, info, flat)
    base = load_cluster("local-cpu").device
    assert prof.device.peak_flops["fp32"] == pytest.approx(
        base.peak_flops["fp32"] * base.gemm_efficiency.max_efficiency, rel=F64_REL)
    assert prof.device.hbm_Bps == pytest.approx(base.hbm_Bps * base.hbm_efficiency, rel=F64_REL)
    assert "GEMM throughput not fitted" in prof.device.source
    assert "memory bandwidth not fitted" in prof.device.source
    assert prof.device.score_element_s == pytest.approx(2e-9, rel=0.1)  # that fit still holds


def test_a_gpu_profile_scales_its_unmeasured_dtypes():
    """On a GPU only bf16 is measured: fp16 takes the bf16 rate (the same tensor cores) and
    fp32 the base profile's scaled by the measured bf16 over the base's."""
    info = {"host": "test", "ranks": 2, "backend": "nccl", "date": "2026-12-01",
            "device": "GPU", "dtype": "bf16"}
    prof = build_profile("ndv4-a100-40gb", "gpu", 8, info,
                         synthetic_measurements(random.Random(3)))
    base = load_cluster("ndv4-a100-40gb").device.peak_flops
    peaks = prof.device.peak_flops
    assert peaks["fp16"] == peaks["bf16"]
    assert peaks["fp32"] / base["fp32"] == pytest.approx(peaks["bf16"] / base["bf16"],
                                                         rel=F64_REL)


def test_nvml_errors_on_a_gpu_are_reported_not_raised(monkeypatch):
    """A GPU NVML lists but cannot describe (lost, or a query refused) ends in no topology
    with a reason, never a traceback of `moeplan profile`."""
    import types

    from moeplan.runtime import nvml

    class NVMLError(Exception):
        pass

    def lost(*_):
        raise NVMLError("GPU is lost")

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lost)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    topo = nvml.topology()
    assert topo == {"available": False,
                    "reason": "NVML could not describe the GPUs (GPU is lost)"}
