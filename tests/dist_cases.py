"""Rank-side bodies of the multi-process runtime tests (run by `dist_harness.run_world`).

Each body runs many cases in one world and returns plain numbers; the tests assert on them.
Reference: the single-device model with the same weights, run on each data-parallel shard
separately (gating capacity depends on the tokens of one gate call), its loss averaged over the
shards — which is what data parallelism computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from fastpath_probe import decode_probe

from moeplan.cost_models.env import LayerChoice
from moeplan.planner.planning import Request, fixed_plan
from moeplan.runtime.a2a import FlatExchange, HierarchicalExchange
from moeplan.runtime.groups import build_groups
from moeplan.runtime.infer import generate
from moeplan.runtime.model import GPT
from moeplan.runtime.parallel import GradSync, cut, parallelize
from moeplan.spec import load_cluster, load_model

SEQ = 16
PER_SHARD = 2  # sequences per data-parallel shard


def mla_spec():
    """A tiny DeepSeek-V2 from a Hugging Face config: latent attention with a low-rank query,
    a first dense layer, fine-grained and shared experts, top-2 of 4, room enough not to drop."""
    from hf_configs import DEEPSEEK_V2_LITE

    from moeplan.spec.hf import from_hf

    small = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 128,
             "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 4,
             "num_experts_per_tok": 2, "q_lora_rank": 24, "kv_lora_rank": 16,
             "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}
    return from_hf(dict(DEEPSEEK_V2_LITE, **small), "tiny-deepseek").model_copy(
        update={"drop_tokens": True, "capacity_factor": 4.0, "eval_capacity_factor": 4.0})


def modern_spec(qk_norm: str = "head"):
    """tiny-pr-moe's sizes with today's blocks (what Hugging Face configs bring): SwiGLU,
    RMSNorm, rotary positions, grouped-query attention (4 heads, 2 kv heads), no biases but on
    q/k/v, query/key norms, an untied head, fine-grained experts (128 wide) with a gated shared
    expert (64 wide), top-3 of 4 or 8 experts without renormalisation."""
    return load_model("tiny-pr-moe").model_copy(update={
        "name": "tiny-modern", "mlp": "swiglu", "norm": "rmsnorm", "norm_eps": 1e-6,
        "positions": "rope", "rope_theta": 10000.0, "kv_heads": 2, "bias": False,
        "qkv_bias": True, "qk_norm": qk_norm, "tied_embeddings": False,
        "expert_ffn_hidden": 128, "residual": False, "shared_ffn_hidden": 64,
        "shared_gate": True, "experts": [0, 4, 0, 4, 0, 8, 0, 8], "top_k": 3,
        "renormalize_top_k": False, "noisy_gate_policy": "none", "capacity_factor": 2.0})


def choice(ep, es=1, a2a="flat", coordinated=False):
    return LayerChoice(ep=ep, es=es, a2a=a2a, coordinated=coordinated)


def make_plan(world: int, tp: int, choices: dict, spec=None, zero: int = 1, mode: str = "train",
              dtype: str | None = None):
    spec = spec or load_model("tiny-pr-moe")
    lengths = dict(seq_len=SEQ) if mode == "train" else dict(prompt_len=SEQ // 2,
                                                             gen_len=SEQ // 2)
    req = Request(gpus=world, mode=mode, global_batch=PER_SHARD * world // tp, zero_stage=zero,
                  dtype=dtype, **lengths)
    return fixed_plan(spec, load_cluster("local-cpu"), req, tp, choices)


def _batch(dp: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (dp, PER_SHARD, SEQ + 1), generator=g)


def _full_model(spec, seed: int = 0, skew_layer: int | None = None) -> GPT:
    torch.manual_seed(seed)
    model = GPT(spec)
    if skew_layer is not None:  # all tokens tie -> expert 0; the other experts receive none
        with torch.no_grad():
            model.blocks[skew_layer].ffn.router.weight.zero_()
    return model


def parity(plan, rank: int, world: int, skew_layer: int | None = None, kernels=None) -> dict:
    """Forward logits, loss and synchronised gradients vs the single-device model."""
    groups = build_groups(plan, rank, world)
    full = _full_model(plan.model, skew_layer=skew_layer)
    model = parallelize(full.state_dict(), plan, groups)
    if kernels is not None:  # the distributed model on these kernels, the reference on torch's
        from moeplan.runtime.kernels import use_kernels

        use_kernels(model, kernels)
    data = _batch(groups.dp.size)
    shard = data[groups.dp.rank_in_group]
    loss, _ = model.loss(shard[:, :-1], shard[:, 1:])
    logits, _ = model(shard[:, :-1])
    loss.backward()
    GradSync(model, groups)()
    dropped = int(sum(b.ffn.last.dropped for b in model.blocks if hasattr(b.ffn, "last")))

    ref_loss = 0.0
    for d in range(groups.dp.size):
        l, _ = full.loss(data[d, :, :-1], data[d, :, 1:])
        (l / groups.dp.size).backward()
        ref_loss += float(l.detach()) / groups.dp.size
        if d == groups.dp.rank_in_group:
            ref_logits, _ = full(data[d, :, :-1])
    loss_t = torch.tensor([loss.item()])
    dist.all_reduce(loss_t, group=groups.dp.group) if groups.dp.size > 1 else None
    slices = model.slices()
    full_params = dict(full.named_parameters())
    worst, worst_name = 0.0, ""
    for name, p in model.named_parameters():
        if name.endswith("experts.b2") and not model.get_submodule(name[:-3]).es_rank0:
            continue  # added by the first expert slice only; unused here
        diff = float((p.grad - cut(full_params[name].grad, slices.get(name, ()))).abs().max())
        if diff > worst:
            worst, worst_name = diff, name
    return {"logits": float((logits - ref_logits).abs().max()),
            "loss": abs(float(loss_t) / groups.dp.size - ref_loss),
            "grad": worst, "grad_name": worst_name, "dropped": dropped,
            "grad_scale": max(float(p.grad.abs().max()) for p in full.parameters()),
            "logits_scale": float(ref_logits.abs().max()), "loss_value": abs(ref_loss)}


def exchange_exact(rank: int, world: int) -> dict:
    """Hierarchical vs flat all-to-all on 2 emulated nodes of 2: bitwise, forward and backward."""
    plan = make_plan(world, 1, {5: choice(4, a2a="hierarchical")})
    groups = build_groups(plan, rank, world)
    g = groups.moe[5]
    torch.manual_seed(100 + rank)
    x = torch.randn(world, 3, 5, 7, requires_grad=True)
    dy = torch.randn(world, 3, 5, 7)
    out = {}
    for name, ex in (("flat", FlatExchange(g.ep)), ("hier", HierarchicalExchange(g.intra, g.inter))):
        x.grad = None
        y = ex(x)
        y.backward(dy)
        out[name] = (y.detach().clone(), x.grad.clone())
    return {"forward_equal": torch.equal(out["flat"][0], out["hier"][0]),
            "backward_equal": torch.equal(out["flat"][1], out["hier"][1]),
            "moved": not torch.equal(out["flat"][0], x.detach())}


def generation(plan, rank: int, world: int) -> dict:
    groups = build_groups(plan, rank, world)
    full = _full_model(plan.model)
    model = parallelize(full.state_dict(), plan, groups)
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, 256, (groups.dp.size, 3, 10), generator=g)
    mine = prompts[groups.dp.rank_in_group]
    got = generate(model, mine, 12)
    want = generate(full, mine, 12)
    return {"equal": torch.equal(got, want), "tokens": got.numel()}


def _cases4(spec) -> dict:
    top2 = spec.model_copy(update={"top_k": 2, "capacity_factor": 1.0, "min_capacity": 1})
    roomy = spec.model_copy(update={"capacity_factor": 4.0, "eval_capacity_factor": 4.0})
    return {
        "ep=E flat": make_plan(4, 1, {1: choice(2), 3: choice(2), 5: choice(4), 7: choice(4)}),
        "ep<E mixed, hierarchical": make_plan(4, 1, {1: choice(1), 3: choice(2),
                                                     5: choice(2), 7: choice(4, a2a="hierarchical")}),
        "tp=2 uncoordinated": make_plan(4, 2, {1: choice(2), 5: choice(4), 7: choice(2)}),
        "tp=2 coordinated hierarchical": make_plan(
            4, 2, {1: choice(2, coordinated=True), 3: choice(2),
                   5: choice(4, a2a="hierarchical", coordinated=True),
                   7: choice(4, coordinated=True)}, spec=roomy),
        "es=2": make_plan(4, 1, {1: choice(2, es=2), 3: choice(2, es=2), 5: choice(4)}),
        "es=2 with tp=2": make_plan(4, 2, {1: choice(2, es=2), 3: choice(2, es=2, coordinated=True)},
                                    spec=roomy),
        "top-2 with drops": make_plan(4, 1, {1: choice(2), 5: choice(2),
                                             7: choice(4, a2a="hierarchical")}, spec=top2),
    }


def world4(rank: int, world: int) -> dict:
    spec = load_model("tiny-pr-moe")
    results = {name: parity(plan, rank, world) for name, plan in _cases4(spec).items()}
    modern = modern_spec()
    results["modern blocks, tp=2"] = parity(
        make_plan(4, 2, {1: choice(2), 3: choice(4), 5: choice(2), 7: choice(4)}, spec=modern),
        rank, world)
    results["modern blocks, ep=E"] = parity(
        make_plan(4, 1, {1: choice(4), 3: choice(4), 5: choice(4), 7: choice(4)}, spec=modern),
        rank, world)
    results["modern blocks, full q/k norm, tp=2"] = parity(
        make_plan(4, 2, {}, spec=modern_spec("full")), rank, world)
    results["modern blocks, dropless, ep=E"] = parity(
        make_plan(4, 1, {1: choice(4), 3: choice(2), 5: choice(4), 7: choice(4)},
                  spec=modern.model_copy(update={"drop_tokens": False, "capacity_factor": 0.5})),
        rank, world)
    results["generate modern tp=2"] = generation(make_plan(4, 2, {}, spec=modern), rank, world)
    mla = mla_spec()
    results["latent attention (MLA), tp=2"] = parity(
        make_plan(4, 2, {1: choice(2), 2: choice(4), 3: choice(2)}, spec=mla), rank, world)
    results["generate MLA tp=2"] = generation(make_plan(4, 2, {}, spec=mla), rank, world)
    results["skewed router (zero tokens for some experts)"] = parity(
        make_plan(4, 1, {5: choice(4)}), rank, world, skew_layer=5)
    results["exchange"] = exchange_exact(rank, world)
    results["generate tp=1"] = generation(
        make_plan(4, 1, {1: choice(2), 5: choice(4, a2a="hierarchical")}), rank, world)
    results["generate tp=2"] = generation(make_plan(4, 2, {5: choice(4)}), rank, world)
    results["checkpoints"] = checkpoints(rank, world)
    results["resume"] = resume(rank, world)
    results["zero"] = zero_stages(rank, world)
    results["infer memory"] = infer_memory(rank, world)
    results["profile exchanges"] = profile_exchanges(rank, world)
    results["slowest table"] = slowest_table(rank, world)
    return _remove_tmpdirs(results)


def profile_exchanges(rank: int, world: int) -> list[dict]:
    """`moeplan profile`'s timing of both all-to-all algorithms over 2 nodes of 2 ranks."""
    from moeplan.calibrate.measure import Bench, exchanges

    b = Bench(rank, world, torch.device("cpu"), warmup=1, repeats=2)
    b.sample_s = 0.002
    return exchanges(b, 2, quick=True, progress=lambda: None)


