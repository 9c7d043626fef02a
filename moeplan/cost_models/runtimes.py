"""What each runtime launches per layer phase: moerun's torch reference (CPU), moerun on CUDA
(Triton gating / dispatch / combine, grouped expert GEMMs), and DeepSpeed-MoE. The cost model
charges each operation the device's per-operation overhead (`layer.fixed_s`) where the profile
has not measured the framework itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.spec.phases import Phase

# Framework operations per layer (forward, backward) of moeplan's runtime, each paying the
# device's per-operation overhead. CPU (the torch reference): aten ops, views excluded, counted
# with a TorchDispatchMode over tiny-pr-moe, torch 2.13 (tests/test_cost_models.py recounts them);
# experts: 1 + 3·L forward and 5 + 7·L backward for L local experts (a loop).
RUNTIME_OPS = {Phase.ATTENTION: (8, 18), Phase.MLP: (6, 8), "residual_mlp": (11, 19),
               Phase.GATE: (31, 31), Phase.DISPATCH: (8, 2), Phase.COMBINE: (5, 5),
               Phase.HEAD: (12, 11)}
# CUDA (Triton gating / dispatch / combine, one grouped expert GEMM pair): kernel launches and
# torch ops around them, counted by reading runtime/kernels/triton_moe.py (not traced on a GPU);
# the gate's forward: the layer norm, the router GEMM and its two casts to fp32 (CUDA_GATE_AROUND)
# and the Triton gate — 2 launches + 30 torch ops for any top-k > 1 with renormalised weights,
# CUDA_RENORM_OPS fewer without, recounted by tests/test_kernels.py with each kernel stubbed to
# count its launch. The other phases launch one kernel per aten op, as on CPU.
CUDA_GATE_AROUND = 4
CUDA_OPS = {**RUNTIME_OPS, Phase.GATE: (CUDA_GATE_AROUND + 32, 24), Phase.DISPATCH: (7, 2),
            Phase.COMBINE: (8, 11), Phase.EXPERTS: (4, 8)}
CUDA_RENORM_OPS = 3  # sum, clamp, div
# CUDA inference (no autograd): around the gate as in training, then the gate's buffers, one
# Triton launch for the whole routing table and the device-side counts (CUDA_RENORM_OPS more for
# renormalised top-k > 1); dispatch and combine each a launch and their index tensors; the
# experts' grouped GEMMs that skip empty experts, with the device flag (GATED_EXPERTS_INFER more
# for gated experts: a third GEMM's buffer and launch, silu, product). Torch ops plus launches,
# recounted the same way by tests/test_kernels.py; not traced on a GPU.
CUDA_INFER_OPS = {Phase.GATE: CUDA_GATE_AROUND + 12, Phase.DISPATCH: 6, Phase.COMBINE: 6,
                  Phase.EXPERTS: 8}
GATED_EXPERTS_INFER = 4
# DeepSpeed-MoE (deepspeed/moe/sharded_moe.py, experts.py at 38327e0 = v0.16.4; Megatron-
# DeepSpeed's ParallelMLP as the expert): GPU kernels per MoE layer phase (forward, backward),
# counted by running DeepSpeed's layer on CPU ranks (bench/count_deepspeed_moe_ops.py,
# bench/results/deepspeed-moe-ops.json; bf16 tokens, fp32 gate, top-1 with random token
# selection) as a GPU would launch them: the capacity's host scalars and F.one_hot's CPU-only
# class checks left out. Gate forward 33 (28 without random token selection: inference, where
# DeepSpeed-MoE turns it off), backward 12; dispatch a cast and the einsum's bmm, backward the
# bmm; combine 4 and 4 (a cast, the bmm, copies) — dispatch and combine as counted
# expert-parallel over 2 ranks (the all-to-alls copy nothing: their inputs are contiguous); the
# experts (`operations`) a cat around each local expert's kernels.
DEEPSPEED_OPS = {**CUDA_OPS, Phase.GATE: (33, 12), Phase.DISPATCH: (2, 1), Phase.COMBINE: (4, 4)}
# DeepSpeed from v0.19.4 (`--runtime deepspeed-sparse`) routes by index (sharded_moe.py
# `_sparse_encode` / `_sparse_decode`, always on): its gate returns each token's expert, slot
# and weight instead of [S, E, C] combine weights; dispatch scatters each slot's source token
# and gathers the padded tokens once, combine gathers the rows back, weighs them in fp32 and
# sums the routes. Counted the same way over v0.19.8 (deepspeed-moe-ops-0.19.8.json): gate 34
# and 10, dispatch 13 and 2, combine 6 and 7; the experts' loop as in v0.16.4. No device sync:
# the capacity is a host scalar.
DEEPSPEED_SPARSE_OPS = {**DEEPSPEED_OPS, Phase.GATE: (34, 10), Phase.DISPATCH: (13, 2),
                        Phase.COMBINE: (6, 7)}
# Beyond top-1, counted the same way (`by_top_k`, 4 local experts): the gate (forward, backward)
# at top-2 — its second expert sampled, DeepSpeed's default, in inference too — and at top-k > 2
# (`topkgating`, k = 4 counted); index dispatch makes one more operation for k > 1.
DEEPSPEED_GATE_TOPK = {"deepspeed": {2: (67, 48), 4: (33, 25)},
                       "deepspeed-sparse": {2: (66, 40), 4: (38, 25)}}


def counted_top_k(k: int) -> int:
    """The top-k at which DeepSpeed's gate for top-`k` was counted: its top1gating, top2gating,
    or topkgating (every k > 2, counted at 4)."""
    return k if k <= 2 else 4


DEEPSPEED_SPARSE_DISPATCH_TOPK = 14
DEEPSPEED_RUNTIMES = ("deepspeed", "deepspeed-sparse")
RUNTIMES = ("moerun", *DEEPSPEED_RUNTIMES)  # `planning.Runtime`'s values, for the CLI's choices
RUNTIME_HELP = ("Whose kernels, launches and loops are costed: moerun's; deepspeed: DeepSpeed-"
                "MoE as the paper and DeepSpeed up to 0.19.3 run it (per-expert loop, one-hot "
                "einsum dispatch/combine); deepspeed-sparse: DeepSpeed 0.19.4 and later (index "
                "dispatch/combine).")


def is_deepspeed(runtime: str) -> bool:
    """Whether the runtime is DeepSpeed's (either MoE dispatch): its engine, its optimizers and
    Megatron's blocks."""
    return runtime in DEEPSPEED_RUNTIMES


