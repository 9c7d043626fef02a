"""Measured framework cost, work scales and rank sharing: the profile's fits recover what
synthetic probe tables put in, and the cost model charges them (and only where measured)."""

from __future__ import annotations

import math

import pytest
from tolerance import F64_REL

from moeplan.calibrate.framework import framework_overhead, roofline
from moeplan.calibrate.shapes import PROBE_EXPERTS, PROBE_SIZES, WORK_SIZES
from moeplan.calibrate.tables import Direction, Timed, to_raw
from moeplan.cost_models.env import DENSE, Env, LayerChoice, Pass
from moeplan.cost_models.layer import fixed_s, forward, sharing, wait_factor, work_scale
from moeplan.cost_models.step import train_layer
from moeplan.planner.planning import Request, _hand_on_waits, fixed_plan
from moeplan.spec import load_cluster, load_model
from moeplan.spec.cluster import FrameworkOverhead, PhaseOverhead
from moeplan.spec.phases import HEAD_PHASE, LayerPhase, Phase
from moeplan.spec.workload import Setting, Workload

PHASES = ("attention", "mlp", "tp_comm")
MOE_PHASES = ("attention", "mlp", "tp_comm", "gate", "dispatch", "dispatch_a2a", "experts",
              "combine_a2a", "combine", "es_comm")


def synthetic_tables(fwd: dict, bwd: dict, infer: dict, per_local: tuple, scale: dict,
                     roof: dict, dscale: dict) -> dict:
    """Probe tables as `probe.Framework.result` returns them, from known per-phase figures:
    experts cost fwd/bwd/infer + per_local × local experts; each work size measures the fixed
    part plus `scale[phase]` × the roofline."""
    F, B = Direction.FORWARD, Direction.BACKWARD

    def table(which: str) -> dict:
        out = {}
        for i, E in enumerate(PROBE_EXPERTS):
            for ph in (MOE_PHASES if E else PHASES):
                f, b = fwd[ph], bwd[ph]
                if ph == "experts":
                    f, b = f + per_local[0] * E, b + per_local[1] * E
                if which in WORK_SIZES and ph in scale:
                    extra = scale[ph] * roof[which][LayerPhase(i, Phase(ph))]
                    f, b = f + extra / 3, b + 2 * extra / 3
                out[Timed(F, i, Phase(ph))], out[Timed(B, i, Phase(ph))] = f, b
        out[Timed(F, *HEAD_PHASE)], out[Timed(B, *HEAD_PHASE)] = fwd["head"], bwd["head"]
        return to_raw(out)

    tokens = {"fixed": 7, **dict.fromkeys(WORK_SIZES, 15)}

    def decoded(size: str) -> dict:
        """Decode tables: the fixed part per token, plus `dscale[phase]` × the decode roofline
        at the work sizes; totals over the size's decode tokens."""
        out = {}
        for i, E in enumerate(PROBE_EXPERTS):
            for ph in (*(MOE_PHASES if E else PHASES), "head"):
                if ph == "head" and i:
                    continue
                key = HEAD_PHASE if ph == "head" else LayerPhase(i, Phase(ph))
                v = infer[ph] + (per_local[2] * E if ph == "experts" else 0.0)
                if size in WORK_SIZES and ph in dscale:
                    v += dscale[ph] * roof["decode:" + size][key]
                out[Timed(F, *key)] = v * tokens[size]
        return to_raw(out)

    inf = decoded("work")
    return {"train": table("train"), **{w: table(w) for w in WORK_SIZES},
            "work_all_ranks": {k: 3.0 * v for k, v in table("work").items()},
            "skew": 0.05, "infer_fixed": decoded("fixed"), "infer": inf,
            **{f"infer_{w}": decoded(w) for w in WORK_SIZES[1:]},
            "infer_all_ranks": {k: 2.0 * v for k, v in inf.items()},
            "decode_tokens": tokens,
            "optimizer": [(40 * 50e-6 + 1_000 * 2e-9, 1_000), (40 * 50e-6 + 500_000 * 2e-9,
                                                                 500_000)],
            "tensors": 40, "cores": 2, "host_ranks": 4}