def slowest_table(rank: int, world: int) -> dict:
    """The profile's all-ranks table: rank 1 slowest in "a", rank 2 in "b", rank 1 slowest in
    all (5 + 1 + 1 against rank 2's 1 + 4 + 1)."""
    from moeplan.calibrate.probe import _slowest
    from moeplan.calibrate.sampling import Bench

    b = Bench(rank, world, torch.device("cpu"), warmup=0, repeats=1)
    return _slowest(b, {"a": 5.0 if rank == 1 else 1.0, "b": 4.0 if rank == 2 else 1.0,
                        "c": 1.0})


def world2(rank: int, world: int) -> dict:
    import os

    # before anything imports triton (torch.optim may, through torch._dynamo)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    spec = load_model("tiny-pr-moe")
    return _remove_tmpdirs({
        "ep=E": parity(make_plan(2, 1, {}), rank, world),
        "ep=1": parity(make_plan(2, 1, {i: choice(1) for i in (1, 3, 5, 7)}), rank, world),
        "tp=2": parity(make_plan(2, 2, {}), rank, world),
        "tp=2 coordinated": parity(make_plan(2, 2, {i: choice(2, coordinated=True)
                                                    for i in (1, 3)},
                                             spec=spec.model_copy(update={"capacity_factor": 4.0})),
                                   rank, world),
        "generate": generation(make_plan(2, 1, {}), rank, world),
        "training": training(rank, world),
        "routers": routers(rank, world),
        "mos": mos(rank, world),
        "ep=E, triton kernels": _triton_parity(rank, world),
        "today's blocks (top-3 raw), triton kernels": _triton_parity(rank, world, modern_spec()),
    })