def a2a_algorithms(runtime: str, mode: str) -> tuple[str, ...]:
    """The all-to-all algorithms a runtime has. DeepSpeed's code exchanges flat, one
    all_to_all_single over the expert-parallel group, in training (sharded_moe.py's _AllToAll)
    and in its inference MoE (moe_inference.py), in 0.16.4 and 0.19.8 alike; the paper's
    inference system adds the hierarchical one (DeepSpeed-MoE §5, with which its inference
    latencies were measured), so `deepspeed` offers it for inference."""
    if runtime == "moerun" or (runtime == "deepspeed" and mode == "infer"):
        return ("flat", "hierarchical")
    return ("flat",)


def coordination(runtime: str, tp: int) -> tuple[bool, ...]:
    """Whether tokens the tp ranks share are routed once (TP-coordinated) or by every rank:
    DeepSpeed drops the duplicates before its all-to-all whenever tp > 1 (sharded_moe.py
    `drop_tokens`, 0.16.4 and 0.19.8; the paper's inference likewise, §5); moerun does either."""
    if tp == 1:
        return (False,)
    return (True,) if is_deepspeed(runtime) else (False, True)


def slices_experts(runtime: str, mode: str, es: int, tp: int) -> bool:
    """Whether a runtime can slice experts `es` ways: DeepSpeed's training only over the tensor-
    slicing group (MoE's enable_expert_tensor_parallelism: es = tp); its inference and moerun
    over any group of consecutive ranks."""
    return es == 1 or not (is_deepspeed(runtime) and mode == "train") or es == tp