@pytest.fixture(scope="module")
def fitted():
    names = set(MOE_PHASES) | {"head"}
    fwd = {ph: 100e-6 + 10e-6 * k for k, ph in enumerate(sorted(names))}
    bwd = {ph: 2 * v for ph, v in fwd.items()}
    infer = {ph: v / 2 for ph, v in fwd.items()}
    scale = {"attention": 3.0, "mlp": 2.0, "experts": 1.5}
    cluster = load_cluster("local-cpu")
    roof = {**{w: roofline(cluster, "fp32", w) for w in WORK_SIZES},
            **{"decode:" + w: roofline(cluster, "fp32", w, decode=True) for w in WORK_SIZES}}
    fw = framework_overhead(synthetic_tables(fwd, bwd, infer, (7e-6, 11e-6, 5e-6), scale, roof,
                                             DECODE_SCALE), roof, 4, "test", "cpu")
    return fw, fwd, bwd, infer, scale, cluster


DECODE_SCALE = {"experts": 4.0, "mlp": 2.5, "head": 1.5}


def test_fits_recover_fixed_costs_per_phase_and_per_local_expert(fitted):
    fw, fwd, bwd, infer, _, _ = fitted
    for key, ph in (("dense.attention", "attention"), ("moe.gate", "gate"), ("head", "head"),
                    ("moe.dispatch_a2a", "dispatch_a2a")):
        o = fw.phases[key]
        assert (o.forward_s, o.backward_s, o.infer_s) == pytest.approx(
            (fwd[ph], bwd[ph], infer[ph]), rel=1e-9)
    assert fw.phases["moe.experts"].forward_s == pytest.approx(fwd["experts"], rel=1e-9)
    per = fw.phases["moe.experts_per_local"]
    assert (per.forward_s, per.backward_s, per.infer_s) == pytest.approx((7e-6, 11e-6, 5e-6), rel=F64_REL)


def test_fits_recover_work_scales_contention_and_optimizer_costs(fitted):
    fw, _, _, _, scale, _ = fitted
    for key, ph in (("dense.attention", "attention"), ("dense.mlp", "mlp"),
                    ("moe.experts", "experts")):
        pts = fw.phases[key].work_points
        assert len(pts) == len(WORK_SIZES) and all(a[0] < b[0] for a, b in zip(pts, pts[1:]))
        assert [s for _, s in pts] == pytest.approx([scale[ph]] * len(WORK_SIZES), rel=1e-6)
    assert fw.phases["moe.gate"].work_scale == 1.0  # measured no more than the roofline
    assert fw.contention == pytest.approx(3.0, rel=F64_REL) and fw.cores == 2 and fw.ranks == 4
    assert fw.decode_contention == pytest.approx(2.0, rel=F64_REL)
    assert fw.optimizer_tensor_s == pytest.approx(50e-6, rel=F64_REL) and fw.optimizer_param_s == \
        pytest.approx(2e-9, rel=F64_REL)


def test_fits_recover_decode_work_scales_from_decoding_at_every_size(fitted):
    fw, _, _, infer, _, _ = fitted
    for key, ph in (("dense.mlp", "mlp"), ("moe.experts", "experts"), ("head", "head")):
        pts = fw.phases[key].decode_points
        assert len(pts) == len(WORK_SIZES) and all(a[0] < b[0] for a, b in zip(pts, pts[1:]))
        assert [s for _, s in pts] == pytest.approx([DECODE_SCALE[ph]] * len(WORK_SIZES), rel=1e-6)
        assert fw.phases[key].infer_s == pytest.approx(infer[ph], rel=F64_REL)  # the smallest size's
    assert [s for _, s in fw.phases["dense.attention"].decode_points] == [1.0] * len(WORK_SIZES)
    cluster = load_cluster("local-cpu")
    env = env_with(cluster, fw, mode="infer")
    x, y = fw.phases["moe.experts"].decode_points[0]
    assert work_scale(env, "moe.experts", Pass(2, 56, True), x) == pytest.approx(y, rel=F64_REL)


