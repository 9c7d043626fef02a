"""A plan as the engines people run MoE training on take it: DeepSpeed (a config JSON and the
`deepspeed.moe.layer.MoE` arguments of each layer), Megatron-DeepSpeed and Megatron-Core
(command-line arguments of their `pretrain_gpt.py`).

What each engine can express was read from its own source (Megatron-DeepSpeed f4157be
megatron/arguments.py and model/transformer.py; Megatron-LM d98e8a6 megatron/training/
arguments.py and megatron/core; DeepSpeed 38327e0 deepspeed/moe/layer.py, runtime/config.py):
  DeepSpeed        one MoE module per layer, each with its own ep_size; experts sliced only over
                   the tensor-parallel group (enable_expert_tensor_parallelism); tokens that tp
                   ranks share are routed once (TP-coordinated); a flat all-to-all
  Megatron-DS      one --moe-expert-parallel-size for every layer; --num-experts per MoE layer
                   at every --expert-interval-th layer (1-based); no noise policy flag
  Megatron-Core    one --num-experts and one --expert-model-parallel-size; --moe-layer-freq as a
                   0/1 list; no residual MoE (a shared expert is the nearest); dropping by
                   position or probability, never random
What the plan asks and the engine cannot express is a note (one line each); the export then
writes the closest configuration, and `closest` re-costs it with the same model as the search.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from moeplan.cost_models.env import LayerChoice
from moeplan.cost_models.runtimes import DEEPSPEED_RUNTIMES
from moeplan.planner.diagnose import describe_layers
from moeplan.planner.planning import Request, fixed_plan
from moeplan.spec.cluster import ClusterProfile
from moeplan.spec.errors import ConfigError, MoeplanError
from moeplan.spec.plan import Plan, digest
from moeplan.spec.zoo import load_cluster

ENGINES = ("deepspeed", "megatron-deepspeed", "megatron-core")
# DeepSpeed as pip installs it today (0.19.4 and later: index dispatch); `--runtime deepspeed`
# costs the one-hot einsum layer of 0.19.3 and before
DEEPSPEED_EXPORT_RUNTIME = "deepspeed-sparse"
# the fp16 block of the Megatron-DeepSpeed MoE examples' DeepSpeed configs (dynamic loss scale)
FP16 = {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
        "min_loss_scale": 1, "initial_scale_power": 11}


@dataclass
class Export:
    engine: str
    files: dict[str, str]  # name -> content
    notes: list[str] = field(default_factory=list)  # what the engine cannot express
    choices: dict[int, LayerChoice] = field(default_factory=dict)  # the closest degrees
    tp: int = 1
    runtime: str = DEEPSPEED_EXPORT_RUNTIME  # whose kernels cost the closest configuration


def _moe_layers(plan: Plan):
    return [layer for layer in plan.layers if layer.kind == "moe"]


def _ds_config(plan: Plan, notes: list[str]) -> dict:
    """DeepSpeed's JSON: batch (train_batch_size = micro × accumulation × dp, dp excluding tp),
    clipping, precision, ZeRO stage."""
    w, dp = plan.workload, plan.parallel.dp
    cfg: dict = {"train_micro_batch_size_per_gpu": w.micro_batch}
    if w.mode == "train":
        cfg.update(train_batch_size=w.global_batch,
                   gradient_accumulation_steps=w.global_batch // (w.micro_batch * dp),
                   gradient_clipping=1.0, zero_optimization={"stage": w.zero_stage})
    else:
        notes.append("inference: DeepSpeed's config carries the micro-batch only; build the "
                     "model with the MoE arguments and tp of moe_layers.json")
    if w.dtype == "fp16":
        cfg["fp16"] = dict(FP16)
    elif w.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _min_capacities(plan: Plan) -> tuple[int, int]:
    """(the min capacity the plan's mode uses and is costed with, the model's other one)."""
    spec = plan.model
    if plan.workload.mode == "infer":
        return spec.eval_min_capacity, spec.min_capacity
    return spec.min_capacity, spec.eval_min_capacity


def _min_capacity(plan: Plan, notes: list[str]) -> int:
    """DeepSpeed's MoE layer has one min capacity for training and evaluation: the plan mode's,
    and a note where the model's other one differs."""
    value, other = _min_capacities(plan)
    infer = plan.workload.mode == "infer"
    if value != other:
        notes.append(f"min capacity: this engine has one for training and inference; "
                     f"{value} for this {plan.workload.mode} plan (the model's "
                     f"{'training' if infer else 'inference'} value is {other})")
    return value