# Per local expert, as counted over DeepSpeed's Experts on the input an all-to-all over 2 ranks
# leaves, 5 forward (the chunk's copy, GEMM, bias add, GELU, GEMM with bias) and 8 backward
# (the copy, 4 GEMMs, 2 bias sums, GELU's), less what Megatron's expert does not launch: its
# bias and GELU are one fused kernel, and DeepSpeed drops its second bias (experts.py: "Ignore
# the bias term for now"). Plus the cat of the experts' outputs (its backward: the gradients'
# cat of the chunks).
DEEPSPEED_EXPERT_OPS, DEEPSPEED_EXPERTS_FIXED = (5 - 1, 8 - 1), (1, 1)
DEEPSPEED_RTS_OPS = 5  # random token selection: rand, sub, mul, add, mul (not in inference)
# DeepSpeed 0.5–0.13 (the paper's era) copies the gate's expert counts `.to('cpu')` on every
# call (v0.6.0 sharded_moe.py:204), draining the launch queue: a PCIe round trip each (assumed
# 15 µs on A100 hosts, not measured here). Removed in 0.14.
DEEPSPEED_SYNCS, HOST_SYNC_S = 1, 15e-6


@dataclass(frozen=True)
class OptimizerCount:
    """A runtime's weight update on a GPU where the profile has not measured the framework: its
    gradient accumulation and reduction (their local copies; the collectives are
    `update.grad_sync_s`) and its optimizer step, as kernel launches per parameter tensor and
    bytes moved per parameter element. `work` maps (when, over) to (launches, bytes): when —
    "step" once a step, "reduce" at each gradient reduction (every micro-step under DeepSpeed's
    ZeRO-2), "micro" every micro-step, "accumulate" every micro-step after the first (autograd
    adding into the gradients there already); over — "local" every tensor and element the rank
    holds, "share" those it steps (about 1/dp of them under ZeRO or DeepSpeed's BF16 optimizer).
    `inner` is the wrapped optimizer's own update over the share (kept apart: DeepSpeed's fused
    Adam, torch's foreach AdamW); `chunk` its multi-tensor launches per element of the share
    (one per 320 chunks of 65,536 elements); `tensor_syncs` host reads per share tensor,
    `step_syncs` once a step. A few launches per flat bucket or parameter group are not
    charged."""
    work: dict[tuple[str, str], tuple[float, float]]
    inner: tuple[float, float] = (0.0, 28.0)
    chunk: float = 1 / (65536 * 320)
    tensor_syncs: float = 0.0
    step_syncs: float = 0.0


# moerun (fp32 gradients under autocast): clipping per tensor (`runtime/optim.py`: square, sum,
# fp64 cast, divide, add: 5 launches, 12 bytes), then torch's AdamW, which on CUDA takes its
# foreach path (torch 2.13 `_multi_tensor_adam`, decoupled decay): decay mul, lerp, mul,
# addcmul, sqrt, div, add, addcdiv over fp32 lists, 80 bytes an element; each op launches one
# kernel per 110 / 64 / 48 tensors of its 1 / 2 / 3 lists (96 / 48 with a scalar list) and per
# 320 chunks of 65,536 elements (ATen MultiTensorApply.cuh): 0.11 launches a tensor. Under
# ZeRO 1/2 a rank clips and steps only its piece. Micro-steps accumulate in autograd (an add a
# tensor, 12 bytes). Its reduction: ZeRO 0 (`parallel.GradSync`) concatenates each bucket (8)
# and scales it (8), the gradients then views of it; ZeRO 1/2 (`optim.Partitioned.reduce`)
# zero-fills a bucket (4), copies each gradient in (a launch, 8) and scales its piece (8),
# ZeRO 1 cloning the piece out of the allreduced bucket first (8).
_MOERUN = {("step", "share"): (5, 12), ("accumulate", "local"): (1, 12)}
MOERUN_GPU_OPTIMIZER = {
    0: OptimizerCount({**_MOERUN, ("reduce", "local"): (0, 16)},
                      inner=(0.11, 80), chunk=8 / (65536 * 320)),
    1: OptimizerCount({**_MOERUN, ("reduce", "local"): (1, 12), ("reduce", "share"): (0, 16)},
                      inner=(0.11, 80), chunk=8 / (65536 * 320)),
    2: OptimizerCount({**_MOERUN, ("reduce", "local"): (1, 12), ("reduce", "share"): (0, 8)},
                      inner=(0.11, 80), chunk=8 / (65536 * 320))}