def test_profiles_decoded_at_one_size_still_build():
    """Raw measurements from before decoding at every size: decode tables of the "work" size
    only — its per-token time is the fixed part and decode keeps the roofline."""
    cluster = load_cluster("local-cpu")
    roof = {w: roofline(cluster, "fp32", w) for w in WORK_SIZES}
    names = set(MOE_PHASES) | {"head"}
    fwd = {ph: 100e-6 for ph in names}
    tables = synthetic_tables(fwd, fwd, fwd, (0, 0, 0), {}, {**roof, **{
        "decode:" + w: {} for w in WORK_SIZES}}, {})
    old = {k: v for k, v in tables.items()
           if k not in ("infer_fixed", *(f"infer_{w}" for w in WORK_SIZES[1:]))}
    old["decode_tokens"] = 15
    fw = framework_overhead(old, roof, 4, "test", "cpu")
    assert fw.phases["dense.mlp"].infer_s == pytest.approx(100e-6, rel=F64_REL)
    assert fw.phases["dense.mlp"].decode_points == []


def test_profiles_probed_at_fewer_sizes_keep_the_points_they_have():
    """Raw measurements from before the largest working size was probed: its tables are
    missing, so its point is absent and the others' scales stand."""
    cluster = load_cluster("local-cpu")
    roof = {**{w: roofline(cluster, "fp32", w) for w in WORK_SIZES},
            **{"decode:" + w: roofline(cluster, "fp32", w, decode=True) for w in WORK_SIZES}}
    names = set(MOE_PHASES) | {"head"}
    fwd = {ph: 100e-6 for ph in names}
    tables = synthetic_tables(fwd, fwd, fwd, (0, 0, 0), {"mlp": 2.0}, roof, {"mlp": 3.0})
    last = WORK_SIZES[-1]
    del tables[last], tables[f"infer_{last}"]
    fw = framework_overhead(tables, roof, 4, "test", "cpu")
    o = fw.phases["dense.mlp"]
    assert [s for _, s in o.work_points] == pytest.approx([2.0] * (len(WORK_SIZES) - 1), rel=1e-6)
    assert [s for _, s in o.decode_points] == pytest.approx([3.0] * (len(WORK_SIZES) - 1),
                                                            rel=1e-6)
    assert str(PROBE_SIZES["cpu"][last]) not in fw.source


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_probe_sizes_grow_and_cost_on_their_device(kind):
    """Each device kind's working sizes are valid models whose roofline grows from one size to
    the next (the work scales are interpolated in it), the largest reaching a step's tokens."""
    cluster = load_cluster("local-cpu" if kind == "cpu" else "ndv4-a100-40gb")
    dtype = "fp32" if kind == "cpu" else "bf16"
    sizes = PROBE_SIZES[kind]
    for h, heads, f, _, _ in sizes.values():
        assert h % heads == 0 and f % h == 0
    totals = [sum(roofline(cluster, dtype, w).values()) for w in WORK_SIZES]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    decode = [sum(roofline(cluster, dtype, w, decode=True).values()) for w in WORK_SIZES]
    assert all(a < b for a, b in zip(decode, decode[1:]))
    _, _, _, B, S = sizes[WORK_SIZES[-1]]
    assert B * S >= (2048 if kind == "cpu" else 8192)


