"""Bytes of the memory-bound work beside a layer's GEMMs on a GPU: layer norms, biases,
activations, dropout and residual adds, unfused attention scores, the passes today's blocks add,
and DeepSpeed's [S, E, C] gate tensors and index combine."""

from __future__ import annotations

from moeplan.cost_models.env import Env, Pass
from moeplan.cost_models.runtimes import is_deepspeed
from moeplan.spec.phases import Phase
from moeplan.spec.workload import Setting

# Bytes written and read per [S, E, C] element by DeepSpeed's einsum gates (sharded_moe.py,
# v0.16.4): top-1 the fp32 combine weights (4), the bool mask (4 + 1) and both cast for the
# einsums (1 + 2, 4 + 2) = 18; top-2 two combine tensors and their sum (+16) = 34; top-k > 2
# (`topkgating`) the one-hot locations in int64 and their fp32 copy (8 + 12) and the product
# with the gates (8) before the mask and the casts = 42
SEC_BYTES = {1: 18.0, 2: 34.0, 3: 42.0}


def sparse_combine_bytes(tokens: int, rows: int, h: int, b: int, k: int) -> float:
    """Bytes of DeepSpeed's `_sparse_decode` (v0.19.4 on) for one gate call's `tokens` and the
    `rows` the exchange brought back, `b` bytes an element, top-`k`: the rows copied with a pad
    row, each route's row gathered, weighed by its fp32 gate value into fp32, the routes summed
    in fp32 and the sum cast back."""
    return (2 * b * rows * h + tokens * h * (2 * b * k + (b + 4) * k + 4 * (k + 1) + 4 + b))


def elementwise_bytes(env: Env, s: Setting, p: Pass, phase: str, f: int = 0) -> float:
    """Bytes of the memory-bound kernels beside a block's GEMMs, on a GPU (on a CPU profile the
    measured work scale covers them): layer norm (read, write), bias adds, GELU, dropout in
    DeepSpeed's training (read, write, mask; moerun has no dropout) and the residual add (two
    reads, a write), each over the whole hidden on every tp rank (no sequence parallelism);
    DeepSpeed's attention (Megatron, no fused attention) also writes its [B, A/tp, S, ctx]
    scores and reads and writes them in the masked softmax, in training dropout and in the
    product with the values."""
    if env.cluster.device.kind != "gpu":
        return 0.0
    spec, b, tp, T = env.spec, env.dtype_bytes, s.tp, p.tokens
    h, f = spec.hidden, f or spec.ffn_hidden
    dropout = (env.workload.mode == "train" and not p.decode and is_deepspeed(env.runtime))
    passes_h = 2 + 2 + 3 + (3 if dropout else 0)  # norm, bias, residual, dropout
    if phase == Phase.MLP:
        return b * T * (passes_h * h + 2 * f / tp)  # + the GELU over the FFN width
    scores = 0.0
    if is_deepspeed(env.runtime):
        scores = b * T * spec.heads / tp * p.context * (5 + (3 if dropout else 0))
    return b * T * passes_h * h + scores


# Passes over a tensor (reads + writes) of the elementwise work today's blocks add to
# DeepSpeed-MoE's, as moerun runs them (one kernel per operation, `runtimes.block_delta`):
RMSNORM_PASSES = 5  # pow, mean, rsqrt, two products: 7 passes where a fused LayerNorm makes 2
ROPE_PASSES = 10  # per rotated tensor: negated half, concatenation, two products, the sum
QK_NORM_PASSES = {"head": 7, "full": 5}  # an RMSNorm over q and k each (full: fp32, fused sum)
SWIGLU_PASSES = 3  # silu and the product: 5 passes over the FFN width where GELU makes 2


def block_elementwise_bytes(env: Env, s: Setting, p: Pass, phase: str, f: int = 0,
                            local_experts: int = 0, rows: int = 0) -> float:
    """Bytes of the memory-bound work today's blocks add beyond DeepSpeed-MoE's (which a CPU
    profile's measured work scale already covers): RMSNorm run as separate operations, rotary
    positions over q and k, per-head or whole q/k norms, SwiGLU's silu and product (in the
    MLP over the FFN width `f` per rank; in the experts over each local expert's `rows` at its
    slice `f`)."""
    spec, b, tp, T = env.spec, env.dtype_bytes, s.tp, p.tokens
    h = spec.hidden
    rms = RMSNORM_PASSES * h if spec.norm == "rmsnorm" else 0
    if phase == Phase.ATTENTION:
        d = spec.head_dim or h // spec.heads
        q, kv = spec.heads * d / tp, (spec.kv_heads or spec.heads) * d / tp  # widths per rank
        rope = 0
        if spec.positions == "rope":
            if spec.latent_attention is not None:  # the rotary parts: q's per head, k's shared
                r = spec.latent_attention.qk_rope_head_dim
                rope = ROPE_PASSES * (spec.heads / tp * r + r)
            else:
                rope = ROPE_PASSES * (q + kv)
        qk = (QK_NORM_PASSES.get(spec.qk_norm, 0) * (q + kv)
              if spec.latent_attention is None else 0)
        return b * T * (rms + rope + qk)
    if phase in (Phase.MLP, Phase.GATE):
        gated = SWIGLU_PASSES * (f or spec.ffn_hidden) / tp if (
            phase == Phase.MLP and spec.mlp == "swiglu") else 0
        return b * T * (rms + gated)
    if phase == Phase.EXPERTS and spec.mlp == "swiglu":
        return b * SWIGLU_PASSES * local_experts * rows * f
    return 0.0