# DeepSpeed v0.16.4, read off its code and checked by running it (DS_ACCELERATOR=cpu, 1 and 2
# gloo ranks: bench/count_deepspeed_optimizer.py, bench/results/deepspeed-optimizer-counts.json;
# fp16 needs a GPU, so its counts are read only). Its fused Adam (the inner update) is 28 bytes
# an element, one multi-tensor launch per 36 tensors of its 4 lists (csrc/adam/
# multi_tensor_apply.cuh) or per chunks of a flat partition. Without ZeRO, gradients are reduced
# by `engine.allreduce_bucket`: a bucket flattened (a copy, unless it is one flat tensor
# already), cast to the communication dtype (the 16-bit one under fp16/bf16), scaled by 1/dp
# after the allreduce, copied back (a launch per gradient tensor).
# fp16 ZeRO 0 (runtime/fp16/fused_optimizer.py, FP16_Optimizer.step, alike in v0.5 of the
# paper's time): per tensor an overflow check (an fp32 copy and its sum read on the host: 2
# launches, 1 sync), the gradient's fp32 copy into the flat buffer and the update copied back
# into the fp16 weight (1 launch each); per element 42 bytes besides Adam: check 10, fp32 copy 6,
# flatten 8, norm 4, unscale 8, copy back 6; the reduction's flatten 4, scaling 4, copy back 4;
# micro-steps accumulate in autograd (6).
DEEPSPEED_FP16_OPTIMIZER = OptimizerCount(
    {("step", "share"): (4, 42), ("reduce", "local"): (1, 12), ("accumulate", "local"): (1, 6)},
    tensor_syncs=1)
# bf16 ZeRO 0 runs DeepSpeed's BF16_Optimizer (engine._do_optimizer_sanity_check: bf16 without
# ZeRO accumulates gradients in fp32): after every backward each bf16 gradient is cast and added
# into a flat fp32 buffer (2 launches a tensor, 18 bytes an element); the fp32 master weights
# and Adam's moments are partitioned over the data-parallel group (`memory.train_state`). The
# reduction: the flat fp32 gradients cast to bf16 (6), scaled (4), copied back (6). At the
# step: per tensor a norm of its fp32 gradient (norm, pow, copy, add: 4 launches, 4 bytes) and
# the flat gradients zeroed (4); over the rank's partition Adam and the copy into the bf16
# weights (6), then the bf16 weights all-gathered; two host reads a step (the norm's
# positivity assert and the clipping test). Charged without clipping (a step whose norm
# exceeds the limit adds a launch and 8 bytes a tensor).
DEEPSPEED_BF16_OPTIMIZER = OptimizerCount(
    {("micro", "local"): (2, 18), ("reduce", "local"): (0, 16), ("step", "local"): (4, 8),
     ("step", "share"): (0, 6)}, step_syncs=2)