def test_a_working_size_the_device_cannot_hold_is_left_out(monkeypatch):
    """A GPU too small for the probe's largest size runs out of memory building or running it:
    the probe leaves that size out (its tables, its decode tokens, its recorded shape) instead of
    failing the profile, and keeps the others."""
    torch = pytest.importorskip("torch")
    from moeplan.calibrate import probe
    from moeplan.calibrate.sampling import Bench

    real, last = probe._trainer, WORK_SIZES[-1]

    def trainer(b, size):
        if size != last:
            return real(b, size)

        def out_of_memory(timer):
            raise torch.OutOfMemoryError("out of memory (test)")
        return out_of_memory

    monkeypatch.setattr(probe, "_trainer", trainer)
    fw = probe.Framework(Bench(0, 1, torch.device("cpu"), 0, 1), quick=True)
    assert last not in fw.train_cases and f"infer_{last}" not in fw.decode_cases
    assert all(size in fw.train_cases for size in WORK_SIZES[1:-1])
    fw.sample(0)  # one moment, so that the result has its figures
    raw = fw.result()
    assert last not in raw and last not in raw["probe_sizes"] and last not in raw["decode_tokens"]
    assert list(raw["probe_sizes"]) == ["fixed", *WORK_SIZES[:-1]]


def env_with(cluster, fw: FrameworkOverhead | None, gpus: int = 4, mode: str = "train") -> Env:
    dev = cluster.device.model_copy(update={"framework": fw})
    c = cluster.model_copy(update={"device": dev})
    w = (Workload(mode="train", global_batch=4 * gpus, micro_batch=4, seq_len=64, dtype="fp32",
                  zero_stage=0) if mode == "train" else
         Workload(mode="infer", global_batch=2 * gpus, micro_batch=2, seq_len=64, dtype="fp32",
                  prompt_len=48, gen_len=16))
    return Env(load_model("tiny-pr-moe"), c, w, gpus)


def test_cost_model_charges_measured_fixed_costs_only_where_measured(fitted):
    fw, fwd, bwd, infer, _, cluster = fitted
    train, decode = Pass(256, 64, False), Pass(2, 56, True)
    env = env_with(cluster, fw)
    # training charges compute phases three passes, communication two
    assert fixed_s(env, "dense.attention", train) == pytest.approx(
        (fwd["attention"] + bwd["attention"]) / 3, rel=F64_REL)
    assert fixed_s(env, "moe.dispatch_a2a", train) == pytest.approx(
        (fwd["dispatch_a2a"] + bwd["dispatch_a2a"]) / 2, rel=F64_REL)
    assert fixed_s(env, "moe.experts", train, 2) == pytest.approx(
        (fwd["experts"] + bwd["experts"] + 2 * (7e-6 + 11e-6)) / 3, rel=F64_REL)
    assert fixed_s(env_with(cluster, fw, mode="infer"), "moe.gate", decode) == \
        pytest.approx(infer["gate"], rel=F64_REL)
    bare = env_with(cluster, None)  # no measurement: counted operations, no wrapper cost
    assert fixed_s(bare, "moe.dispatch_a2a", train) == 0.0
    assert fixed_s(bare, "dense.attention", train) == pytest.approx(
        (8 + 18) / 3 * cluster.device.op_overhead_s, rel=F64_REL)


def test_work_scale_interpolates_in_log_roofline_and_clamps():
    o = PhaseOverhead(forward_s=0, backward_s=0, infer_s=0, work_scale=3.0,
                      work_points=[(1e-4, 3.0), (4e-4, 2.0)])
    fw = FrameworkOverhead(phases={"dense.mlp": o}, optimizer_tensor_s=0.0)
    env = env_with(load_cluster("local-cpu"), fw)
    p = Pass(256, 64, False)
    assert work_scale(env, "dense.mlp", p, 1e-5) == 3.0
    assert work_scale(env, "dense.mlp", p, 1e-3) == 2.0
    assert work_scale(env, "dense.mlp", p, 2e-4) == pytest.approx(2.5, rel=F64_REL)  # halfway in log
    assert work_scale(env, "dense.mlp", Pass(2, 56, True), 2e-4) == 1.0  # no decode points
    assert work_scale(env, "dense.attention", p, 2e-4) == 1.0  # not measured