_TMPDIRS: list[str] = []  # rank 0's, removed by `_remove_tmpdirs` once every case has run


def _shared_tmpdir(world: int) -> str:
    import tempfile

    box = [tempfile.mkdtemp(prefix="moeplan-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() == 0:
        _TMPDIRS.append(box[0])
    return box[0]


def _remove_tmpdirs(results: dict) -> dict:
    """After every rank is done with them, rank 0 removes the folders the cases made."""
    import shutil

    dist.barrier()
    while _TMPDIRS:
        shutil.rmtree(_TMPDIRS.pop())
    return results


def checkpoints(rank: int, world: int) -> dict:
    """Save under one plan, load under others (different ep, es, tp, a2a): same outputs."""
    from moeplan.runtime import checkpoint
    from moeplan.runtime.run import RunConfig, build_model

    root = _shared_tmpdir(world)
    plans = {
        "A tp=1 ep=E": make_plan(4, 1, {1: choice(2), 5: choice(4)}),
        "B tp=2 es=2": make_plan(4, 2, {1: choice(2, es=2), 3: choice(2, es=2), 5: choice(2)}),
        "C tp=1 ep=1/hier": make_plan(4, 1, {1: choice(1), 3: choice(1),
                                             5: choice(4, a2a="hierarchical"), 7: choice(1)}),
    }
    x = _batch(1, seed=3)[0, :, :-1]
    # move the weights away from the seeded initialisation, as training would
    source, _ = build_model(plans["A tp=1 ep=E"],
                            build_groups(plans["A tp=1 ep=E"], rank, world),
                            RunConfig(mode="train"))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    checkpoint.save(source, f"{root}/ckpt", step=1, plan_digest="test", rank=rank, world=world)
    full, _ = checkpoint.load_full(f"{root}/ckpt")
    ref = GPT(plans["A tp=1 ep=E"].model)
    from moeplan.runtime.parallel import load_full_state

    load_full_state(ref, full)
    ref.eval()
    want, _ = ref(x)
    out = {}
    for name, plan in plans.items():
        groups = build_groups(plan, rank, world)
        model, _ = build_model(plan, groups, RunConfig(mode="infer", load=f"{root}/ckpt"))
        model.eval()
        got, _ = model(x)
        out[name] = float((got - want).abs().max())
    source.eval()
    out["source"] = float((source(x)[0] - want).abs().max())
    return {"diff": out, "logits_scale": float(want.abs().max())}


def resume(rank: int, world: int) -> dict:
    """4 steps straight against 2 + save + load + 2, under the same plan (ep=2/4, dp=4) and with
    the second half under another (tp=2, es=2): losses, and the weights and Adam moments the
    checkpoint holds after the second half."""
    from moeplan.runtime import checkpoint
    from moeplan.runtime.run import RunConfig, execute

    root = _shared_tmpdir(world)
    a = make_plan(4, 1, {1: choice(2), 5: choice(4)})
    b = make_plan(4, 2, {1: choice(2, es=2), 3: choice(2, es=2), 5: choice(2)})
    quiet = dict(log=lambda *_: None)

    def run(plan, steps, **kw):
        cfg = RunConfig(mode="train", steps=steps, warmup=0, lr=3e-3, **kw)
        record = execute(plan, cfg, rank, world, **quiet)
        return record.losses if record else None

    straight = run(a, 4, save=f"{root}/straight")
    first = run(a, 2, schedule_steps=4, save=f"{root}/half")
    second = run(a, 2, load=f"{root}/half", save=f"{root}/resumed")
    other = run(b, 2, load=f"{root}/half", save=f"{root}/other")
    out = {"straight": straight, "halves": None if first is None else first + second,
           "other": None if first is None else first + other}
    if rank == 0:
        full = {name: checkpoint.load_full(f"{root}/{name}")[0]
                for name in ("straight", "resumed", "other")}
        out["bitwise"] = all(torch.equal(full["straight"][k], full["resumed"][k])
                             for k in full["straight"])
        out["moments"] = sum(k.startswith(checkpoint.OPTIMIZER) for k in full["straight"])
        out["other_max_diff"] = {k: float((full["straight"][k] - full["other"][k]).abs().max())
                                 for k in full["straight"]}
        out["position"] = checkpoint.read_manifest(f"{root}/resumed")["position"]
    return out


def zero_stages(rank: int, world: int) -> dict:
    """3 steps of one layout (ep=2 and 4 among dp=4 ranks; tp=2 with es=2) under ZeRO 0, 1
    and 2: losses, the final weights and Adam moments (as the checkpoint holds them whole),
    and the memory terms counted against the plan's."""
    from moeplan.runtime import checkpoint
    from moeplan.runtime.run import RunConfig, execute

    root = _shared_tmpdir(world)
    layouts = {"tp=1": (1, {1: choice(2), 5: choice(4)}),
               "tp=2 es=2": (2, {1: choice(2, es=2), 3: choice(2, es=2, coordinated=True),
                                 5: choice(2)})}
    out = {}
    for name, (tp, choices) in layouts.items():
        for zero in (0, 1, 2):
            plan = make_plan(4, tp, choices, zero=zero)
            ckpt = f"{root}/{name}-zero{zero}"
            record = execute(plan, RunConfig(mode="train", steps=3, warmup=0, lr=3e-3,
                                             save=ckpt), rank, world, log=lambda *_: None)
            if rank == 0:
                out[(name, zero)] = {
                    "losses": record.losses,
                    "state": checkpoint.load_full(ckpt)[0],
                    "memory": {r.phase: (r.predicted, r.measured)
                               for r in record.memory_comparison}}
    return out


def infer_memory(rank: int, world: int) -> dict:
    """One bf16 generation per layout of `zero_stages`: the weights and KV cache a rank holds,
    counted against the plan's."""
    from moeplan.runtime.run import RunConfig, execute

    layouts = {"tp=1": (1, {1: choice(2), 5: choice(4)}),
               "tp=2 es=2": (2, {1: choice(2, es=2), 3: choice(2, es=2, coordinated=True),
                                 5: choice(2)})}
    out = {}
    for name, (tp, choices) in layouts.items():
        plan = make_plan(4, tp, choices, mode="infer", dtype="bf16")
        record = execute(plan, RunConfig(mode="infer", steps=1, warmup=0), rank, world,
                         log=lambda *_: None)
        if rank == 0:
            out[name] = {r.phase: (r.predicted, r.measured) for r in record.memory_comparison}
    return out


def training(rank: int, world: int) -> dict:
    from moeplan.runtime.run import RunConfig, execute

    plan = make_plan(world, 1, {})
    record = execute(plan, RunConfig(mode="train", steps=29, warmup=1, lr=3e-3), rank, world,
                     log=lambda *_: None)
    return {"losses": record.losses if record else None,
            "comparison": len(record.comparison) if record else None,
            "routing": [l.model_dump() for l in record.layers if l.kind == "moe"]
            if record else None, "warmup": record.warmup_steps if record else None}


def routers(rank: int, world: int) -> dict | None:
    """The router health of a short run with moerun's defaults: tiny-pr-moe, 8 sequences of
    64 tokens per rank (512 tokens per gate call), 5 warm-up + 25 steps."""
    from moeplan.runtime.run import RunConfig, execute
    from moeplan.spec.record import router_health

    req = Request(gpus=world, mode="train", global_batch=8 * world, micro_batch=8, seq_len=64)
    plan = fixed_plan(load_model("tiny-pr-moe"), load_cluster("local-cpu"), req, 1, {})
    record = execute(plan, RunConfig(mode="train", steps=25, warmup=5), rank, world,
                     log=lambda *_: None)
    return router_health(record) if record else None


def mos(rank: int, world: int) -> dict:
    """Mixture-of-Students: a tiny-pr-moe teacher trained 3 steps and saved; its student
    (tiny-pr-moe-mos) loads it with the degrees of the plan's teacher section. The sharded
    teacher's logits against the single-device teacher's; the student's first loss with and
    without distillation; whether the teacher ran when distilling throughout and when the
    distillation stopped after the first of 3 steps."""
    from moeplan.runtime import checkpoint
    from moeplan.runtime.parallel import load_full_state
    from moeplan.runtime.run import RunConfig, build_teacher, execute

    root = _shared_tmpdir(world)
    quiet = dict(log=lambda *_: None)
    cluster = load_cluster("local-cpu")
    req = Request(gpus=world, mode="train", global_batch=PER_SHARD * world, seq_len=SEQ)
    teacher_plan = fixed_plan(load_model("tiny-pr-moe"), cluster, req, 1, {})
    execute(teacher_plan, RunConfig(mode="train", steps=3, warmup=0, save=f"{root}/teacher"),
            rank, world, **quiet)
    student = fixed_plan(load_model("tiny-pr-moe-mos"), cluster, req, 1, {})
    teacher = build_teacher(student, build_groups(student, rank, world), f"{root}/teacher")
    x = _batch(1, seed=5)[0, :, :-1]
    ref = GPT(load_model("tiny-pr-moe"))
    load_full_state(ref, checkpoint.split(checkpoint.load_full(f"{root}/teacher")[0])[0])
    ref.eval()
    want = ref(x)[0]
    diff = float((teacher(x)[0] - want).abs().max())

    def run(**kw):
        record = execute(student, RunConfig(mode="train", steps=3, warmup=0, **kw), rank,
                         world, **quiet)
        return None if record is None else (record.losses,
                                             record.measured.head_phases_s.get("teacher", 0.0))

    plain = run(kd_steps=0)
    taught = run(teacher=f"{root}/teacher")
    staged = run(teacher=f"{root}/teacher", kd_steps=1)
    return {"teacher_diff": diff, "scale": float(want.abs().max()),
            "teacher_layers": [(l.index, l.ep, l.edp) for l in student.teacher.layers
                               if l.kind == "moe"],
            "plain": plain, "taught": taught, "staged": staged}


def _triton_parity(rank: int, world: int, spec=None) -> dict:
    """The parity case on the Triton kernels (CPU interpreter), when triton is installed:
    DeepSpeed-style top-2, or `spec`."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    from moeplan.runtime.kernels import triton_available, triton_kernels

    if not triton_available():
        return {"skipped": "triton is not installed"}
    spec = spec or load_model("tiny-pr-moe").model_copy(update={"top_k": 2})
    return parity(make_plan(2, 1, {}, spec=spec), rank, world, kernels=triton_kernels())


def _perturbed(model: GPT, seed: int) -> GPT:
    """Weights moved away from the initialisation (as training would), so that greedy tokens
    vary from step to step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def es_infer_parity(rank: int, world: int) -> dict:
    """Inference with expert slicing (ep=2, es=2 on every MoE layer of a 2-expert tiny-pr-moe):
    the es group's tokens are gathered before the gate, so the reference is the single-device
    model on the union of the group's shards (in es rank order) — every layer gates that same
    token set; this rank's rows of it must match."""
    spec = load_model("tiny-pr-moe").model_copy(update={"experts": [0, 2, 0, 2, 0, 2, 0, 2]})
    plan = make_plan(world, 1, {i: choice(2, es=2) for i in (1, 3, 5, 7)}, spec=spec)
    groups = build_groups(plan, rank, world)
    full = _perturbed(_full_model(plan.model), seed=11)
    model = parallelize(full.state_dict(), plan, groups).eval()
    full.eval()
    data = _batch(groups.dp.size)[:, :, :-1]
    es = groups.moe[1].es
    union = torch.cat([data[r] for r in es.ranks])  # dp rank == global rank here (tp=1)
    mine = data[groups.dp.rank_in_group]
    with torch.no_grad():
        got, _ = model(mine)
        ref_union, _ = full(union)
        dropped = int(sum(b.ffn.last.dropped for b in full.blocks if hasattr(b.ffn, "last")))
        ref_shard, _ = full(mine)
    rows = slice(es.rank_in_group * PER_SHARD, (es.rank_in_group + 1) * PER_SHARD)
    want = ref_union[rows]
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 256, (groups.dp.size, 2, 8), generator=g)
    gen = generate(model, prompts[groups.dp.rank_in_group], 6)
    gen_union = generate(full, torch.cat([prompts[r] for r in es.ranks]), 6)[rows]
    return {"logits": float((got - want).abs().max()), "logits_scale": float(want.abs().max()),
            "per_shard_logits": float((got - ref_shard).abs().max()),
            "union_dropped": dropped, "generate_equal": torch.equal(gen, gen_union),
            "tokens": gen.numel()}


def fastpath2(rank: int, world: int) -> dict:
    """Syncs and static shapes of a distributed decode step (2 ranks, tp=1, ep=E)."""
    plan = make_plan(world, 1, {})
    groups = build_groups(plan, rank, world)
    model = parallelize(_full_model(plan.model).state_dict(), plan, groups)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 256, (3, 8), generator=g)
    return {"decode ep=E": decode_probe(model, prompt)}


# 4-rank decode layouts probed for syncs and static shapes: (tp, es, tp-coordinated)
FOUR_RANK_DECODES = {"decode es=2 tp=1": (1, 2, False), "decode tp=2 coordinated": (2, 1, True),
                     "decode tp=2 coordinated es=2": (2, 2, True)}


def fastpath4(rank: int, world: int) -> dict:
    out = {"es=2 inference": es_infer_parity(rank, world)}
    spec = load_model("tiny-pr-moe").model_copy(update={"experts": [0, 2, 0, 2, 0, 2, 0, 2]})
    for name, (tp, es, coordinated) in FOUR_RANK_DECODES.items():
        choices = {i: choice(2, es=es, coordinated=coordinated)
                   for i, E in enumerate(spec.experts) if E}
        plan = make_plan(world, tp, choices, spec=spec, mode="infer")
        groups = build_groups(plan, rank, world)
        model = parallelize(_full_model(plan.model).state_dict(), plan, groups)
        g = torch.Generator().manual_seed(3)
        out[name] = decode_probe(model, torch.randint(0, 256, (2, 8), generator=g))
    return out
