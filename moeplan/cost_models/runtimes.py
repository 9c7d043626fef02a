"""What each runtime launches per layer phase: moerun's torch reference (CPU), moerun on CUDA
(Triton gating / dispatch / combine, grouped expert GEMMs), and DeepSpeed-MoE. The cost model
charges each operation the device's per-operation overhead (`layer.fixed_s`) where the profile
has not measured the framework itself.
"""

from __future__ import annotations

from moeplan.spec.phases import Phase

# Framework operations per layer (forward, backward) of moeplan's runtime, each paying the
# device's per-operation overhead. CPU (the torch reference): aten ops, views excluded, counted
# with a TorchDispatchMode over tiny-pr-moe, torch 2.13 (tests/test_cost_models.py recounts them);
# experts: 1 + 3·L forward and 5 + 7·L backward for L local experts (a loop).
RUNTIME_OPS = {Phase.ATTENTION: (8, 18), Phase.MLP: (6, 8), "residual_mlp": (11, 19),
               Phase.GATE: (31, 31), Phase.DISPATCH: (8, 2), Phase.COMBINE: (5, 5),
               Phase.HEAD: (12, 11)}
# CUDA (Triton gating / dispatch / combine, one grouped expert GEMM pair): kernel launches and
# torch ops around them, counted by reading runtime/kernels/triton_moe.py (not traced on a GPU;
# the gate's forward — 2 launches + 30 torch ops for any top-k > 1 with renormalised weights,
# CUDA_RENORM_OPS fewer without — is recounted under TRITON_INTERPRET by tests/test_kernels.py);
# the other phases launch one kernel per aten op, as on CPU.
CUDA_OPS = {**RUNTIME_OPS, Phase.GATE: (32, 24), Phase.DISPATCH: (7, 2), Phase.COMBINE: (8, 11),
            Phase.EXPERTS: (4, 8)}
CUDA_RENORM_OPS = 3  # sum, clamp, div
# CUDA inference (no autograd): the router GEMM and its two casts, the gate's buffers, one
# Triton launch for the whole routing table and the device-side counts; dispatch and combine
# each a launch and their index tensors; the experts' grouped GEMMs that skip empty experts,
# with the device flag — read off kernels/triton_moe.py, not traced on a GPU.
CUDA_INFER_OPS = {Phase.GATE: 15, Phase.DISPATCH: 6, Phase.COMBINE: 6, Phase.EXPERTS: 8}
# DeepSpeed-MoE (deepspeed/moe/sharded_moe.py, experts.py at 38327e0; Megatron-DeepSpeed's
# ParallelMLP as the expert): GPU kernels per MoE layer phase (forward, backward). Forward counted
# with a TorchDispatchMode over DeepSpeed's top-1 TopKGate (CPU, fp32) less the CPU-only capacity
# scalars: gate 32 with random token selection (27 without: inference, where DeepSpeed-MoE turns
# it off) + 2 fp16→fp32 casts; dispatch and combine a cast, the einsum's bmm and a copy each;
# experts chunk + cat around 4 kernels per local expert (`ops`). Backward counts are estimates
# (autograd nodes of the same ops), not counted.
DEEPSPEED_OPS = {**CUDA_OPS, Phase.GATE: (34, 24), Phase.DISPATCH: (3, 3), Phase.COMBINE: (3, 3)}
DEEPSPEED_RTS_OPS = 5  # random token selection: rand, sub, mul, add, mul (not in inference)
# DeepSpeed 0.5–0.13 (the paper's era) copies the gate's expert counts `.to('cpu')` on every
# call (v0.6.0 sharded_moe.py:204), draining the launch queue: a PCIe round trip each (assumed
# 15 µs on A100 hosts, not measured here). Removed in 0.14.
DEEPSPEED_SYNCS, HOST_SYNC_S = 1, 15e-6


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


def operations(runtime: str, device_kind: str, name: str, training: bool,
               local_experts: int = 0, spec=None) -> float:
    """Operations one forward pass of a phase is charged: its forward count for inference; for
    training a third of forward + backward, since training charges compute phases three
    passes (see `step.train_layer`). `spec`: the model, whose gate options add to moerun's
    training gate."""
    noise = gate_noise_ops(spec) if (spec is not None and training and name == Phase.GATE
                                     and runtime != "deepspeed") else 0
    if noise:
        fwd, bwd = RUNTIME_OPS[Phase.GATE]
        return (fwd + noise + bwd) / 3
    if runtime == "deepspeed":
        if name == Phase.EXPERTS:
            fwd, bwd = 2 + 4 * local_experts, 2 + 8 * local_experts
        else:
            fwd, bwd = DEEPSPEED_OPS[name]
            if name == Phase.GATE and not training:
                fwd -= DEEPSPEED_RTS_OPS
    elif device_kind == "gpu":
        if not training and name in CUDA_INFER_OPS:
            return CUDA_INFER_OPS[name]
        fwd, bwd = CUDA_OPS[name]
        if name == Phase.GATE and spec is not None and not (spec.top_k > 1
                                                            and spec.renormalize_top_k):
            fwd -= CUDA_RENORM_OPS
    elif name == Phase.EXPERTS:
        fwd, bwd = 1 + 3 * local_experts, 5 + 7 * local_experts
    else:
        fwd, bwd = RUNTIME_OPS[name]
    return (fwd + bwd) / 3 if training else fwd
