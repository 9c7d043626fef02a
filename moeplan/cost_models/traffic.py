"""Bytes of the memory-bound work beside a layer's GEMMs on a GPU: layer norms, biases,
activations, dropout and residual adds, unfused attention scores, the passes today's blocks add,
and DeepSpeed's gate, dispatch and combine as counted by running them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from moeplan.cost_models.env import Env, Pass
from moeplan.cost_models.runtimes import counted_top_k, is_deepspeed
from moeplan.spec.phases import Phase
from moeplan.spec.workload import Setting

# DeepSpeed-MoE's gate, dispatch, experts and combine as its layer runs them: bytes and GEMM FLOPs
# counted by running DeepSpeed 0.16.4 (`--runtime deepspeed`) and 0.19.8 (`deepspeed-sparse`) at
# 72 sizes each (bench/count_deepspeed_moe_bytes.py; records bench/results/deepspeed-moe-bytes*
# .json), each phase's figure fitted exactly as a sum of size terms (S tokens, E experts, C rows
# an expert, width h, expert FFN f). The fits ship as data/deepspeed_traffic.json, keyed
# "top-{1,2,4} {2,4}B {train,infer} {forward,backward} {gate,dispatch,experts,combine}
# {bytes,gemm_bytes,gemm_flops}" (top-k > 2 as counted at k = 4), each a {term: coefficient};
# "ep2 {2,4}B train {forward,backward} experts ..." the Experts module alone over 2 ranks' rows.


def term(name: str, S: int, E: int, C: int, h: int, f: int) -> float:
    """A fit's size term: the product of its letters (s = S, e = E, c = C, h, f; "1" is 1)."""
    sizes = {"s": S, "e": E, "c": C, "h": h, "f": f}
    out = 1.0
    for letter in name.replace("1", ""):
        out *= sizes[letter]
    return out


@cache
def deepspeed_counts() -> dict:
    """The counted fits per DeepSpeed runtime (package data)."""
    text = resources.files("moeplan.cost_models").joinpath("data/deepspeed_traffic.json")
    return json.loads(text.read_text())


@dataclass(frozen=True)
class Traffic:
    """What one pass of a phase is charged: GEMM FLOPs, the bytes those GEMMs move, and the
    bytes of everything else (memory-bound kernels that run one after another)."""

    gemm_flops: float
    gemm_bytes: float
    other_bytes: float


def deepspeed_traffic(runtime: str, phase: str, k: int, b: int, tokens: int, experts: int,
                      capacity: int, h: int, training: bool, recompute: bool,
                      ffn: int = 0, chunked: bool = False) -> Traffic:
    """DeepSpeed's counted traffic for one gate call of `tokens` tokens over `experts` experts
    of `capacity` rows (for the experts phase: the local experts and the rows each receives),
    width `h`, expert FFN `ffn`, `b`-byte activations, top-`k`, per forward pass charged: in
    inference the forward; in training ((1 + r)·forward + backward) / (3 + r), since training
    charges a compute phase 3 + r forward passes (r: recomputed). `chunked`: the experts'
    input came from an all-to-all and several experts are local, so each one's rows are copied
    out before its first GEMM and their gradients cat back — the E·C·h bytes the count over 2
    ranks ("ep2") has beyond the one-rank count (its other extra, an unfused bias add over the
    FFN rows, is PyTorch's linear on a strided input: Megatron's expert fuses that bias into
    its GELU)."""
    fits = deepspeed_counts()[runtime]["fits"]
    size = (tokens, experts, capacity, h, ffn)

    def value(mode: str, way: str, what: str) -> float:
        per = fits[f"top-{counted_top_k(k)} {b}B {mode} {way} {phase} {what}"]
        got = sum(c * term(t, *size) for t, c in per.items())
        if chunked and what == "bytes":
            copy = fits[f"ep2 {b}B train {way} {phase} bytes"].get("ech", 0.0) - per.get("ech", 0.0)
            got += copy * term("ech", *size)
        return got

    def charged(what: str) -> float:
        if not training:
            return value("infer", "forward", what)
        r = int(recompute)
        return ((1 + r) * value("train", "forward", what)
                + value("train", "backward", what)) / (3 + r)

    gemm_bytes = charged("gemm_bytes")
    return Traffic(charged("gemm_flops"), gemm_bytes, charged("bytes") - gemm_bytes)


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