def _gate_notes(plan: Plan, notes: list[str], rsample_flag: bool) -> None:
    spec = plan.model
    if spec.noisy_gate_policy == "rsample" and not rsample_flag:
        notes.append("the model samples its top-1 expert (RSample); this engine has no option "
                     "for it: it routes by argmax")


def _common_choices(plan: Plan, notes: list[str], one_ep: bool, coordinated: bool,
                    es_tp: bool) -> tuple[dict[int, LayerChoice], int | None]:
    """The closest per-layer degrees an engine takes: flat all-to-all; TP-coordinated or not as
    it routes; expert slicing only where it equals tp (`es_tp`); one ep for all layers where
    the engine has one flag (`one_ep`: the most common of the plan's ep that divides every
    layer's experts and the world)."""
    layers, tp, N = _moe_layers(plan), plan.parallel.tp, plan.cluster.gpus
    if not layers:
        return {}, None
    if any(layer.a2a == "hierarchical" for layer in layers):
        notes.append("hierarchical all-to-all is not an option of this engine; it exchanges "
                      "flat (costed so below)")
    ep = None
    if one_ep:
        counts = Counter(layer.ep for layer in layers)
        fits = [e for e, _ in counts.most_common()
                if all(layer.experts % e == 0 for layer in layers) and N % e == 0]
        ep = fits[0] if fits else 1
        if len(counts) > 1 or ep not in counts:
            notes.append(f"one expert-parallel degree for every layer: ep={ep} (the plan has "
                         f"{', '.join(f'ep={e}' for e in sorted(counts))} per layer)")
    out, unsliced = {}, []
    for layer in layers:
        e = ep if ep is not None else layer.ep
        es = layer.es if e == layer.experts else 1
        if es > 1 and not (es_tp and es == tp):
            unsliced.append(layer.index)
            es = 1
        if N % (e * es):
            raise ConfigError(f"layer {layer.index}: ep={e} × es={es} does not divide "
                              f"{N} GPUs; no configuration of this engine is close")
        out[layer.index - 1] = LayerChoice(ep=e, es=es, a2a="flat",
                                           coordinated=coordinated and tp > 1)
    if unsliced:
        notes.append(f"expert slicing (es > 1) in layers {describe_layers(unsliced)} is not "
                     f"expressible here (experts slice only over the tp={tp} group): es=1")
    if tp > 1 and any(bool(layer.a2a_tp_coordinated) != coordinated for layer in layers):
        notes.append("TP-coordinated routing: this engine " + (
            "always routes tokens that tp ranks share once" if coordinated
            else "routes every tp rank's tokens again") + "; costed so")
    return out, ep


def to_deepspeed(plan: Plan) -> Export:
    notes: list[str] = []
    spec = plan.model
    choices, _ = _common_choices(plan, notes, one_ep=False, coordinated=True, es_tp=True)
    _gate_notes(plan, notes, rsample_flag=True)
    min_capacity = _min_capacity(plan, notes)
    layers = []
    for layer in _moe_layers(plan):
        c = choices[layer.index - 1]
        layers.append({"layer": layer.index, "num_experts": layer.experts, "ep_size": c.ep,
                       "k": spec.top_k, "capacity_factor": spec.capacity_factor,
                       "eval_capacity_factor": spec.eval_capacity_factor,
                       "min_capacity": min_capacity, "use_residual": spec.residual,
                       "noisy_gate_policy": "RSample" if spec.noisy_gate_policy == "rsample"
                       else None, "drop_tokens": spec.drop_tokens, "use_rts": spec.use_rts,
                       "enable_expert_tensor_parallelism": c.es > 1,
                       "top2_2nd_expert_sampling": spec.second_expert_sampling})
    if spec.shared_ffn_hidden:
        notes.append("shared experts: DeepSpeed's nearest is use_residual (one residual MLP "
                     "with a learned mix); moe_layers.json gives their width apart")
    if plan.teacher is not None:
        notes.append("Mixture-of-Students: DeepSpeed has no distillation of its own; use "
                     "--to megatron-deepspeed (its --mos --kd)")
    files = {"ds_config.json": json.dumps(_ds_config(plan, notes), indent=2) + "\n",
             "moe_layers.json": json.dumps({
                 "expert": {"mlp": spec.mlp, "ffn_hidden": spec.expert_ffn, "bias": spec.bias,
                            "note": "the module each MoE layer replicates (MoE's `expert`)"},
                 "shared_ffn_hidden": spec.shared_ffn_hidden,
                 "tensor_parallel_size": plan.parallel.tp,
                 "data_parallel_size": plan.parallel.dp,
                 "activation_checkpointing": plan.parallel.activation_checkpointing,
                 "layers": layers}, indent=2) + "\n"}
    return Export("deepspeed", files, notes, choices, plan.parallel.tp)