# fp32 ZeRO 0: the bare fused Adam after the engine's `clip_grad_norm_` (runtime/utils.py): per
# tensor a norm and the clipping multiply (unconditional: the coefficient is clamped on the
# device), 12 bytes; the reduction's flatten 8, scaling 8, copy back 8; micro-steps accumulate
# in autograd (12).
DEEPSPEED_FP32_OPTIMIZER = OptimizerCount(
    {("step", "share"): (2, 12), ("reduce", "local"): (1, 24), ("accumulate", "local"): (1, 12)},
    inner=(1 / 36, 28))
# ZeRO 1/2 (runtime/zero/stage_1_and_2.py), over the rank's partition: per tensor a norm (fp64
# copy, vector norm: 2 launches, 18 bytes an element), then the flat partition's fp32 copy 10,
# unscale 8 and the copy back into the 16-bit partition 6; with fp16 first an overflow check per
# tensor (fp32 copy, isnan, isinf, or, cast, max, sum: 7 launches, 28 bytes), read on the host
# once a step. The reduction (contiguous gradients and one allreduce for all ranks' buckets,
# the defaults): each gradient copied into the bucket buffer (a launch, 4 bytes), the bucket
# scaled by 1/dp (4) and flattened (4), then the rank's slices copied back (4) and each of its
# partition's gradients into the partition's buffer (a launch, 4). Micro-steps accumulate in
# autograd: under ZeRO 1 every gradient (a launch, 6), under ZeRO 2 only the partition's (the
# others are released after each reduction). fp32 is charged as bf16. The paper's v0.5 read
# each tensor's norm and overflow on the host instead (not modelled).
_ZERO = {("reduce", "local"): (1, 12), ("reduce", "share"): (1, 8)}
_ZERO_STEP = {"fp16": {("step", "share"): (9, 70)}, "bf16": {("step", "share"): (2, 42)}}
_ZERO_ACCUMULATE = {1: {("accumulate", "local"): (1, 6)}, 2: {("accumulate", "share"): (1, 6)}}
DEEPSPEED_ZERO_OPTIMIZER = {
    (stage, dtype): OptimizerCount({**_ZERO, **_ZERO_STEP[dtype], **_ZERO_ACCUMULATE[stage]},
                                   step_syncs=1 if dtype == "fp16" else 0)
    for stage in (1, 2) for dtype in ("fp16", "bf16")}


# DeepSpeed v0.19.8 (`--runtime deepspeed-sparse`), counted the same way
# (deepspeed-optimizer-counts-0.19.8.json): bf16 without ZeRO is no longer the BF16 optimizer but
# its FP16_Optimizer in bf16 (engine._do_optimizer_sanity_check: DDP_BFLOAT16), unpartitioned,
# whose reduction and accumulation match v0.16.4's fp16 ones; at the step per tensor a norm, an
# inf/nan check (abs, eq, ne, amax, amin, logical ops) read on the host (a sync a tensor, one
# more a step), the fp32 copy and the update copied back: 19 launches, 34 bytes. ZeRO 1/2 reduce
# and accumulate as v0.16.4 but check each partition tensor at the step too: 15 launches and
# 46 bytes, three host syncs a step. fp16 (needs a GPU) and fp32 as v0.16.4.
DEEPSPEED_SPARSE_BF16_OPTIMIZER = OptimizerCount(
    {("step", "share"): (19, 34), ("reduce", "local"): (1, 12), ("accumulate", "local"): (1, 6)},
    tensor_syncs=1, step_syncs=1)
DEEPSPEED_SPARSE_ZERO_OPTIMIZER = {
    stage: OptimizerCount({**_ZERO, ("step", "share"): (15, 46), **_ZERO_ACCUMULATE[stage]},
                          step_syncs=3)
    for stage in (1, 2)}


