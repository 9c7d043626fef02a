"""`moeplan search --fix` (a configuration costed as given) and `--runtime
moerun|deepspeed|deepspeed-sparse` (whose kernels are costed), and the cost terms that separate
GPU runtimes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run  # noqa: F401  (fixture)
from test_moerun import _in_process
from tolerance import F64_REL

from moeplan.cost_models.compute import gemm_floor_s, gemm_s
from moeplan.cost_models.env import Env, LayerChoice, Pass
from moeplan.cost_models.layer import forward
from moeplan.cost_models.traffic import elementwise_bytes
from moeplan.planner.planning import Request, plan
from moeplan.planner.space import Fix, parse_fix
from moeplan.spec import load_cluster, load_model
from moeplan.spec.plan import Plan
from moeplan.spec.workload import Setting, Workload

NDV4 = load_cluster("ndv4-a100-40gb")


def test_fixing_every_degree_costs_one_configuration():
    req = Request(gpus=256, mode="infer", global_batch=256, runtime="deepspeed",
                  fix=parse_fix(["tp=8", "ep=128", "es=2", "a2a=flat", "tp-coordinated=true"]))
    p, result = plan(load_model("24b-moe-128"), NDV4, req)
    assert result.stats.settings == 1 and p.parallel.tp == 8
    moe = [layer for layer in p.layers if layer.kind == "moe"]
    assert {(m.ep, m.es, m.edp, m.a2a, m.a2a_tp_coordinated) for m in moe} == {
        (128, 2, 1, "flat", True)}
    assert result.stats.layer_options == 2  # one dense option, one MoE option
    assert p.provenance.runtime == "deepspeed" and p.predicted.latency_s > 0


def test_an_ep_above_a_layers_experts_is_clamped_and_said():
    req = Request(gpus=128, fix=Fix(ep=128, tp=1))
    p, _ = plan(load_model("1.3b-pr-moe"), NDV4, req)
    assert {(m.experts, m.ep) for m in p.layers if m.kind == "moe"} == {(64, 64), (128, 128)}
    assert len(p.notes) == 1 and "exceeds the 64 experts of layers 2,4..20" in p.notes[0]


def test_fixed_degrees_constrain_the_search_and_the_runtime_changes_the_cost():
    base = Request(gpus=64, mode="infer", global_batch=512, simulate_top=0)
    spec = load_model("1.3b-moe-128")
    free, _ = plan(spec, NDV4, base)
    fixed, _ = plan(spec, NDV4, Request(**{**base.__dict__, "fix": Fix(tp=1, ep=32)}))
    assert all(m.ep == 32 for m in fixed.layers if m.kind == "moe") and fixed.parallel.tp == 1
    assert fixed.predicted.latency_s >= free.predicted.latency_s * (1 - F64_REL)
    ds, _ = plan(spec, NDV4, Request(**{**base.__dict__, "fix": Fix(tp=1, ep=32),
                                        "runtime": "deepspeed"}))
    assert ds.predicted.latency_s > fixed.predicted.latency_s  # loop over every local expert
    assert ds.provenance.inputs_digest != fixed.provenance.inputs_digest


def test_a_fix_that_needs_tensor_slicing_picks_a_tp_that_allows_it():
    """tp-coordination needs tp > 1, and DeepSpeed's training slices experts only over the tp
    group: without tp fixed, the search keeps the tensor-slicing degrees that allow the fix
    rather than refusing at the first one (tp=1)."""
    spec = load_model("1.3b-moe-128")
    coordinated, _ = plan(spec, NDV4, Request(gpus=64, mode="infer", global_batch=512,
                                              simulate_top=0, fix=Fix(coordinated=True)))
    assert coordinated.parallel.tp > 1
    assert all(m.a2a_tp_coordinated for m in coordinated.layers if m.kind == "moe")
    sliced, _ = plan(spec, NDV4, Request(gpus=256, mode="train", global_batch=512,
                                         simulate_top=0, runtime="deepspeed", fix=Fix(es=2)))
    assert sliced.parallel.tp == 2  # DeepSpeed's training: es = tp
    assert all(m.es == 2 for m in sliced.layers if m.kind == "moe")


def test_deepspeed_exchanges_as_its_code_and_the_papers_inference_do():
    """DeepSpeed's code has one flat all-to-all (training, and today's inference MoE); the
    paper's inference system adds the hierarchical one: `deepspeed` offers it for inference
    only, `deepspeed-sparse` never, moerun always (ep groups over several nodes)."""
    from moeplan.cost_models.runtimes import a2a_algorithms
    from moeplan.planner.space import layer_choices

    spec = load_model("1.3b-moe-128")
    s = Setting(tp=1, dp=64, micro_batch=4, recompute=True)
    for runtime, mode, want in (("moerun", "train", {"flat", "hierarchical"}),
                                ("moerun", "infer", {"flat", "hierarchical"}),
                                ("deepspeed", "train", {"flat"}),
                                ("deepspeed", "infer", {"flat", "hierarchical"}),
                                ("deepspeed-sparse", "train", {"flat"}),
                                ("deepspeed-sparse", "infer", {"flat"})):
        env = Env(spec, NDV4, _env(runtime, mode).workload, 64, runtime=runtime)
        assert set(a2a_algorithms(runtime, mode)) == want
        assert {c.a2a for c in layer_choices(env, s, 128) if c.ep == 64} == want, (runtime, mode)
    p, _ = plan(spec, NDV4, Request(gpus=128, mode="train", global_batch=512, simulate_top=0,
                                    runtime="deepspeed", fix=Fix(tp=1, ep=128)))
    assert {m.a2a for m in p.layers if m.kind == "moe"} == {"flat"}


def test_deepspeed_routes_shared_tokens_once_and_slices_experts_over_tp_in_training():
    """DeepSpeed drops the tokens tp ranks share before its all-to-all whenever tp > 1, and its
    training slices experts only over the tp group (enable_expert_tensor_parallelism); its
    inference (the paper's expert slicing) and moerun slice over any consecutive group."""
    from moeplan.planner.space import layer_choices

    spec = load_model("1.3b-moe-128")
    for runtime in ("moerun", "deepspeed", "deepspeed-sparse"):
        for mode in ("train", "infer"):
            env = Env(spec, NDV4, _env(runtime, mode).workload, 256, runtime=runtime)
            for tp in (1, 2, 4):
                s = Setting(tp=tp, dp=256 // tp, micro_batch=4, recompute=True)
                got = layer_choices(env, s, 128)
                coordinated = {c.coordinated for c in got}
                slices = {c.es for c in got}
                if runtime == "moerun":
                    assert coordinated == ({False} if tp == 1 else {False, True})
                else:
                    assert coordinated == {tp > 1}, (runtime, mode, tp)
                room = {1, 2}  # 256 GPUs hold 128 experts sliced at most twice
                if runtime != "moerun" and mode == "train":
                    assert slices == room & {1, tp}, (runtime, tp)
                else:
                    assert slices == room, (runtime, mode, tp)


def test_deepspeeds_training_expert_groups_lie_within_a_data_parallel_group():
    """DeepSpeed builds a training expert-parallel group from ranks of one tp index (its ep
    divides the data-parallel degree; neighbours tp apart), so with tp = 2 on 8 nodes of 8 an
    ep = 32 group spans all 8 nodes, 4 ranks on each (moerun's: 4 nodes of 8), and its expert
    gradients are reduced over N / (ep · tp) ranks."""
    from moeplan.planner.space import layer_choices

    spec = load_model("1.3b-moe-128")
    s = Setting(tp=2, dp=32, micro_batch=4, recompute=True)
    ds, mr = (Env(spec, NDV4, _env(rt, "train").workload, 64, runtime=rt)
              for rt in ("deepspeed", "moerun"))
    assert max(c.ep for c in layer_choices(mr, s, 128)) == 64
    assert max(c.ep for c in layer_choices(ds, s, 128)) == 32
    c = LayerChoice(ep=32, es=1, a2a="flat", coordinated=True)
    assert (ds.ep_stride(c.es, 2), mr.ep_stride(c.es, 2)) == (2, 1)
    assert (ds.span(32, 2).nodes, ds.span(32, 2).per_node) == (8, 4)
    assert (mr.span(32, 1).nodes, mr.span(32, 1).per_node) == (4, 8)
    infer = Env(spec, NDV4, _env("deepspeed", "infer").workload, 64, runtime="deepspeed")
    assert infer.ep_stride(c.es, 2) == 1  # the paper's inference layout: consecutive ranks


@pytest.mark.parametrize("argv, message", [
    (["--fix", "tp"], "expected KEY=VALUE"),
    (["--fix", "pp=2"], "KEY one of tp, ep"),
    (["--fix", "tp=0"], "positive whole number"),
    (["--fix", "a2a=ring"], "flat or hierarchical"),
    (["--fix", "recompute=maybe"], "true or false"),
    (["--fix", "tp=2", "--fix", "tp=4"], "given twice"),
    (["--fix", "tp=3"], "no global setting matches"),
    (["--fix", "a2a=hierarchical", "--gpus", "8"], "no valid configuration for layer 2"),
    (["--fix", "micro-batch=2", "--micro-batch", "4"], "contradicts"),
    (["--mode", "infer", "--fix", "recompute=true"], "apply to training"),
    (["--runtime", "tutel"], "'tutel' is not one of"),
    (["--runtime", "deepspeed", "--fix", "a2a=hierarchical"],
     "--runtime deepspeed exchanges flat in train"),
    (["--runtime", "deepspeed-sparse", "--mode", "infer", "--fix", "a2a=hierarchical"],
     "--runtime deepspeed-sparse exchanges flat in infer"),
    (["--runtime", "deepspeed", "--fix", "tp=2", "--fix", "tp-coordinated=false"],
     "routes the tokens tp ranks share once"),
    (["--runtime", "deepspeed", "--fix", "tp=1", "--fix", "es=2"],
     "slices experts in training only over the tp=1 group"),
    (["--model", "1.3b-moe-128", "--gpus", "8", "--fix", "ep=8", "--fix", "tp=1"],
     "does not fit on 8 x A100-SXM4-40GB with --fix tp=1 --fix ep=8"),
])
def test_bad_fixes_are_one_line(run, argv, message):  # noqa: F811
    code, _, err = run("search", *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_the_issue_command_prints_a_costed_plan(run, tmp_path):  # noqa: F811
    code, out, err = run("search", "--model", "24b-moe-128", "--gpus", "256", "--mode", "infer",
                         "--global-batch", "256", "--runtime", "deepspeed", "--fix", "tp=8",
                         "--fix", "ep=128", "--fix", "es=2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["runtime"] == "deepspeed" and summary["predicted"]["latency_s"] > 0
    plan_ = Plan.model_validate_json((tmp_path / "plan.json").read_text())
    assert plan_.provenance.runtime == "deepspeed"


@given(st.lists(st.text(max_size=14), max_size=3),
       st.sampled_from(["moerun", "deepspeed", "deepspeed-sparse", "x"]))
@settings(max_examples=40, deadline=20000)
def test_any_fix_is_a_plan_or_one_line(tmp_path_factory, fixes, runtime):
    from moeplan.cli import main as moeplan_cli

    out = tmp_path_factory.mktemp("fix") / "p.json"
    argv = ["search", "--model", "tiny-pr-moe", "--cluster", "local-cpu", "--gpus", "4",
            "--simulate-top", "0", "--runtime", runtime, "--out", str(out)]
    for f in fixes:
        argv.append(f"--fix={f}")
    code, err = _in_process(moeplan_cli, argv)
    assert code in (0, 2) and (code == 0) == (err == ""), (code, err)
    assert len(err.strip().splitlines()) <= 1


def _env(runtime: str, mode: str = "infer", cluster=NDV4, spec="1.3b-moe-128", gpus=64):
    w = (Workload(mode="infer", global_batch=8 * gpus, micro_batch=8, seq_len=640,
                  prompt_len=512, gen_len=128, dtype="fp16", zero_stage=0) if mode == "infer"
         else Workload(mode="train", global_batch=512, micro_batch=4, seq_len=2048,
                       dtype="fp16", zero_stage=2))
    return Env(load_model(spec), cluster, w, gpus, runtime=runtime)


def test_gemm_floor_is_a_time_whatever_the_dtype():
    dev = NDV4.device
    floor = gemm_floor_s(dev)
    assert 0 < floor < 10e-6  # a kernel's floor, not the 128 µs of the fp32 peak
    router = gemm_s(8, 128, 2048, dev, "fp32")  # a decode step's fp32 router GEMM
    assert router == pytest.approx(2 * 8 * 128 * 2048 / (19.5e12 * 0.8) + floor, rel=F64_REL)
    big = gemm_s(8192, 8192, 8192, dev, "fp16")
    assert big == pytest.approx(2 * 8192 ** 3 / (312e12 * 0.8) + floor, rel=F64_REL)


def test_which_experts_weights_a_decode_step_reads():
    """DeepSpeed's loop reads every local expert; moerun's inference grouped GEMM on a GPU only
    the experts a token chose. DeepSpeed's loop also copies each local expert's rows out of the
    all-to-all's output, runs its GELU over their FFN rows and cats the outputs (as counted: a
    read and a write of each)."""
    s = Setting(tp=1, dp=64, micro_batch=8, recompute=False)
    c = LayerChoice(ep=8, es=1, a2a="flat", coordinated=False)  # 16 local experts, 64 tokens
    p = Pass(tokens=8, context=640, decode=True)
    spec = load_model("1.3b-moe-128")
    dev = NDV4.device
    expert = 2 * 2 * spec.hidden * spec.ffn_hidden  # fp16 w1 + w2 of one expert
    R = 8 * spec.capacity(128, 8, train=False)  # ep·C rows an expert
    rows = 16 * R * 2 * spec.hidden * 2  # read in, written out
    loop = 16 * R * 2 * 2 * (2 * spec.hidden + spec.ffn_hidden)  # copy, GELU and cat, fp16
    active = 16 * (1 - (1 - 1 / 128) ** 64)  # ~6.3 of the 16 receive a token
    for runtime, experts_read, extra, launches in (("deepspeed", 16, loop, 1 + 4 * 16),
                                                   ("moerun", active, 0, 8)):
        cost = forward(_env(runtime), s, 1, c, p)
        # decode is bound by the bytes read
        assert cost.phases["experts"] == pytest.approx(
            (experts_read * expert + rows + extra) / (dev.hbm_Bps * dev.hbm_efficiency)
            + launches * dev.op_overhead_s, rel=F64_REL)


def test_deepspeed_dispatch_and_combine_are_einsum_gemms_over_s_e_c():
    """Up to v0.19.3 dispatch "sec,sm->ecm" and combine "sec,ecm->sm" are GEMMs over S·E·C
    (FLOPs as counted: dispatch's backward one GEMM, its mask has no gradient; combine's two);
    a training pass is charged ((1 + r)·forward + backward) / (3 + r) of them."""
    c = LayerChoice(ep=128, es=1, a2a="flat", coordinated=False)
    p = Pass(tokens=4 * 2048, context=2048, decode=False)
    env = _env("deepspeed", "train", gpus=128)
    C = env.spec.capacity(128, p.tokens, train=True)
    gemm = 2 * p.tokens * 128 * C * env.spec.hidden / (312e12 * 0.8)  # S·(E·C)·M, one way
    for r in (0, 1):
        s = Setting(tp=1, dp=128, micro_batch=4, recompute=bool(r))
        ds = forward(env, s, 1, c, p)
        mr = forward(_env("moerun", "train", gpus=128), s, 1, c, p)
        assert ds.phases["dispatch"] >= gemm * (2 + r) / (3 + r)
        assert ds.phases["dispatch"] < gemm * (2 + r) / (3 + r) * 1.5
        assert ds.phases["combine"] >= gemm
        assert ds.phases["dispatch"] > 10 * mr.phases["dispatch"]
        assert ds.phases["gate"] > mr.phases["gate"]  # [S, E, C] tensors and two host syncs


def test_deepspeed_sparse_dispatches_and_combines_by_index():
    """DeepSpeed from v0.19.4 (`deepspeed-sparse`): no S·E·C einsum GEMMs nor [S, E, C]
    tensors (no such term in anything its counted layer moved) and no device sync: its dispatch
    and combine move a few bytes per token and row (as counted: under the einsum's GEMM alone);
    the experts and the rest of the layer as under DeepSpeed's einsums."""
    from moeplan.cost_models.traffic import deepspeed_counts

    for key, per in deepspeed_counts()["deepspeed-sparse"]["fits"].items():
        assert not {"sec", "sech"} & set(per), key
    s = Setting(tp=1, dp=128, micro_batch=4, recompute=True)
    c = LayerChoice(ep=128, es=1, a2a="flat", coordinated=False)
    p = Pass(tokens=4 * 2048, context=2048, decode=False)
    env = _env("deepspeed-sparse", "train", gpus=128)
    sparse, einsum = forward(env, s, 1, c, p), forward(_env("deepspeed", "train", gpus=128), s,
                                                        1, c, p)
    h, T, E = env.spec.hidden, p.tokens, 128
    rows = E * env.spec.capacity(E, T, train=True)
    gemm = 2 * T * rows * h / (312e12 * 0.8)  # S·(E·C)·M, one einsum GEMM alone
    for phase, gemms in (("dispatch", 3 / 4), ("combine", 1)):  # a pass's share, recomputing
        assert sparse.phases[phase] < gemm * gemms < einsum.phases[phase]
    assert sparse.phases["gate"] < einsum.phases["gate"]
    for phase in ("experts", "attention", "mlp"):
        assert sparse.phases[phase] == einsum.phases[phase]


def test_deepspeed_sparse_steps_bf16_without_zero_unpartitioned():
    """v0.19.8 runs bf16 without ZeRO through its FP16 optimizer in bf16: nothing partitioned, no
    fp32 gradient buffer, no allgather after the step — v0.16.4's BF16 optimizer partitions the
    fp32 states over the data-parallel ranks and accumulates in fp32."""
    from moeplan.cost_models.memory import TrainState, train_state

    assert train_state("bf16", "deepspeed-sparse", 0) == TrainState(2, 2, 12, 2, 0, False)
    assert train_state("bf16", "deepspeed", 0) == TrainState(2, 6, 12, 2, 2, True)
    for zero in (1, 2):
        assert train_state("bf16", "deepspeed-sparse", zero) == train_state("bf16", "deepspeed",
                                                                            zero)
    req = dict(gpus=64, mode="train", global_batch=256, dtype="bf16", zero_stage=0,
               fix=Fix(tp=1, ep=64, es=1, micro_batch=4), simulate_top=0)
    spec = load_model("350m-moe-128")
    old, _ = plan(spec, NDV4, Request(**req, runtime="deepspeed"))
    new, _ = plan(spec, NDV4, Request(**req, runtime="deepspeed-sparse"))
    mem = "optimizer_states"
    assert new.predicted.memory_breakdown_bytes[mem] > old.predicted.memory_breakdown_bytes[mem]


def test_elementwise_traffic_is_charged_on_gpus_only():
    s = Setting(tp=8, dp=16, micro_batch=4, recompute=True)
    p = Pass(tokens=4 * 2048, context=2048, decode=False)
    gpu = _env("deepspeed", "train", spec="6.7b", gpus=128)
    spec = gpu.spec
    mlp = elementwise_bytes(gpu, s, p, "mlp")
    assert mlp == pytest.approx(2 * p.tokens * (10 * spec.hidden + 2 * spec.ffn_hidden / 8),
                                rel=F64_REL)
    attn = elementwise_bytes(gpu, s, p, "attention")
    scores = 2 * p.tokens * spec.heads / 8 * 2048 * 8
    assert attn == pytest.approx(2 * p.tokens * 10 * spec.hidden + scores, rel=F64_REL)
    moerun = Env(spec, gpu.cluster, gpu.workload, 128, runtime="moerun")
    # fused attention: no score traffic; and moerun has no dropout (3 passes fewer)
    assert elementwise_bytes(moerun, s, p, "attention") == pytest.approx(
        2 * p.tokens * 7 * spec.hidden, rel=F64_REL)
    cpu = Env(spec, load_cluster("local-cpu"), gpu.workload, 128)
    assert elementwise_bytes(cpu, s, p, "mlp") == 0.0


def test_inference_capacity_uses_the_eval_min_capacity():
    spec = load_model("1.3b-moe-128")
    assert spec.capacity(128, 8, train=False) == 1  # DeepSpeed-MoE inference: min capacity 1
    assert spec.capacity(128, 8, train=True) == 4
    assert spec.capacity(128, 8192, train=False) == 64


def test_inference_expert_slicing_gathers_tokens_before_the_gate():
    """es = 2 in inference: the gate routes both slices' tokens once (capacity for 2T), each
    slice runs its half of the FFN on the ep·C rows it received — no gather after the exchange
    — and the partial outputs are reduce-scattered (tp = 1: the slices hold other tokens)."""
    from moeplan.cost_models.layer import es_inference, gate_tokens

    env = _env("moerun", gpus=256, spec="1.3b-moe-128")
    s = Setting(tp=1, dp=256, micro_batch=8, recompute=False)
    c = LayerChoice(ep=128, es=2, a2a="flat", coordinated=False)
    p = Pass(tokens=8, context=640, decode=True)
    assert es_inference(env, s, c, p) == "gather" and gate_tokens(env, s, c, p) == 16
    cost = forward(env, s, 1, c, p)
    h = env.spec.hidden
    assert cost.comm_bytes["es_gather"] == 16 * h * 2  # the gathered tokens, not E·C rows
    shared = Setting(tp=2, dp=128, micro_batch=8, recompute=False)
    assert es_inference(env, shared, c, p) == "shared" and gate_tokens(env, shared, c, p) == 8
    train = Pass(tokens=8 * 2048, context=2048, decode=False)
    tenv = _env("moerun", "train", gpus=256)
    assert es_inference(tenv, s, c, train) is None
    assert gate_tokens(tenv, s, c, train) == 8 * 2048


def test_moerun_decode_attends_over_the_whole_static_cache():
    from moeplan.cost_models.step import decode_pass

    s = Setting(tp=1, dp=64, micro_batch=8, recompute=False)
    assert decode_pass(_env("moerun"), s).context == 640  # prompt 512 + 128 new: the buffer
    assert decode_pass(_env("deepspeed"), s).context == 512 + 64  # the filled part on average


def test_fixed_plan_refuses_a_configuration_that_does_not_fit():
    from moeplan.planner.planning import fixed_plan
    from moeplan.spec.errors import InfeasibleError

    choices = {i: LayerChoice(ep=8, es=1, a2a="flat", coordinated=False)
               for i, E in enumerate(load_model("1.3b-moe-128").experts) if E}
    with pytest.raises(InfeasibleError, match=r"needs \d+\.\d GiB per GPU .* expert"):
        fixed_plan(load_model("1.3b-moe-128"), NDV4, Request(gpus=8, global_batch=64), 1,
                   choices, micro_batch=1)


def test_deepspeed_zero2_reduces_after_every_backward():
    """ZeRO-2 keeps only its gradient partition, so DeepSpeed reduces every micro-step — one
    allreduce of each bucket for all ranks (its default); the parameter allgather stays once
    per step. moerun's plan charges one reduce-scatter a step."""
    from moeplan.cost_models import collectives as coll
    from moeplan.cost_models.update import grad_sync_s

    ds, mr = _env("deepspeed", "train", gpus=128), _env("moerun", "train", gpus=128)
    params, span = 1e9, ds.span(16, 8)
    for env, reduce in ((ds, lambda b: 16 * coll.allreduce_s(b, span, NDV4)),
                        (mr, lambda b: coll.reduce_scatter_s(b, span, NDV4))):
        nbytes = env.state.reduced * params  # fp16 under DeepSpeed, fp32 under moerun
        ag = coll.allgather_s(env.state.gathered * params, span, NDV4)
        assert grad_sync_s(env, params, 16, 8, micro_steps=16) == pytest.approx(
            reduce(nbytes) + ag, rel=F64_REL)


def test_a_deepspeed_plan_run_by_moerun_says_whose_costs_it_meets(tmp_path, monkeypatch):
    """moerun runs its own kernels: a plan costed for DeepSpeed's is run, with a note that the
    comparison sets moerun's measurements against DeepSpeed's costs; re-costing it for another
    mode keeps the runtime it was costed for."""
    from moeplan.cli import moerun as moerun_cli
    from moeplan.planner.planning import recost
    from moeplan.spec.record import runtime_note

    req = Request(gpus=2, mode="train", global_batch=8, seq_len=32, simulate_top=0,
                  runtime="deepspeed")
    ds, _ = plan(load_model("tiny-pr-moe"), load_cluster("local-cpu"), req)
    assert "--runtime deepspeed's kernels" in runtime_note(ds)
    assert runtime_note(ds.model_copy(update={"provenance": ds.provenance.model_copy(
        update={"runtime": "moerun"})})) is None
    assert recost(ds, "infer").provenance.runtime == "deepspeed"
    (tmp_path / "plan.json").write_text(ds.to_json())
    monkeypatch.chdir(tmp_path)
    code, err = _in_process(moerun_cli, ["--plan", "plan.json", "--print-torchrun"])
    assert code == 0 and "moerun: note: the plan costs --runtime deepspeed's kernels" in err