def _interval(plan: Plan) -> int | None:
    """Megatron-DeepSpeed's --expert-interval k when the MoE layers are exactly the 1-based
    layers divisible by k, else None."""
    moe = [i + 1 for i, E in enumerate(plan.model.experts) if E]
    for k in range(1, plan.model.num_layers + 1):
        if moe == [n for n in range(1, plan.model.num_layers + 1) if n % k == 0]:
            return k
    return None


def _model_args(plan: Plan) -> list[str]:
    spec, w, par = plan.model, plan.workload, plan.parallel
    args = ["--num-layers", str(spec.num_layers), "--hidden-size", str(spec.hidden),
            "--ffn-hidden-size", str(spec.ffn_hidden), "--num-attention-heads", str(spec.heads),
            "--seq-length", str(w.seq_len), "--max-position-embeddings", str(spec.max_seq_len),
            "--micro-batch-size", str(w.micro_batch), "--global-batch-size",
            str(w.global_batch), "--tensor-model-parallel-size", str(par.tp),
            "--pipeline-model-parallel-size", "1"]
    if w.dtype in ("fp16", "bf16"):
        args.append(f"--{w.dtype}")
    return args


# how each Megatron spells today's blocks (read from their parsers: engine_flags in the tests)
BLOCK_FLAGS = {
    "megatron-deepspeed": {"rmsnorm": ["--normalization", "rmsnorm"],
                           "rope": ["--use-rotary-position-embeddings", "--no-position-embedding"],
                           "kv": ["--num-key-value-heads"]},
    "megatron-core": {"rmsnorm": ["--normalization", "RMSNorm"],
                      "rope": ["--position-embedding-type", "rope"],
                      "kv": ["--group-query-attention", "--num-query-groups"]},
}


def _block_args(spec, engine: str) -> list[str]:
    """The flags both Megatrons have for today's blocks, in the engine's spelling."""
    flags = BLOCK_FLAGS[engine]
    args = ["--swiglu"] if spec.mlp == "swiglu" else []
    if spec.norm == "rmsnorm":
        args += flags["rmsnorm"]
    if spec.positions == "rope":
        args += flags["rope"]
    if spec.kv_heads not in (None, spec.heads):
        args += [*flags["kv"], str(spec.kv_heads)]
    if not spec.bias:
        args.append("--disable-bias-linear")
    if not spec.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    return args


