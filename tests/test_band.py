"""The band on every prediction: the profile's spread, propagated through the cost model."""

from __future__ import annotations

import math

import pytest
from tolerance import F64_REL

from moeplan.calibrate.sampling import Pool, spread
from moeplan.cost_models.env import Env, LayerChoice, Pass, Scales
from moeplan.cost_models.layer import forward
from moeplan.planner.band import recost_s
from moeplan.planner.planning import Request, plan
from moeplan.spec import load_cluster, load_model
from moeplan.spec.cluster import Spread
from moeplan.spec.workload import Setting, Workload

NDV4 = load_cluster("ndv4-a100-40gb")


def _plan(cluster, mode="train"):
    req = Request(gpus=64, mode=mode, simulate_top=0)
    return plan(load_model("1.3b-pr-moe"), cluster, req)


def test_one_group_gives_its_own_extremes_and_groups_add_in_quadrature():
    only = NDV4.model_copy(update={"spread": {"compute": Spread(p10=0.9, p90=1.2)}})
    p, result = _plan(only)
    env = Env(load_model("1.3b-pr-moe"), only, p.workload, 64)
    t = p.predicted.step_time_s
    assert recost_s(env, result.best) == pytest.approx(t, rel=F64_REL)  # scales 1: the plan
    b = p.predicted.band
    lo, hi = b.terms_s["compute"]
    assert (b.p10_s, b.p90_s) == pytest.approx((lo, hi), rel=F64_REL)
    assert lo < t < hi and set(b.terms_s) == {"compute"}
    both = only.model_copy(update={"spread": {"compute": Spread(p10=0.9, p90=1.2),
                                              "communication": Spread(p10=0.8, p90=1.5)}})
    b2 = _plan(both)[0].predicted.band
    (clo, chi), (nlo, nhi) = b2.terms_s["compute"], b2.terms_s["communication"]
    assert (clo, chi) == pytest.approx((lo, hi), rel=F64_REL)
    assert b2.p10_s == pytest.approx(t - math.hypot(t - clo, t - nlo), rel=F64_REL)
    assert b2.p90_s == pytest.approx(t + math.hypot(chi - t, nhi - t), rel=F64_REL)


def test_no_spread_no_band_and_builtins_carry_theirs():
    bare = NDV4.model_copy(update={"spread": {}})
    assert _plan(bare)[0].predicted.band is None
    p = _plan(NDV4, "infer")[0]
    assert set(NDV4.spread) == {"compute", "framework", "communication"}
    assert all("assumed" in sp.source for sp in NDV4.spread.values())
    assert p.predicted.band.p10_s < p.predicted.latency_s < p.predicted.band.p90_s


def test_each_scale_moves_only_its_terms():
    spec = load_model("1.3b-pr-moe")
    w = Workload(mode="train", global_batch=512, micro_batch=2, seq_len=2048, dtype="bf16")
    s = Setting(tp=2, dp=32, micro_batch=2, recompute=False)
    c = LayerChoice(ep=32, es=1, a2a="hierarchical", coordinated=False)
    p = Pass(tokens=4096, context=2048, decode=False)
    base = forward(Env(spec, NDV4, w, 64), s, 1, c, p).phases
    net = forward(Env(spec, NDV4, w, 64, scales=Scales(communication=2.0)), s, 1, c, p).phases
    assert net["dispatch_a2a"] == pytest.approx(2 * base["dispatch_a2a"], rel=F64_REL)
    assert net["tp_comm"] == pytest.approx(2 * base["tp_comm"], rel=F64_REL)
    assert net["experts"] == base["experts"] and net["attention"] == base["attention"]
    fixed = forward(Env(spec, NDV4, w, 64, scales=Scales(framework=2.0)), s, 1, c, p).phases
    ops = fixed["gate"] - base["gate"]  # the gate's launches, charged once more
    assert ops > 0 and fixed["dispatch_a2a"] == base["dispatch_a2a"]
    compute = forward(Env(spec, NDV4, w, 64, scales=Scales(compute=2.0)), s, 1, c, p).phases
    assert compute["experts"] > 1.9 * base["experts"]  # its launches are not scaled
    assert compute["tp_comm"] == base["tp_comm"]


def test_pool_spread_is_the_moments_medians_over_the_pooled_one():
    pool = Pool()
    for moment, v in enumerate([1.0, 1.0, 2.0, 1.0, 1.0, 0.5]):
        pool.moment = moment
        pool.add("k", [v, v])
    ratios = pool.moment_ratios(["k"])
    assert sorted(ratios) == [0.5, 1.0, 1.0, 1.0, 1.0, 2.0]
    lo, hi = spread(ratios)
    assert lo < 1.0 < hi and lo >= 0.5 and hi <= 2.0
    assert spread([1.0]) is None
    assert spread([1.1, 1.2])[0] == 1.0  # the band always contains the pooled figure
    pool2 = Pool()
    pool2.add("once", [3.0, 4.0])  # one moment: no spread to speak of
    assert pool2.moment_ratios(["once"]) == []


def test_a_measured_profile_records_its_spread():
    from moeplan.calibrate.build import measured_spread

    got = measured_spread({"compute": {"p10_p90": [0.9, 1.3], "figures": 40}}, "here")
    assert got["compute"].p10 == 0.9 and got["compute"].p90 == 1.3
    assert "40 figures" in got["compute"].source


def test_the_models_own_error_scales_the_whole_figure():
    model = NDV4.model_copy(update={"spread": {"model": Spread(p10=0.9, p90=1.15)}})
    p = _plan(model)[0]
    t = p.predicted.step_time_s
    assert p.predicted.band.terms_s["model"] == pytest.approx((0.9 * t, 1.15 * t), rel=F64_REL)
    assert (p.predicted.band.p10_s, p.predicted.band.p90_s) == pytest.approx(
        (0.9 * t, 1.15 * t), rel=F64_REL)
