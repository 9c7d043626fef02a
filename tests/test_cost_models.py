"""Cost-model terms: collectives per tier, the flat/hierarchical flip, compute, memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tolerance import F64_REL

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.compute import gemm_efficiency, gemm_s, roofline_s
from moeplan.cost_models.env import Env, LayerChoice, Pass
from moeplan.cost_models.layer import forward, weight_memory
from moeplan.cost_models.step import infer_layer, train_layer
from moeplan.spec import load_cluster, load_model
from moeplan.spec.cluster import FittedCollective
from moeplan.spec.workload import Setting, Workload

NDV4 = load_cluster("ndv4-a100-40gb")
MB = 1e6


@pytest.mark.parametrize("size,stride,G,per_node,nodes", [
    (8, 1, 8, 8, 1), (64, 1, 8, 8, 8), (64, 2, 8, 4, 16), (4, 8, 8, 1, 4), (2, 4, 8, 2, 1),
    (1, 1, 8, 1, 1),
])
def test_group_span(size, stride, G, per_node, nodes):
    assert coll.group_span(size, stride, G) == coll.GroupSpan(size, per_node, nodes)


def test_flat_and_hierarchical_agree_inside_one_node():
    span = coll.group_span(8, 1, 8)
    assert coll.all_to_all_hierarchical_s(MB, span, NDV4) == coll.all_to_all_flat_s(MB, span, NDV4)


def test_hierarchical_wins_small_messages_at_many_nodes():
    span = coll.group_span(512, 1, 8)  # 64 nodes
    small = 64e3
    assert coll.all_to_all_hierarchical_s(small, span, NDV4) < 0.5 * coll.all_to_all_flat_s(
        small, span, NDV4)


def test_flat_wins_large_messages_at_few_nodes():
    span = coll.group_span(16, 1, 8)  # 2 nodes
    large = 512 * MB
    assert coll.all_to_all_flat_s(large, span, NDV4) < coll.all_to_all_hierarchical_s(
        large, span, NDV4)


def test_ordering_flips_exactly_once_as_messages_grow():
    """Hierarchical saves (p - g - n + 1) inter-node latencies but pays an intra-node pass and a
    layout copy proportional to the bytes, so the winner flips once at a computable size."""
    span = coll.group_span(32, 1, 8)
    winners = []
    for k in range(10, 31):
        b = float(2 ** k)
        winners.append(coll.all_to_all_hierarchical_s(b, span, NDV4)
                       < coll.all_to_all_flat_s(b, span, NDV4))
    assert winners[0] and not winners[-1]
    flips = sum(1 for a, b in zip(winners, winners[1:]) if a != b)
    assert flips == 1


def test_nic_is_shared_by_the_gpus_of_a_node():
    one_nic = NDV4.model_copy(update={"nics_per_node": 1})
    span = coll.group_span(16, 1, 8)
    t8 = coll.all_to_all_flat_s(64 * MB, span, NDV4)
    t1 = coll.all_to_all_flat_s(64 * MB, span, one_nic)
    assert t1 > 7 * t8


def test_fitted_collective_replaces_link_constants():
    fit = FittedCollective(collective="allreduce", tier="intra", latency_s=0.0,
                           bandwidth_Bps=1e9)
    fitted = NDV4.model_copy(update={"fitted": [fit]})
    span = coll.group_span(8, 1, 8)
    assert coll.allreduce_s(1e9, span, fitted) == pytest.approx(2 * 7 / 8, rel=F64_REL)
    assert coll.allreduce_s(1e9, span, NDV4) < 0.1


def test_allreduce_is_twice_allgather_volume_and_zero_for_one_rank():
    span = coll.group_span(8, 1, 8)
    assert coll.allreduce_s(MB, span, NDV4) == pytest.approx(2 * coll.allgather_s(MB, span, NDV4), rel=F64_REL)
    assert coll.allreduce_s(MB, coll.group_span(1, 1, 8), NDV4) == 0


def test_gemm_efficiency_grows_with_size_and_saturates():
    curve = NDV4.device.gemm_efficiency
    effs = [gemm_efficiency(2.0 * n ** 3, curve) for n in (128, 1024, 8192)]
    assert effs[0] < effs[1] < effs[2] <= curve.max_efficiency
    assert gemm_s(8192, 8192, 8192, NDV4.device, "bf16") == pytest.approx(
        2 * 8192 ** 3 / (312e12 * effs[2]), rel=F64_REL)
    # memory-bound: a tiny GEMM over many bytes takes the bytes' time
    assert roofline_s(1e-9, 1.555e9, NDV4.device, 0) == pytest.approx(1e-3 / 0.85, rel=F64_REL)


def _env(model="1.3b-pr-moe", gpus=64, mode="train", cluster=NDV4, **w):
    if mode == "train":
        wl = Workload(mode="train", global_batch=w.get("batch", 512), micro_batch=1,
                      seq_len=2048, zero_stage=w.get("zero", 1))
    else:
        wl = Workload(mode="infer", global_batch=w.get("batch", 64), micro_batch=1, seq_len=640,
                      prompt_len=512, gen_len=128)
    return Env(load_model(model), cluster, wl, gpus)


def test_tp_coordination_cuts_all_to_all_volume_by_tp():
    env = _env()
    s = Setting(tp=4, dp=16, micro_batch=4, recompute=False)
    p = Pass(tokens=4 * 2048, context=2048, decode=False)
    plain = forward(env, s, 1, LayerChoice(64, 1, "flat", False), p)
    coord = forward(env, s, 1, LayerChoice(64, 1, "flat", True), p)
    assert plain.comm_bytes["a2a"] == pytest.approx(4 * coord.comm_bytes["a2a"], rel=F64_REL)
    assert coord.phases["dispatch_a2a"] < plain.phases["dispatch_a2a"]
    assert "tp_allgather" in coord.comm_bytes


def test_expert_compute_per_gpu_is_independent_of_ep_but_weights_are_not():
    env = _env()
    s = Setting(tp=1, dp=64, micro_batch=2, recompute=False)
    p = Pass(tokens=2 * 2048, context=2048, decode=False)
    few = forward(env, s, 1, LayerChoice(64, 1, "flat", False), p)
    many = forward(env, s, 1, LayerChoice(8, 1, "flat", False), p)
    # same FLOPs per GPU; with ep=64 each expert sees 8x the rows, so its GEMMs run more
    # efficiently, and the runtime's loop over 8 local experts launches more operations
    assert few.phases["experts"] <= many.phases["experts"] <= 1.25 * few.phases["experts"]
    w64 = weight_memory(env, s, 1, LayerChoice(64, 1, "flat", False))
    w8 = weight_memory(env, s, 1, LayerChoice(8, 1, "flat", False))
    assert w8["expert_weights"] == pytest.approx(8 * w64["expert_weights"], rel=F64_REL)


def test_decode_reads_fewer_expert_weights_with_more_expert_parallelism():
    """At a fixed batch per GPU, replicas of the experts (a smaller ep, a larger edp) put more
    experts on each GPU, whose weights a decode step reads: they cost time, so the search's
    ties no longer go to replication (the issue's cause 8)."""
    env = _env(mode="infer")
    s = Setting(tp=1, dp=64, micro_batch=1, recompute=False)
    t = {ep: infer_layer(env, s, 1, LayerChoice(ep, 1, "flat", False))[0].phases["experts"]
         for ep in (4, 16, 64)}
    assert t[64] < t[16] < t[4]


def test_expert_slicing_splits_weights_and_adds_reduction():
    env = _env(model="1.3b-moe-128", gpus=256, mode="infer", batch=256)
    s = Setting(tp=1, dp=256, micro_batch=1, recompute=False)
    one, _ = infer_layer(env, s, 1, LayerChoice(128, 1, "flat", False))
    two, _ = infer_layer(env, s, 1, LayerChoice(128, 2, "flat", False))
    assert two.memory["expert_weights"] == pytest.approx(one.memory["expert_weights"] / 2, rel=F64_REL)
    assert "es_comm" in two.phases and "es_comm" not in one.phases


def test_zero_and_recompute_shrink_memory():
    s = Setting(tp=1, dp=64, micro_batch=2, recompute=False)
    c = LayerChoice(64, 1, "flat", False)
    z0 = train_layer(_env(zero=0), s, 1, c).memory
    z1 = train_layer(_env(zero=1), s, 1, c).memory
    z2 = train_layer(_env(zero=2), s, 1, c).memory
    assert z1["optimizer_states"] == pytest.approx(z0["optimizer_states"] / 64, rel=F64_REL)
    # moerun reduces once the backward is over: its whole gradients exist until then;
    # DeepSpeed's ZeRO-2 reduce-scatters during the backward and keeps only its piece
    assert z2["gradients"] == z1["gradients"]
    ds1, ds2 = (train_layer(replace(_env(zero=z), runtime="deepspeed"), s, 1, c).memory
                for z in (1, 2))
    assert ds2["gradients"] == pytest.approx(ds1["gradients"] / 64, rel=F64_REL)
    rc = train_layer(_env(), Setting(tp=1, dp=64, micro_batch=2, recompute=True), 1, c)
    full = train_layer(_env(), s, 1, c)
    assert rc.memory["activations"] < full.memory["activations"] / 10
    assert rc.transient_bytes == pytest.approx(full.memory["activations"], rel=F64_REL)
    assert rc.phases["attention"] == pytest.approx(full.phases["attention"] * 4 / 3, rel=F64_REL)


def test_training_state_follows_the_runtimes_precision_layout():
    """16-bit training: DeepSpeed holds 16-bit weights and gradients and an fp32 master with
    Adam's moments (2 + 2 + 12 bytes a parameter); under bf16 without ZeRO its BF16 optimizer
    also accumulates fp32 gradients (2 + 6) and partitions the 12 over dp, gathering the bf16
    weights after the step; moerun trains under autocast over fp32 weights, which are the
    master, with fp32 gradients (4 + 4 + 8) — and reduces those fp32 gradients. In fp32 both
    hold 4 + 4 + 8."""
    s = Setting(tp=1, dp=64, micro_batch=2, recompute=False)
    c = LayerChoice(64, 1, "flat", False)
    params, sync, non_expert = {}, {}, None
    for runtime in ("moerun", "deepspeed"):
        for dtype in ("bf16", "fp16", "fp32"):
            env = replace(_env(zero=0), runtime=runtime, workload=_env(zero=0).workload.model_copy(
                update={"dtype": dtype}))
            cost = train_layer(env, s, 1, c)
            non_expert = cost.memory["weights"] / env.state.weights
            params[runtime, dtype] = (cost.memory["weights"] / non_expert,
                                      cost.memory["gradients"] / non_expert,
                                      cost.memory["optimizer_states"] / non_expert)
            sync[runtime, dtype] = cost.phases["grad_sync"]
    assert params["moerun", "bf16"] == pytest.approx((4, 4, 8), rel=F64_REL)
    assert params["deepspeed", "fp16"] == pytest.approx((2, 2, 12), rel=F64_REL)
    assert params["deepspeed", "bf16"] == pytest.approx((2, 6, 12 / 64), rel=F64_REL)
    assert params["moerun", "fp32"] == params["deepspeed", "fp32"]
    assert params["moerun", "fp32"] == pytest.approx((4, 4, 8), rel=F64_REL)
    # fp32 gradients: moerun's bf16 gradient sync moves what its fp32 one does
    assert sync["moerun", "bf16"] == pytest.approx(sync["moerun", "fp32"], rel=F64_REL)
    assert sync["deepspeed", "fp16"] < sync["deepspeed", "fp32"]
    # the BF16 optimizer's fp32 gradients travel as bf16, then its bf16 weights are gathered;
    # the layer's non-expert bytes ride in the step's one bucket (no latency of their own)
    env = _env(zero=0)
    span = env.span(64, 1)

    def bucket(f, nbytes):
        return f(nbytes, span, NDV4) - f(1e-9, span, NDV4)

    added = bucket(coll.allgather_s, 2 * non_expert)
    # rel 1e-9: differences of sums of a few float64 terms of like size (cancellation ~1e-15)
    assert sync["deepspeed", "bf16"] - sync["deepspeed", "fp16"] == pytest.approx(added, rel=1e-9)


def _op_spec(name: str):
    """Tiny models of each kind of block the cost model counts operations for."""
    from dist_cases import mla_spec, modern_spec

    from moeplan.spec import load_model

    tiny = load_model("tiny-pr-moe")
    return {
        "DeepSpeed-MoE blocks (PR-MoE, RTS + RSample)": tiny,
        "top-8 of 16, GELU with biases": tiny.model_copy(update={
            "experts": [0, 16, 0, 16, 0, 16, 0, 16], "top_k": 8, "use_rts": False,
            "noisy_gate_policy": "none", "capacity_factor": 2.0}),
        "Mixtral-like (rotary, GQA, RMSNorm, SwiGLU, no biases, top-2)": tiny.model_copy(update={
            "mlp": "swiglu", "norm": "rmsnorm", "positions": "rope", "rope_theta": 1e6,
            "kv_heads": 2, "bias": False, "tied_embeddings": False, "residual": False,
            "top_k": 2, "use_rts": False, "noisy_gate_policy": "none",
            "second_expert_sampling": False, "capacity_factor": 2.0}),
        "Qwen-like (q/k norms, q/k/v biases, gated shared expert, top-3 raw)": modern_spec(),
        "full q/k norm": modern_spec("full"),
        "DeepSeek-like (latent attention, low-rank query)": mla_spec(),
        "DeepSeek-like, full-rank query": mla_spec().model_copy(update={
            "latent_attention": mla_spec().latent_attention.model_copy(
                update={"q_lora_rank": None})}),
    }[name]


@pytest.mark.parametrize("name", [
    "DeepSpeed-MoE blocks (PR-MoE, RTS + RSample)", "top-8 of 16, GELU with biases",
    "Mixtral-like (rotary, GQA, RMSNorm, SwiGLU, no biases, top-2)",
    "Qwen-like (q/k norms, q/k/v biases, gated shared expert, top-3 raw)", "full q/k norm",
    "DeepSeek-like (latent attention, low-rank query)", "DeepSeek-like, full-rank query"])
def test_runtime_op_counts_match_the_runtime(name):
    """The per-phase operation counts the cost model charges moerun's torch reference are the
    runtime's own, for each kind of block."""
    torch = pytest.importorskip("torch")
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from moeplan.cost_models.runtimes import gate_noise_ops, operations
    from moeplan.runtime.model import GPT
    from moeplan.runtime.timers import PhaseTimer, instrument

    torch.manual_seed(0)
    spec = _op_spec(name)
    if name.startswith("DeepSpeed"):
        assert gate_noise_ops(spec) == 9 + 8  # random token selection and RSample
    model, timer = GPT(spec), PhaseTimer()
    instrument(model, timer)
    counts = {False: Counter(), True: Counter()}
    skip = ("view", "detach", "as_strided", "t.default", "transpose", "unsqueeze", "expand",
            "alias", "select", "slice", "split", "unbind", "permute", "squeeze")

    class Count(TorchDispatchMode):
        backward = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any(k in str(func) for k in skip):
                layer, phase = timer._bcur if self.backward else timer._cur
                kind = "head" if layer == "head" else spec.experts[layer]
                counts[self.backward][(kind, phase)] += 1
            return func(*args, **(kwargs or {}))

    x = torch.randint(0, 256, (2, 17))
    model.loss(x[:, :-1], x[:, 1:])  # warm-up: the shared rotary table is made once
    with Count() as mode:
        timer.begin()
        loss, _ = model.loss(x[:, :-1], x[:, 1:])
        timer.end()
        mode.backward = True
        timer.begin_backward()
        loss.backward()
        timer.end_backward()
    layers = {E: spec.experts.count(E) for E in set(spec.experts)}
    for (kind, phase), n in counts[False].items():
        per_layer = n / (1 if kind == "head" else layers[kind])
        back = counts[True][(kind, phase)] / (1 if kind == "head" else layers[kind])
        key = "residual_mlp" if phase == "mlp" and kind else phase
        local = kind if phase == "experts" else 0  # ep = 1: every expert is local
        fwd = operations("moerun", "cpu", key, False, local, spec)
        fwd += gate_noise_ops(spec) if phase == "gate" else 0  # training only
        bwd = 3 * operations("moerun", "cpu", key, True, local, spec) - fwd
        assert (per_layer, back) == (fwd, pytest.approx(bwd)), (kind, phase)


def test_attention_charges_every_score_element_of_every_head():
    """Narrow heads cost more than wide ones at the same hidden: the softmax's work on each of
    heads/tp · T · ctx score elements (`Device.score_element_s`), on top of the products."""
    per_element = 2e-9
    dev = NDV4.device.model_copy(update={"score_element_s": per_element})
    cluster = NDV4.model_copy(update={"device": dev})
    s = Setting(tp=2, dp=32, micro_batch=1, recompute=False)
    p = Pass(tokens=2048, context=2048, decode=False)
    spec = load_model("1.3b-pr-moe")
    t = {}
    for heads in (16, 64):
        env = _env(cluster=cluster)
        env = Env(spec.model_copy(update={"heads": heads}), cluster, env.workload, env.gpus)
        t[heads] = forward(env, s, 0, LayerChoice(1, 1, "none", False), p).phases["attention"]
    # no measured framework in this profile: no work scale, so the difference is the term itself
    expected = (64 - 16) / 2 * 2048 * 2048 * per_element
    assert t[64] - t[16] == pytest.approx(expected, rel=F64_REL)
    without = forward(_env(), s, 0, LayerChoice(1, 1, "none", False), p).phases["attention"]
    assert t[16] - without == pytest.approx(16 / 2 * 2048 * 2048 * (per_element - 4.1e-13),
                                            rel=F64_REL)


def test_mixture_of_students_plan_costs_the_teachers_forward():
    """A MoS training plan runs its teacher forward on every micro-batch: the teacher's layers
    (experts spread as far as the world allows) and its logits are charged as the `teacher`
    phase, its weights as memory; inference plans of the student carry no teacher."""
    from moeplan.planner.planning import Request, plan

    p, _ = plan(load_model("1.3b-pr-moe-mos"), NDV4, Request(gpus=64))
    t = p.teacher
    assert t is not None and t.model.name == "1.3b-pr-moe"
    assert {(l.experts, l.ep, l.edp) for l in t.layers if l.kind == "moe"} == {(64, 64, 1),
                                                                                (128, 64, 1)}
    teacher_s = p.predicted.head_phases_s["teacher"]
    layers_s = sum(l.predicted.time_s for l in t.layers)
    assert layers_s < teacher_s < 1.2 * layers_s  # plus the logits of every token
    # a forward of 24 layers against the student's forward + backward of 21 (3 passes): about
    # a third of the student's layers, well under the whole
    student_s = sum(l.predicted.time_s for l in p.layers)
    assert 0.15 * student_s < teacher_s < 0.6 * student_s
    weights = sum(v for l in t.layers for k, v in l.predicted.memory_bytes.items()
                  if k in ("weights", "expert_weights"))
    assert weights < p.predicted.memory_breakdown_bytes["teacher_weights"] < 1.1 * weights
    served, _ = plan(load_model("1.3b-pr-moe-mos"), NDV4, Request(gpus=64, mode="infer"))
    assert served.teacher is None and "teacher" not in served.predicted.head_phases_s


def test_a_teacher_of_another_vocabulary_is_refused():
    from moeplan.planner.planning import Request, plan
    from moeplan.spec.errors import ConfigError

    student = load_model("tiny-pr-moe-mos")
    bad = student.model_copy(update={"distillation": student.distillation.model_copy(
        update={"teacher": "1.3b-pr-moe"})})
    with pytest.raises(ConfigError, match="vocabulary has 50257 tokens, not 256"):
        plan(bad, load_cluster("local-cpu"), Request(gpus=2))
    gone = student.model_copy(update={"distillation": student.distillation.model_copy(
        update={"teacher": "no-such-model"})})
    with pytest.raises(ConfigError, match="does not load"):
        plan(gone, load_cluster("local-cpu"), Request(gpus=2))


def test_moerun_keeps_no_attention_scores_for_backward():
    """moerun's fused attention saves nothing of size [heads, ctx] per token (what the cost
    model charges moerun, `attention_activation_bytes(scores=False)`): at a fixed 256 tokens per
    batch, the bytes autograd saves barely move from 32- to 128-token sequences, where kept
    scores (DeepSpeed's Megatron attention, fp32 here) would add 5·heads·96 per token a layer."""
    import torch

    from moeplan.cost_models.memory import attention_activation_bytes
    from moeplan.runtime.model import GPT

    spec = load_model("tiny-pr-moe")
    torch.manual_seed(0)
    model = GPT(spec)

    def saved_bytes(seq: int) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randint(0, spec.vocab_size, (256 // seq, seq + 1),
                          generator=torch.Generator().manual_seed(seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.loss(x[:, :-1], x[:, 1:])
        return sum(storages.values())

    grown = saved_bytes(128) - saved_bytes(32)
    kept_scores = len(spec.experts) * (
        attention_activation_bytes(256, 128, spec.hidden, spec.heads, 1, 4)
        - attention_activation_bytes(256, 32, spec.hidden, spec.heads, 1, 4))
    assert kept_scores > 0 and abs(grown) < 0.02 * kept_scores, (grown, kept_scores)
    fused = [attention_activation_bytes(256, ctx, spec.hidden, spec.heads, 1, 4, scores=False)
             for ctx in (32, 128)]
    assert fused[0] == fused[1]


def test_todays_blocks_add_their_elementwise_passes():
    """DeepSpeed-MoE's blocks add nothing; RMSNorm 5 more passes over the hidden than a fused
    LayerNorm, rotary 10 over q and k (kv heads only for k), per-head q/k norms 7, SwiGLU 3 over
    the FFN width — bytes at the activations' width, per rank."""
    from moeplan.cost_models.traffic import block_elementwise_bytes

    s = Setting(tp=2, dp=32, micro_batch=1, recompute=False)
    p = Pass(tokens=1000, context=1000, decode=False)
    env = _env()
    for phase in ("attention", "mlp", "gate", "experts"):
        assert block_elementwise_bytes(env, s, p, phase) == 0.0
    spec = env.spec.model_copy(update={"norm": "rmsnorm", "positions": "rope", "kv_heads": 4,
                                       "qk_norm": "head", "mlp": "swiglu"})
    env = Env(spec, env.cluster, env.workload, env.gpus)
    b, h, d = env.dtype_bytes, spec.hidden, spec.hidden // spec.heads
    q, k = spec.heads * d / 2, 4 * d / 2
    assert block_elementwise_bytes(env, s, p, "attention") == b * 1000 * (
        5 * h + 10 * (q + k) + 7 * (q + k))
    assert block_elementwise_bytes(env, s, p, "mlp", 512) == b * 1000 * (5 * h + 3 * 512 / 2)
    assert block_elementwise_bytes(env, s, p, "gate") == b * 1000 * 5 * h


def test_no_dropout_no_mask():
    """moerun has no dropout: its attention and MLP activations keep no h-wide dropout mask
    (one byte an element in Korthikanti et al.'s 2-byte accounting), DeepSpeed's training keeps
    one per block."""
    from moeplan.cost_models.memory import attention_activation_bytes, mlp_activation_bytes

    T, h, b = 1000, 256, 2
    for fn, args in ((attention_activation_bytes, (T, 64, h, 4, 2, b)),
                     (mlp_activation_bytes, (T, h, 2, b))):
        assert fn(*args) - fn(*args, dropout=False) == pytest.approx(T * h * b / 2, rel=F64_REL)
    env = _env()
    s = Setting(tp=1, dp=64, micro_batch=2, recompute=False)
    c = LayerChoice(64, 1, "flat", False)
    mr = train_layer(env, s, 0, c).memory["activations"]
    ds = train_layer(replace(env, runtime="deepspeed"), s, 0, c).memory["activations"]
    assert ds > mr


def _optimizer_charge(runtime="moerun", zero=0, dtype="bf16", cluster=NDV4, micro_steps=1,
                      shards=1):
    """(seconds per parameter tensor, seconds per parameter element) of a layer's optimizer
    phase, for a rank stepping 1/`shards` of what it holds."""
    from moeplan.cost_models.update import optimizer_s

    env = _env(zero=zero, cluster=cluster)
    env = replace(env, runtime=runtime, workload=env.workload.model_copy(update={"dtype": dtype}))

    def charge(local, tensors):
        return optimizer_s(env, local, local / shards, tensors, shards, micro_steps)

    base = charge(0.0, 0)
    return charge(0.0, 1) - base, charge(1e6, 0) / 1e6 - base


def test_gpu_optimizer_is_charged_as_each_runtime_steps():
    """On a GPU, moerun's step is clipping per tensor plus torch's foreach AdamW (few launches,
    many passes); DeepSpeed's fp16 ZeRO-0 step checks every tensor on the host; its bf16 ZeRO-0
    step (the BF16 optimizer) accumulates fp32 gradients every micro-step and steps its
    partition; its fp32 ZeRO-0 step is the bare fused Adam after per-tensor clipping. Each
    also pays its gradient reduction's local copies, DeepSpeed's ZeRO-2 every micro-step."""
    from moeplan.cost_models.runtimes import HOST_SYNC_S

    dev = NDV4.device
    op = dev.op_overhead_s
    bandwidth = dev.hbm_Bps * dev.hbm_efficiency
    chunk = op / (65536 * 320)
    # moerun ZeRO 0: clipping + AdamW, and GradSync's concatenation and scaling (16 bytes)
    per_tensor, per_element = _optimizer_charge("moerun")
    assert per_tensor == pytest.approx(5.11 * op, rel=F64_REL)
    assert per_element == pytest.approx((92 + 16) / bandwidth + 8 * chunk, rel=F64_REL)
    # fp16 ZeRO 0: + the reduction's flatten, scaling and copy back (12 bytes, a launch a tensor)
    per_tensor, per_element = _optimizer_charge("deepspeed", dtype="fp16")
    assert per_tensor == pytest.approx(5 * op + HOST_SYNC_S, rel=F64_REL)
    assert per_element == pytest.approx(82 / bandwidth + chunk, rel=F64_REL)
    # micro-steps after the first add into moerun's fp32 gradients (a launch, 12 bytes)
    got = _optimizer_charge("moerun", micro_steps=4)
    assert got == pytest.approx(((5.11 + 3) * op, (92 + 16 + 3 * 12) / bandwidth + 8 * chunk),
                                rel=F64_REL)
    # ZeRO 1/2 (one rank: its partition is everything); fp16 adds the overflow check; the
    # reduction copies a tensor into the bucket and into the partition (2 launches) and moves
    # 20 bytes an element (copy in, scaling, flattening, copies out)
    for dtype, launches, nbytes in (("fp16", 9, 98), ("bf16", 2, 70)):
        got = _optimizer_charge("deepspeed", 1, dtype)
        assert got == pytest.approx(((launches + 2) * op, (nbytes + 20) / bandwidth + chunk),
                                    rel=F64_REL)
        # ZeRO 2 reduces after each of 4 micro-steps, and the partition's gradients add up
        # over the 3 after the first (a launch, 6 bytes)
        got = _optimizer_charge("deepspeed", 2, dtype, micro_steps=4)
        assert got == pytest.approx(((launches + 4 * 2 + 3) * op,
                                     (nbytes + 4 * 20 + 3 * 6) / bandwidth + chunk), rel=F64_REL)
    # bf16 ZeRO 0, 4 micro-steps, 64 partitions: per tensor a norm at the step (4 launches)
    # and a cast + add per micro-step (2), whatever the partition; per element held, 24 bytes
    # at the step (norm, zeroing, the reduction's cast, scaling, copy back) and 18 a
    # micro-step; per element of the partition, Adam and the copy to bf16
    got = _optimizer_charge("deepspeed", 0, "bf16", micro_steps=4, shards=64)
    assert got == pytest.approx(((4 + 4 * 2) * op,
                                 (24 + 4 * 18) / bandwidth + (34 / bandwidth + chunk) / 64),
                                rel=F64_REL)
    # fp32 ZeRO 0: norm and clip a tensor, fused Adam 36 tensors a launch; the reduction's copies
    got = _optimizer_charge("deepspeed", 0, "fp32")
    assert got == pytest.approx(((3 + 1 / 36) * op, (40 + 24) / bandwidth + chunk), rel=F64_REL)


@pytest.mark.parametrize("runtime, record, version", [
    ("deepspeed", "deepspeed-optimizer-counts.json", "0.16.4"),
    ("deepspeed-sparse", "deepspeed-optimizer-counts-0.19.8.json", "0.19.8")])
def test_deepspeeds_counts_are_what_deepspeed_did(runtime, record, version):
    """runtimes.py's DeepSpeed weight-update counts against DeepSpeed itself (v0.16.4 for
    `deepspeed`, v0.19.8 for `deepspeed-sparse`), run on 2 gloo ranks by
    bench/count_deepspeed_optimizer.py (its records under bench/results/): per window, launches a
    tensor and bytes an element besides the wrapped optimizer's own update, and the device syncs
    (at 8 tensors, and per tensor). Counts of whole operations: equal to rounding (1e-9)."""
    import json
    from pathlib import Path

    from moeplan.cost_models.memory import train_state
    from moeplan.cost_models.runtimes import gpu_optimizer

    path = Path(__file__).resolve().parent.parent / "bench/results" / record
    record = json.loads(path.read_text())
    assert record["deepspeed"] == version
    windows = {"micro": {"micro"}, "boundary": {"micro", "reduce", "accumulate"},
               "step": {"step"}}
    seen = 0
    for key, measured in record["worlds"]["2"].items():
        dtype, zero = key.split(" zero")
        zero = int(zero)
        count = gpu_optimizer(runtime, zero, dtype)
        ranks = 2 if train_state(dtype, runtime, zero).sharded else 1
        for window, whens in windows.items():
            if zero == 2 and window == "micro":
                whens = whens | {"reduce"}  # ZeRO-2 reduces after every backward
            got = [0.0, 0.0]
            for (when, over), work in count.work.items():
                if when in whens:
                    for i in (0, 1):
                        got[i] += work[i] / (ranks if over == "share" else 1)
            want = measured[window]
            assert got == pytest.approx([want["launches_per_tensor"], want["bytes_per_element"]],
                                        abs=1e-9), (key, window)
            per_tensor = count.tensor_syncs / ranks if window == "step" else 0
            syncs = 8 * per_tensor + (count.step_syncs if window == "step" else 0)
            assert (want["host_reads"], want["host_reads_per_tensor"]) == (syncs, per_tensor), (
                key, window)
            seen += 1
    assert seen == 12


@pytest.mark.parametrize("runtime, record, version", [
    ("deepspeed", "deepspeed-moe-bytes.json", "0.16.4"),
    ("deepspeed-sparse", "deepspeed-moe-bytes-0.19.8.json", "0.19.8")])
def test_deepspeed_traffic_is_what_deepspeeds_layer_moved(runtime, record, version):
    """The gate, dispatch, experts and combine bytes and GEMM FLOPs charged for DeepSpeed are
    its layer's as bench/count_deepspeed_moe_bytes.py counted them at every size it ran
    (top-1/2/4, bf16 and fp32, 64-256 tokens, 4-16 experts, width 16/32, FFN 2-3x, capacity
    factor 1 and 2): the package's table is the record's fits, and they give back each counted
    point exactly — inference its forward, a training pass (no recompute) a third of forward +
    backward; the experts' depend on the experts, their rows and widths, not on the tokens."""
    import json
    from pathlib import Path

    from moeplan.cost_models.traffic import deepspeed_counts, deepspeed_traffic

    path = Path(__file__).resolve().parent.parent / "bench/results" / record
    record = json.loads(path.read_text())
    assert record["deepspeed"] == version
    table = deepspeed_counts()[runtime]
    assert table["deepspeed"] == version
    assert table["fits"] == {k: v["per"] for k, v in record["fits"].items()}
    assert all(v["largest_residual"] == 0 for v in record["fits"].values())
    for key, fit in record["fits"].items():
        if " experts " in key:
            assert not {t for t in fit["per"] if t.startswith("s")}, key
    layers = [pt for pt in record["points"] if "k" in pt]
    for pt in [pt for pt in record["points"] if "ep2_experts" in pt]:
        # over 2 ranks with several local experts: the one-rank count plus the copy of each
        # expert's rows out of the exchange's output (and the cat of their gradients)
        b = 2 if pt["dtype"] == "bfloat16" else 4
        for training in (False, True):
            size = (0, pt["ep2_experts"], 2 * pt["rows_per_rank"], pt["hidden"], pt["ffn"])
            one, two = (deepspeed_traffic(runtime, "experts", 1, b, *size[:4], training, False,
                                          pt["ffn"], chunked) for chunked in (False, True))
            ways = ["forward", "backward"] if training else ["forward"]
            copy = sum(pt["train"][w]["bytes"] for w in ways) / len(ways) * (
                2 / 3 if training else 1) - (one.gemm_bytes + one.other_bytes)
            rows_h = size[1] * size[2] * size[3]
            assert two.other_bytes - one.other_bytes == pytest.approx(2 * b * rows_h * (
                2 / 3 if training else 1), rel=F64_REL)
            assert copy >= two.other_bytes - one.other_bytes  # + PyTorch's unfused bias add
    for pt in layers:
        b = 2 if pt["dtype"] == "bfloat16" else 4
        for phase in ("gate", "dispatch", "experts", "combine"):
            for training in (False, True):
                t = deepspeed_traffic(runtime, phase, pt["k"], b, pt["tokens"], pt["experts"],
                                      pt["capacity"], pt["hidden"], training, False, pt["ffn"])
                ways = ([pt["train"]["forward"], pt["train"]["backward"]] if training
                        else [pt["infer"]["forward"]])
                want = [sum(w[phase][what] for w in ways) / len(ways) * (2 / 3 if training
                                                                          else 1)
                        for what in ("gemm_flops", "gemm_bytes", "bytes")]
                got = [t.gemm_flops, t.gemm_bytes, t.gemm_bytes + t.other_bytes]
                assert got == pytest.approx(want, rel=F64_REL), (pt, phase, training)
    assert len(layers) >= 400


@pytest.mark.parametrize("runtime, record, version", [
    ("deepspeed", "deepspeed-moe-ops.json", "0.16.4"),
    ("deepspeed-sparse", "deepspeed-moe-ops-0.19.8.json", "0.19.8")])
def test_deepspeed_moe_counts_are_what_deepspeeds_layer_did(runtime, record, version):
    """DeepSpeed-MoE's per-phase kernel counts against DeepSpeed's layer run on a CPU rank by
    bench/count_deepspeed_moe_ops.py (its records under bench/results/; host scalars and
    one_hot's CPU-only checks left out, as a GPU runs them): the gate as counted on one rank,
    dispatch and combine as counted expert-parallel over 2 ranks (all-to-alls running) and the
    same as on one rank (their all-to-alls copy nothing); the inference gate without random
    token selection; no device sync in either; the experts as
    counted over the Experts module on a 2-rank all-to-all's output, less the two kernels
    Megatron's expert does not launch (a bias add fused into its GELU, the second bias
    DeepSpeed drops). Whole counts."""
    import json
    from pathlib import Path

    from moeplan.cost_models.runtimes import (
        DEEPSPEED_OPS,
        DEEPSPEED_RTS_OPS,
        DEEPSPEED_SPARSE_OPS,
        operations,
    )

    path = Path(__file__).resolve().parent.parent / "bench/results" / record
    record = json.loads(path.read_text())
    assert record["deepspeed"] == version
    ops = DEEPSPEED_OPS if runtime == "deepspeed" else DEEPSPEED_SPARSE_OPS
    got = record["summary"]
    assert ops["gate"] == (got["train forward gate"]["fixed"],
                           got["train backward gate"]["fixed"])
    for phase in ("dispatch", "combine"):
        for ep in ("", "ep 2 "):
            assert ops[phase] == (got[f"{ep}train forward {phase}"]["fixed"],
                                  got[f"{ep}train backward {phase}"]["fixed"]), (phase, ep)
    assert operations(runtime, "gpu", "gate", False) == (got["infer forward gate"]["fixed"]
                                                         - DEEPSPEED_RTS_OPS)
    for layer in (*record["by_local_experts"].values(),
                  *record["by_local_experts_ep2"].values(), *record["by_top_k"].values()):
        assert not layer["train"]["syncs"] and not layer["infer"]["syncs"]
    for k in (2, 4):  # top-2 and DeepSpeed's topkgating (top-k > 2): as counted at k = 2 and 4
        spec = load_model("tiny-pr-moe").model_copy(update={"top_k": k})
        for phase in ("gate", "dispatch", "combine"):
            fwd, bwd = (got[f"top-{k} train {way} {phase}"]["fixed"]
                        for way in ("forward", "backward"))
            assert 3 * operations(runtime, "gpu", phase, True, 0, spec) == pytest.approx(
                fwd + bwd, rel=F64_REL), (k, phase)
            assert operations(runtime, "gpu", phase, False, 0, spec) == (
                got[f"top-{k} infer forward {phase}"]["fixed"]), (k, phase)
    for local in (1, 4, 16):
        forward = operations(runtime, "gpu", "experts", False, local)
        both = 3 * operations(runtime, "gpu", "experts", True, local)
        want = [got[f"train {way} experts, ep 2"]["fixed"]
                + (got[f"train {way} experts, ep 2"]["per_local_expert"] - 1) * local
                for way in ("forward", "backward")]
        assert (forward, both - forward) == pytest.approx(want, abs=1e-9)


def test_runtime_choices_are_the_planners():
    """The CLI's --runtime choices (a torch-free constant) are the planner's `Runtime` values."""
    from typing import get_args

    from moeplan.cost_models.runtimes import RUNTIMES
    from moeplan.planner.planning import Runtime

    assert get_args(Runtime) == RUNTIMES


def test_the_optimizers_once_a_step_host_syncs_are_charged_once():
    """The BF16 optimizer reads two scalars on the host a step (its norm assert, the clipping
    test), DeepSpeed's fp16 ZeRO 1/2 one (the overflow flag): charged once, with the embedding."""
    from moeplan.cost_models.runtimes import HOST_SYNC_S
    from moeplan.cost_models.update import optimizer_step_s

    for runtime, zero, dtype, syncs in (("deepspeed", 0, "bf16", 2), ("deepspeed", 1, "fp16", 1),
                                        ("deepspeed", 0, "fp16", 0), ("moerun", 0, "bf16", 0)):
        env = _env(zero=zero)
        env = replace(env, runtime=runtime,
                      workload=env.workload.model_copy(update={"dtype": dtype}))
        assert optimizer_step_s(env) == pytest.approx(syncs * HOST_SYNC_S, rel=F64_REL)
    assert optimizer_step_s(_env(cluster=load_cluster("local-cpu"))) == 0.0


def test_a_zero_rank_is_charged_the_tensors_of_its_piece():
    """Under ZeRO 1/2 each of dp ranks clips and steps about 1/dp of a layer's tensors, though
    its reduction copies every gradient into the bucket (a launch a tensor)."""
    for runtime, dtype, launches in (("moerun", "bf16", 5.11), ("deepspeed", "fp16", 9 + 1)):
        per_tensor, _ = _optimizer_charge(runtime, 1, dtype, shards=64)
        assert per_tensor == pytest.approx((launches / 64 + 1) * NDV4.device.op_overhead_s,
                                           rel=F64_REL)


def test_moerun_optimizer_launch_counts_match_the_runtime():
    """The counts behind moerun's GPU optimizer charge: clipping makes 5 operations a tensor,
    and AdamW's foreach step 8 list operations over the device tensors whatever their number
    (its step counters are host tensors)."""
    torch = pytest.importorskip("torch")
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from moeplan.runtime.optim import _square_sum

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def clip_ops(n):
        grads = [torch.randn(8, 8) for _ in range(n)]
        sq = torch.zeros(1, dtype=torch.float64)
        with Count() as c:
            for g in grads:  # as `clip_grads` sums each tensor's share
                sq += _square_sum(g) / 2.0
        return sum(c.ops.values())

    assert clip_ops(3) - clip_ops(2) == 5

    def adamw_ops(n):
        params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(n)]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
        for p in params:
            p.grad = torch.randn(8, 8)
        with Count() as c:
            opt.step()
        return Counter({k: v for k, v in c.ops.items() if k.startswith("_foreach")})

    ops = adamw_ops(3)
    assert ops == adamw_ops(7)  # list operations: their number does not grow with the tensors
    # the 8 device-list operations the charge counts, plus the host step counters' increment
    assert sum(ops.values()) == 8 + 1, ops