def gpu_optimizer(runtime: str, zero_stage: int, dtype: str) -> OptimizerCount:
    """The counted GPU weight update of this runtime and setting."""
    if runtime == "moerun":
        return MOERUN_GPU_OPTIMIZER[zero_stage]
    if runtime == "deepspeed-sparse" and dtype == "bf16":
        return (DEEPSPEED_SPARSE_ZERO_OPTIMIZER[zero_stage] if zero_stage >= 1
                else DEEPSPEED_SPARSE_BF16_OPTIMIZER)
    if zero_stage >= 1:
        return DEEPSPEED_ZERO_OPTIMIZER[zero_stage, "fp16" if dtype == "fp16" else "bf16"]
    return {"fp16": DEEPSPEED_FP16_OPTIMIZER, "bf16": DEEPSPEED_BF16_OPTIMIZER}.get(
        dtype, DEEPSPEED_FP32_OPTIMIZER)


def optimizer_work(count: OptimizerCount, local: float, share: float, tensors: float,
                   mine: float, micro_steps: int, reductions: int) -> tuple[float, float]:
    """(kernel launches, bytes moved) of one step's weight update for a rank holding `local`
    elements in `tensors` tensors and stepping `share` elements in `mine` tensors."""
    times = {"step": 1, "reduce": reductions, "micro": micro_steps,
             "accumulate": micro_steps - 1}
    over = {"local": (tensors, local), "share": (mine, share)}
    launches = (count.inner[0] * mine + count.chunk * share)
    nbytes = count.inner[1] * share
    for (when, which), (per_tensor, per_element) in count.work.items():
        n_tensors, n_elements = over[which]
        launches += times[when] * per_tensor * n_tensors
        nbytes += times[when] * per_element * n_elements
    return launches, nbytes


# moerun's training gate noise (`gating.draw_noise`), forward ops counted like RUNTIME_OPS:
# random token selection (top-1) 9, a Gumbel draw (top-1 RSample, top-2's second expert) 8; no
# backward. With either, a CUDA training gate runs the torch reference instead of Triton.
RTS_OPS, GUMBEL_OPS = 9, 8


def gate_noise_ops(spec) -> int:
    """Forward operations a moerun training gate adds for the spec's random options."""
    rts = spec.use_rts and spec.top_k == 1
    gumbel = ((spec.noisy_gate_policy == "rsample")
              or (spec.second_expert_sampling and spec.top_k == 2))
    return RTS_OPS * rts + GUMBEL_OPS * gumbel


# What today's blocks add to (or take from) the counts above, which are DeepSpeed-MoE's blocks
# (LayerNorm, learned positions, multi-head attention with biases, GELU MLP with biases, a
# PR-MoE residual MLP), per phase (forward, backward); counted like RUNTIME_OPS, views excluded,
# with torch 2.13 on CPU, and recounted over tiny models of each kind by tests/test_cost_models.py
# (a CUDA build may fuse RMSNorm into fewer kernels: not checked on a GPU). Grouped-query
# attention adds none: the fused attention serves each kv head's queries itself.
RMSNORM = (4, 13)  # nn.RMSNorm decomposes (pow, mean, add, rsqrt, mul, mul); LayerNorm is one op
ROPE = (11, 10)  # table rows for the positions; q and k each negated, joined, multiplied, summed
ROPE_HEAD = (-2, -2)  # no learned position embedding to look up and add
QK_NORM = {"head": (13, 28), "full": (12, 28)}
NO_PROJ_BIAS, NO_QKV_BIAS = (-1, -1), (0, -3)
LATENT = (27, 29)  # DeepSeek's latent attention (rotary, no bias) over the base's attention
LOW_RANK_QUERY = (6, 16)  # its q_lora_rank: a down projection and its norm
SWIGLU = (2, 6)  # the third matrix and the product
SHARED_NOT_RESIDUAL, SHARED_GATE = (-4, -12), (3, 7)  # no mix coefficients; sigmoid gate
UNTIED = (0, -1)
BLOCK_ADDS = (2, 0)  # a MoE layer's mlp phase without a residual or shared MLP
# moerun's torch gate (CPU, no noise) beyond top-1: the next choices' masked argmaxes and their
# slots, and renormalising the weights; dispatch and combine over k choices.
GATE_TOP2, GATE_TOPK, GATE_NEXT, GATE_RENORM = (13, 0), (17, 0), (14, 0), (3, 10)
# the experts as batched GEMMs (gated or bias-free: `kernels.ffn_grouped`) instead of the loop
GROUPED_EXPERTS = {(False, False): (3, 5), (True, True): (5, 13), (True, False): (5, 10)}