def _megatron_ds_blocks(spec, notes: list[str]) -> list[str]:
    """Megatron-DeepSpeed's flags for today's blocks, and what it has none for."""
    for what, missing in (("experts of their own width", spec.expert_ffn != spec.ffn_hidden),
                          ("shared experts", spec.shared_ffn_hidden > 0),
                          ("latent attention (MLA)", spec.latent_attention is not None),
                          ("query/key norms", spec.qk_norm != "none"),
                          ("a head width apart from hidden / heads",
                           spec.head_dim not in (None, spec.hidden // spec.heads))):
        if missing:
            notes.append(f"{what}: Megatron-DeepSpeed has no option for them; the arguments "
                         "describe the nearest GPT blocks")
    return _block_args(spec, "megatron-deepspeed")


def _megatron_core_blocks(spec) -> list[str]:
    """Megatron-Core's flags for today's blocks."""
    args = _block_args(spec, "megatron-core")
    if spec.head_dim not in (None, spec.hidden // spec.heads):
        args += ["--kv-channels", str(spec.head_dim)]
    if not spec.bias and spec.qkv_bias:
        args.append("--add-qkv-bias")
    if spec.qk_norm != "none":
        args.append("--qk-layernorm")
    m = spec.latent_attention
    if m is not None:
        args += ["--multi-latent-attention", "--kv-lora-rank", str(m.kv_lora_rank),
                 "--qk-head-dim", str(m.qk_nope_head_dim), "--qk-pos-emb-head-dim",
                 str(m.qk_rope_head_dim), "--v-head-dim", str(m.v_head_dim)]
        if m.q_lora_rank:
            args += ["--q-lora-rank", str(m.q_lora_rank)]
    return args


def to_megatron_deepspeed(plan: Plan) -> Export:
    notes: list[str] = []
    spec, w = plan.model, plan.workload
    choices, ep = _common_choices(plan, notes, one_ep=True, coordinated=True, es_tp=True)
    _gate_notes(plan, notes, rsample_flag=False)
    args = _model_args(plan) + _megatron_ds_blocks(spec, notes) + [
        "--no-pipeline-parallel", "--zero-stage", str(w.zero_stage), "--deepspeed",
        "--deepspeed_config", "ds_config.json"]
    if plan.parallel.activation_checkpointing:
        args += ["--checkpoint-activations", "--deepspeed-activation-checkpointing"]
    moe = _moe_layers(plan)
    if moe:
        k = _interval(plan)
        if k is None:
            raise ConfigError("Megatron-DeepSpeed places MoE layers at every k-th layer; this "
                              "model's are elsewhere: no configuration of it is close")
        args += ["--num-experts", *[str(layer.experts) for layer in moe],
                 "--expert-interval", str(k), "--moe-expert-parallel-size", str(ep),
                 "--mlp-type", "residual" if spec.residual else "standard",
                 "--topk", str(spec.top_k),
                 "--moe-train-capacity-factor", repr(spec.capacity_factor),
                 "--moe-eval-capacity-factor", repr(spec.eval_capacity_factor),
                 "--moe-min-capacity", str(_min_capacity(plan, notes)),
                 "--moe-loss-coeff", repr(spec.aux_loss_coef)]
        if not spec.drop_tokens:
            args.append("--disable-moe-token-dropping")
        if w.zero_stage >= 1:
            args.append("--create-moe-param-group")  # DeepSpeed's ZeRO 1/2 assert a MoE group
        if any(c.es > 1 for c in choices.values()):
            args.append("--enable-expert-tensor-parallelism")
        if spec.top_k == 2 and not spec.second_expert_sampling:
            args.append("--disable-moe-top2-2nd-expert-sampling")
        if not spec.use_rts:
            notes.append("random token selection off: Megatron-DeepSpeed does not pass use_rts "
                         "(DeepSpeed's default, on)")
    if plan.teacher is not None and w.mode == "train":
        t, kd = plan.teacher.model, spec.distillation
        args += ["--mos", "--kd", "--kd-temp", repr(kd.temperature), "--kd-beta-ce",
                 repr(kd.alpha), "--num-layers-teacher", str(t.num_layers),
                 "--hidden-size-teacher", str(t.hidden), "--num-attention-heads-teacher",
                 str(t.heads), "--num-experts-teacher",
                 *[str(E) for E in t.experts if E], "--load-teacher", "TEACHER_CHECKPOINT"]
        notes.append("Megatron-DeepSpeed's KD divides the KL term by the sequence length and "
                     "never stops it (no staged KD); --load-teacher is left for you to fill")
    files = {"args.txt": "\n".join(args) + "\n",
             "ds_config.json": json.dumps(_ds_config(plan, notes), indent=2) + "\n"}
    return Export("megatron-deepspeed", files, notes, choices, plan.parallel.tp)


def to_megatron_core(plan: Plan) -> Export:
    notes: list[str] = []
    spec, w, tp = plan.model, plan.workload, plan.parallel.tp
    choices, ep = _common_choices(plan, notes, one_ep=True, coordinated=True, es_tp=False)
    _gate_notes(plan, notes, rsample_flag=False)
    args = _model_args(plan) + _megatron_core_blocks(spec)
    if plan.parallel.activation_checkpointing:
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]
    if w.zero_stage >= 1:
        args.append("--use-distributed-optimizer")
        if w.zero_stage == 2:
            notes.append("ZeRO 2: Megatron's distributed optimizer partitions optimizer states "
                         "and reduce-scatters gradients (ZeRO 1 memory for gradients)")
    moe = _moe_layers(plan)
    if moe:
        counts = sorted({layer.experts for layer in moe})
        E = counts[-1]
        if len(counts) > 1:
            notes.append(f"one expert count for every MoE layer: {E} (the plan's pyramid has "
                         f"{'/'.join(map(str, counts))}); costed with the plan's own")
        pattern = [1 if e else 0 for e in spec.experts]
        args += ["--num-experts", str(E), "--expert-model-parallel-size", str(ep),
                 "--expert-tensor-parallel-size", "1",
                 "--moe-layer-freq", "[" + ",".join(map(str, pattern)) + "]",
                 "--moe-router-topk", str(spec.top_k),
                 "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm",
                 "--moe-router-load-balancing-type", "aux_loss",
                 "--moe-aux-loss-coeff", repr(spec.aux_loss_coef)]
        if spec.top_k == 1:
            args.append("--moe-router-pre-softmax")  # Megatron-Core requires it at top-1
        if spec.drop_tokens:
            args += ["--moe-expert-capacity-factor", repr(spec.capacity_factor),
                     "--moe-pad-expert-input-to-capacity", "--moe-token-drop-policy",
                     "position"]
            if spec.use_rts and spec.top_k == 1:
                notes.append("random token selection: Megatron-Core drops by position or "
                             "probability, never at random; by position here")
            min_capacity = _min_capacities(plan)[0]
            if min_capacity > 1:
                notes.append(f"min capacity {min_capacity}: Megatron-Core has none")
        # always explicit: unset, Megatron-Core warns and falls back to --ffn-hidden-size
        args += ["--moe-ffn-hidden-size", str(spec.expert_ffn)]
        if spec.shared_ffn_hidden:
            args += ["--moe-shared-expert-intermediate-size", str(spec.shared_ffn_hidden)]
            if spec.shared_gate:
                args.append("--moe-shared-expert-gate")
        if spec.residual:
            args += ["--moe-shared-expert-intermediate-size", str(spec.ffn_hidden)]
            notes.append("residual MoE: Megatron-Core's nearest is a shared expert of the same "
                         "size, added without the learned mix coefficients")
        if tp > 1 and ep > 1:
            args.append("--sequence-parallel")  # an error without it in Megatron-Core 0.12-0.14
            notes.append("tp > 1 with ep > 1: Megatron-Core wants --sequence-parallel, which "
                         "the plan does not cost")
    if plan.teacher is not None:
        notes.append("Mixture-of-Students: Megatron-Core has no distillation in pretrain_gpt")
    return Export("megatron-core", {"args.txt": "\n".join(args) + "\n"}, notes, choices, tp,
                  runtime="moerun")


def export(plan: Plan, engine: str, runtime: str | None = None) -> Export:
    """The plan as `engine` takes it; a DeepSpeed engine's closest configuration costed with
    `runtime`'s kernels (default `DEEPSPEED_EXPORT_RUNTIME`: the DeepSpeed pip installs today)."""
    if engine not in ENGINES:
        raise ConfigError(f"--to {engine}: expected one of {', '.join(ENGINES)}")
    if runtime is not None and engine == "megatron-core":
        raise ConfigError("--runtime applies to --to deepspeed or megatron-deepspeed "
                          "(Megatron-Core's MoE is costed with moerun's kernels)")
    if runtime not in (None, *DEEPSPEED_RUNTIMES):
        raise ConfigError(f"--runtime {runtime}: expected one of {', '.join(DEEPSPEED_RUNTIMES)}")
    ex = {"deepspeed": to_deepspeed, "megatron-deepspeed": to_megatron_deepspeed,
          "megatron-core": to_megatron_core}[engine](plan)
    if engine != "megatron-core":
        ex.runtime = runtime or DEEPSPEED_EXPORT_RUNTIME
    return ex


def plan_cluster(plan: Plan, profile: ClusterProfile | None) -> ClusterProfile | None:
    """The profile the plan was made with: `profile` when its digest matches, else a built-in
    one of the plan's name and digest; None when neither."""
    candidates = [profile] if profile is not None else []
    try:
        candidates.append(load_cluster(plan.cluster.name))
    except MoeplanError:
        pass
    for c in candidates:
        if digest(c) == plan.cluster.profile_digest:
            return c
    return None


def closest(plan: Plan, ex: Export, cluster: ClusterProfile) -> Plan:
    """The exported configuration costed by the search's model (`ex.runtime`'s kernels)."""
    w = plan.workload
    r = Request(gpus=plan.cluster.gpus, mode=w.mode, global_batch=w.global_batch,
                micro_batch=w.micro_batch if w.mode == "train" else None,
                seq_len=w.seq_len if w.mode == "train" else None,
                prompt_len=w.prompt_len, gen_len=w.gen_len, dtype=w.dtype,
                zero_stage=w.zero_stage, simulate_top=0, runtime=ex.runtime)
    return fixed_plan(plan.model, cluster, r, ex.tp, ex.choices,
                      micro_batch=w.micro_batch if w.mode == "train" else None,
                      recompute=plan.parallel.activation_checkpointing)