@pytest.mark.parametrize("runtime", ["deepspeed", "deepspeed-sparse"])
def test_a_moerun_probe_describes_deepspeeds_own_kernels_by_their_counts_only(fitted, runtime):
    """A measured profile's probe runs moerun: for DeepSpeed's own gate, dispatch, combine and
    expert loop its fixed seconds scale by the two runtimes' operation counts, and its work
    scales (moerun's gathers' distance from the roofline) do not apply to the gate, dispatch and
    combine; the experts' does on CPU ranks, where moerun's loop over biased GELU experts runs
    the same GEMMs as DeepSpeed's, and not on a GPU (moerun's grouped GEMM) nor for gated
    experts (moerun's batched GEMMs); other phases are shared."""
    from dataclasses import replace

    from moeplan.cost_models.runtimes import operations

    fw, *_, cluster = fitted
    scaled = fw.model_copy(update={"phases": {
        k: v.model_copy(update={"work_scale": 7.0, "work_points": [(1e-4, 7.0)]})
        for k, v in fw.phases.items()}})
    mr = env_with(cluster, scaled)
    ds = replace(mr, runtime=runtime)
    train = Pass(256, 64, False)
    for phase, local in (("gate", 0), ("dispatch", 0), ("combine", 0), ("experts", 2)):
        ratio = (operations(runtime, "cpu", phase, True, local, ds.spec)
                 / operations("moerun", "cpu", phase, True, local, mr.spec))
        assert fixed_s(ds, f"moe.{phase}", train, local) == pytest.approx(
            ratio * fixed_s(mr, f"moe.{phase}", train, local), rel=F64_REL)
        assert work_scale(ds, f"moe.{phase}", train, 2e-4) == (7.0 if phase == "experts"
                                                                else 1.0)
        assert work_scale(mr, f"moe.{phase}", train, 2e-4) == 7.0
    gpu = replace(ds, cluster=ds.cluster.model_copy(update={
        "device": ds.cluster.device.model_copy(update={"kind": "gpu"})}))
    gated = replace(ds, spec=ds.spec.model_copy(update={"mlp": "swiglu"}))
    for env in (gpu, gated):
        assert work_scale(env, "moe.experts", train, 2e-4) == 1.0
    for key in ("moe.attention", "dense.mlp"):
        assert fixed_s(ds, key, train) == fixed_s(mr, key, train)
        assert work_scale(ds, key, train, 2e-4) == 7.0


def test_ranks_sharing_cores_take_turns_and_wait_at_the_all_to_alls(fitted):
    fw, *_, cluster = fitted
    env = env_with(cluster, fw)  # 4 ranks, 2 cores, contention 3 measured with 4 ranks
    slow, turns = sharing(env)
    assert (slow, turns) == pytest.approx((1.5, 2.0), rel=F64_REL)
    assert sharing(env, decode=True) == pytest.approx((1.0, 2.0), rel=F64_REL)  # decoding: contention 2
    assert wait_factor(env) == pytest.approx(1.0, rel=F64_REL)
    assert sharing(env_with(cluster, fw, gpus=2))[1] == 1.0
    assert wait_factor(env_with(cluster, fw, gpus=2)) == pytest.approx(0.05, rel=F64_REL)  # the skew
    assert sharing(env_with(cluster, None)) == (1.0, 1.0)
    s = Setting(tp=1, dp=4, micro_batch=4, recompute=False)
    moe = train_layer(env, s, 1, LayerChoice(ep=2, es=1, a2a="flat", coordinated=False))
    compute = sum(t for ph, t in moe.phases.items()
                  if ph in ("attention", "mlp", "gate", "dispatch", "experts", "combine"))
    one = forward(env, s, 1, LayerChoice(ep=2, es=1, a2a="flat", coordinated=False),
                  Pass(256, 64, False))
    a2a_alone = 2 * (one.phases["dispatch_a2a"] + one.phases["combine_a2a"])
    waited = moe.phases["dispatch_a2a"] + moe.phases["combine_a2a"] - a2a_alone
    assert waited == pytest.approx((turns - 1) * compute, rel=1e-9)
    dense = train_layer(env, s, 0, DENSE)
    assert dense.phases["wait"] == pytest.approx(
        (turns - 1) * (dense.phases["attention"] + dense.phases["mlp"]), rel=F64_REL)