def _add(*terms: tuple[int, int]) -> tuple[int, int]:
    return sum(t[0] for t in terms), sum(t[1] for t in terms)


def block_delta(name: str, spec) -> tuple[int, int]:
    """Operations the spec's blocks add to a phase's DeepSpeed-MoE count (forward, backward);
    the gate phase holds a MoE layer's second norm."""
    rms = spec.norm == "rmsnorm"
    gated = spec.mlp == "swiglu"
    terms = []
    if name == Phase.ATTENTION:
        terms.append(RMSNORM if rms else (0, 0))
        if spec.latent_attention is not None:
            terms += [LATENT, LOW_RANK_QUERY if spec.latent_attention.q_lora_rank else (0, 0),
                      (1, 1) if spec.bias else (0, 0)]
        else:
            qkv_bias = spec.bias if spec.qkv_bias is None else spec.qkv_bias
            terms += [ROPE if spec.positions == "rope" else (0, 0),
                      QK_NORM.get(spec.qk_norm, (0, 0)),
                      (0, 0) if spec.bias else NO_PROJ_BIAS,
                      (0, 0) if qkv_bias else NO_QKV_BIAS]
    elif name == "residual_mlp" and not spec.residual and not spec.shared_ffn_hidden:
        # no MLP beside the experts: what is left of the phase is the block's residual adds
        base = RUNTIME_OPS["residual_mlp"]
        terms.append((BLOCK_ADDS[0] - base[0], BLOCK_ADDS[1] - base[1]))
    elif name in (Phase.MLP, "residual_mlp"):
        terms += [SWIGLU if gated else (0, 0), (0, 0) if spec.bias else (-1, -(2 + gated))]
        if name == Phase.MLP:
            terms.append(RMSNORM if rms else (0, 0))
        elif not spec.residual:
            terms += [SHARED_NOT_RESIDUAL, SHARED_GATE if spec.shared_gate else (0, 0)]
    elif name == Phase.GATE:
        # without a residual or shared MLP beside the experts, the norm's output has one user:
        # no gradient sum
        alone = not spec.residual and not spec.shared_ffn_hidden
        terms += [RMSNORM if rms else (0, 0), (0, -1) if alone else (0, 0)]
    elif name == Phase.HEAD:
        terms += [RMSNORM if rms else (0, 0), ROPE_HEAD if spec.positions == "rope" else (0, 0),
                  (0, 0) if spec.tied_embeddings else UNTIED]
    return _add(*terms)


def block_scale(name: str, spec, training: bool) -> float:
    """How many times the operations of DeepSpeed-MoE's block a phase of the spec's blocks
    launches: scales framework seconds measured on the profile's probe (DeepSpeed-style
    blocks) to the spec's."""
    base = RUNTIME_OPS.get(name)
    if base is None:
        return 1.0
    fwd, bwd = _add(base, block_delta(name, spec))
    return (fwd + bwd) / (base[0] + base[1]) if training else fwd / base[0]


def torch_moe_ops(name: str, spec, local_experts: int) -> tuple[int, int]:
    """moerun's torch reference (CPU) for a MoE phase (forward, backward), the spec's top-k,
    weights and expert FFN counted."""
    k = spec.top_k
    if name == Phase.EXPERTS:
        if spec.mlp == "swiglu" or not spec.bias:
            return GROUPED_EXPERTS[(spec.mlp == "swiglu", spec.bias)]
        return 1 + 3 * local_experts, 5 + 7 * local_experts
    fwd, bwd = RUNTIME_OPS[name]
    if name == Phase.GATE and k > 1:  # top-2 has a branch of its own; beyond, a loop
        return _add((fwd, bwd), GATE_TOP2 if k == 2 else GATE_TOPK, *[GATE_NEXT] * (k - 2),
                    GATE_RENORM if spec.renormalize_top_k else (0, 0))
    if name == Phase.DISPATCH and k > 1:
        return fwd + 1, bwd
    if name == Phase.COMBINE and k > 1:
        return (fwd + 2, bwd + 5) if k == 2 else (fwd + 1, bwd)
    return fwd, bwd


def operations(runtime: str, device_kind: str, name: str, training: bool,
               local_experts: int = 0, spec=None) -> float:
    """Operations one forward pass of a phase is charged: its forward count for inference; for
    training a third of forward + backward, since training charges compute phases three
    passes (see `step.train_layer`). `spec`: the model, whose gate options add to moerun's
    training gate."""
    noise = gate_noise_ops(spec) if (spec is not None and training and name == Phase.GATE
                                     and not is_deepspeed(runtime)) else 0
    blocks = block_delta(name, spec) if spec is not None else (0, 0)
    if noise:
        fwd, bwd = _add(torch_moe_ops(name, spec, local_experts), blocks)
        return (fwd + noise + bwd) / 3
    if is_deepspeed(runtime):
        if name == Phase.EXPERTS:
            fwd, bwd = (fixed + per * local_experts
                        for fixed, per in zip(DEEPSPEED_EXPERTS_FIXED, DEEPSPEED_EXPERT_OPS))
        else:
            fwd, bwd = (DEEPSPEED_OPS if runtime == "deepspeed" else DEEPSPEED_SPARSE_OPS)[name]
            k = spec.top_k if spec is not None else 1
            if name == Phase.GATE and k > 1:
                fwd, bwd = DEEPSPEED_GATE_TOPK[runtime][counted_top_k(k)]
            elif name == Phase.GATE and not training:
                fwd -= DEEPSPEED_RTS_OPS  # random token selection: top-1 training only
            if name == Phase.DISPATCH and k > 1 and runtime == "deepspeed-sparse":
                fwd = DEEPSPEED_SPARSE_DISPATCH_TOPK
    elif device_kind == "gpu":
        gated = spec is not None and spec.mlp == "swiglu"
        if not training and name in CUDA_INFER_OPS:
            renorm = spec is not None and spec.top_k > 1 and spec.renormalize_top_k
            return (CUDA_INFER_OPS[name] + blocks[0]
                    + (GATED_EXPERTS_INFER * gated if name == Phase.EXPERTS else 0)
                    + (CUDA_RENORM_OPS * renorm if name == Phase.GATE else 0))
        fwd, bwd = CUDA_OPS[name]
        if name == Phase.EXPERTS and spec is not None and (gated or not spec.bias):
            fwd, bwd = GROUPED_EXPERTS[(gated, spec.bias)]  # the same batched GEMMs as on CPU
        if name == Phase.GATE and spec is not None and not (spec.top_k > 1
                                                            and spec.renormalize_top_k):
            fwd -= CUDA_RENORM_OPS
    elif spec is not None and name in (Phase.GATE, Phase.DISPATCH, Phase.COMBINE,
                                       Phase.EXPERTS):
        fwd, bwd = torch_moe_ops(name, spec, local_experts)
    elif name == Phase.EXPERTS:
        fwd, bwd = 1 + 3 * local_experts, 5 + 7 * local_experts
    else:
        fwd, bwd = RUNTIME_OPS[name]
    fwd, bwd = _add((fwd, bwd), blocks)
    return (fwd + bwd) / 3 if training else fwd