def test_dense_waits_move_to_the_collective_that_sees_them():
    layers = [{"attention": 1.0, "wait": 3.0},                               # before any MoE
              {"dispatch_a2a": 1.0, "combine_a2a": 1.0},
              {"attention": 1.0, "wait": 6.0},
              {"dispatch_a2a": 1.0, "combine_a2a": 1.0},
              {"attention": 1.0, "wait": 9.0}]                               # after the last
    exchanging = ["dispatch_a2a" in x for x in layers]
    out = _hand_on_waits([dict(x) for x in layers], exchanging, train=True)
    assert all("wait" not in x for x in out)
    # forward third to the next dispatch, backward two thirds to the previous combine
    assert out[1]["dispatch_a2a"] == pytest.approx(2.0, rel=F64_REL) and out[0]["grad_sync"] == 2.0
    assert out[3]["dispatch_a2a"] == pytest.approx(3.0, rel=F64_REL)
    assert out[1]["combine_a2a"] == pytest.approx(5.0, rel=F64_REL)
    assert out[3]["combine_a2a"] == pytest.approx(1.0 + 3.0 + 6.0, rel=F64_REL)
    assert math.fsum(v for x in out for v in x.values()) == pytest.approx(3 + 4 + 18, rel=F64_REL)  # kept
    inf = _hand_on_waits([dict(x) for x in layers], exchanging, train=False)
    assert inf[1]["dispatch_a2a"] == 4.0 and inf[3]["dispatch_a2a"] == 7.0
    assert inf[3]["combine_a2a"] == 10.0
    # with tensor slicing the layer's own allreduce is the collective that sees it
    tp = _hand_on_waits([{"attention": 1.0, "tp_comm": 0.5, "wait": 2.0}], [False], train=True,
                        tp=2)
    assert tp == [{"attention": 1.0, "tp_comm": 2.5}]


def test_without_any_exchange_the_wait_is_slower_compute():
    # ep = es = 1 everywhere: the all-to-all phases hold only the one-rank wrapper's cost
    layers = [{"attention": 1.0, "mlp": 3.0, "wait": 4.0},
              {"attention": 1.0, "gate": 1.0, "dispatch_a2a": 0.1, "wait": 2.0}]
    out = _hand_on_waits(layers, [False, False], train=True)
    assert out[0] == {"attention": 2.0, "mlp": 6.0}
    assert out[1] == {"attention": 2.0, "gate": 2.0, "dispatch_a2a": 0.1}
    assert _hand_on_waits([{"wait": 2.0}], [False], train=False) == [{"tp_comm": 2.0}]


def test_plan_on_a_measured_profile_keeps_waits_in_runtime_phases(fitted):
    fw, *_, cluster = fitted
    c = cluster.model_copy(update={"device": cluster.device.model_copy(
        update={"framework": fw}), "gpus_per_node": 2})
    spec = load_model("tiny-pr-moe")
    choices = {i: LayerChoice(ep=min(E, 4), es=1, a2a="flat", coordinated=False)
               for i, E in enumerate(spec.experts) if E}
    for r in (Request(gpus=4, mode="train", global_batch=16, seq_len=64, zero_stage=0),
              Request(gpus=4, mode="infer", global_batch=8, prompt_len=48, gen_len=16)):
        p = fixed_plan(spec, c, r, 1, choices)
        for layer in p.layers:
            assert "wait" not in layer.predicted.phases_s
            assert layer.predicted.time_s == pytest.approx(sum(
                layer.predicted.phases_s.values()), rel=F64_REL)
        assert "wait" not in p.predicted.head_phases_s
        total = (sum(layer.predicted.time_s for layer in p.layers)
                 + sum(p.predicted.head_phases_s.values()))
        predicted = p.predicted.step_time_s if r.mode == "train" else p.predicted.latency_s
        assert total == pytest.approx(predicted, rel=1e-9)
