"""Memory per GPU, by component, for one layer and for the embedding/LM head.

Activation sizes follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (2022), eq. 2 with tensor parallelism and no sequence parallelism, per token and 2-byte
activations: attention block (3 + 8/t)·h + 5·a·ctx/t (scores, softmax, dropout mask), MLP
(3 + 16/t)·h, two LayerNorm inputs 2·h each. The 5·a·ctx/t of scores is kept only where the
attention materialises them (DeepSpeed-MoE's Megatron attention); moerun's fused attention
(`scaled_dot_product_attention`: flash kernels on CUDA and for causal training on CPU) keeps
a log-sum-exp per head (4 bytes) instead; its output is the projection's input, counted. A MoE FFN stores its dispatched, received, expert-internal
and combined buffers (rows = experts × capacity) and the fp32 gate probabilities.

Training state per parameter (`train_state`): DeepSpeed/Megatron's mixed-precision Adam
keeps 2-byte weights and gradients and 12 bytes of fp32 master weights, momentum and variance;
under bf16 without ZeRO, DeepSpeed v0.16.4's BF16 optimizer also accumulates the gradients in an
fp32 buffer (4 + 2 bytes) and partitions the fp32 states over the data-parallel group all the
same, gathering the updated bf16 weights after each step (v0.19.8 — `--runtime
deepspeed-sparse` — runs its FP16 optimizer in bf16 there instead: the plain layout); moerun
trains bf16/fp16 under autocast over fp32 weights — they are the master copy, their gradients
fp32 — so 4 + 4 bytes and 8 of moments, as both do in fp32; its residual stream and so the layer norms' inputs stay fp32
under autocast too (`env.Env.residual_bytes`).
ZeRO stage 1 partitions optimizer states over the data-parallel group (experts: over their edp
group); stage 2 also partitions gradients — at their peak only under DeepSpeed, which reduces
each bucket during the backward and keeps its partition; moerun reduces after it
(`layer.gradient_share`). DeepSpeed's ZeRO 1/2 also hold a reduce bucket through each backward
(`DEEPSPEED_REDUCE_BUCKET`).
"""

from __future__ import annotations

from typing import NamedTuple

from moeplan.cost_models.params import attention_shape
from moeplan.spec.model import ModelSpec

# Elements of the bucket DeepSpeed's ZeRO 1/2 allocate in the model's dtype at each backward
# (v0.16.4 zero/config.py reduce_bucket_size default 5e8; stage_1_and_2.py backward; a second
# one with overlap_comm, off by default below stage 3), whatever the model's size.
DEEPSPEED_REDUCE_BUCKET = 500_000_000


class TrainState(NamedTuple):
    """Bytes per parameter of a rank's training state, and how a step moves it."""
    weights: int
    gradients: int  # at their peak
    optimizer: int  # before any partitioning
    reduced: int  # per gradient element in the data-parallel reduction
    gathered: int  # per weight element all-gathered after a partitioned step (0: none)
    sharded: bool  # optimizer states partitioned over the data-parallel group


def train_state(dtype: str, runtime: str, zero_stage: int) -> TrainState:
    """The runtime's precision layout for the plan's dtype and ZeRO stage (see the module's
    docstring). DeepSpeed reduces in the 16-bit dtype (its default communication dtype), so
    the BF16 optimizer's fp32 gradients travel as bf16 (engine.allreduce_bucket, v0.16.4)."""
    sharded = zero_stage >= 1
    if runtime == "moerun" or dtype == "fp32":
        return TrainState(4, 4, 8, 4, 4 * sharded, sharded)
    if dtype == "bf16" and not sharded and runtime == "deepspeed":
        # v0.16.4 engine._do_optimizer_sanity_check: BF16_Optimizer (v0.19.8: DDP_BFLOAT16, its
        # FP16_Optimizer in bf16, the plain layout below)
        return TrainState(2, 2 + 4, 12, 2, 2, True)
    return TrainState(2, 2, 12, 2, 2 * sharded, sharded)


def attention_activation_bytes(tokens: float, context: float, h: int, heads: int, tp: int,
                               dtype_bytes: int, scores: bool = True,
                               dropout: bool = True) -> float:
    """`scores`: the [heads, ctx] scores, softmax and dropout mask are kept per token
    (unfused attention); else the fused kernel's fp32 log-sum-exp per head (its output is the
    projection's input, counted in 8h/t). Without `dropout` (moerun has none) no h-wide mask."""
    per_token = h * (4 + dropout + 8 / tp) + (5 * heads * context / tp if scores
                                              else heads / tp * 4 * 2 / dtype_bytes)
    return tokens * per_token * dtype_bytes / 2


def mlp_activation_bytes(tokens: float, h: int, tp: int, dtype_bytes: int, f: int | None = None,
                         gated: bool = False, dropout: bool = True) -> float:
    """(5h + 4f/t) per token: the FFN-width terms scale with f (16h/t at f = 4h); a gated MLP
    keeps its gate's output as well (+2f/t); without `dropout`, no h-wide mask (4h)."""
    f = 4 * h if f is None else f
    return tokens * ((4 + dropout) * h + (6 if gated else 4) * f / tp) * dtype_bytes / 2


def moe_activation_bytes(spec: ModelSpec, experts: int, tokens: float, gate_tokens: float,
                         rows: float, received_rows: float, es: int, dtype_bytes: int) -> float:
    """MoE FFN buffers on one GPU: `rows` = experts·capacity dispatched by this GPU,
    `received_rows` = rows its local expert slices compute on (es·experts·capacity)."""
    h, f = spec.hidden, spec.expert_ffn
    buffers = (2 * rows * h + received_rows * (2 * h + 2 * f / es) + tokens * 2 * h) * dtype_bytes
    probs = 2 * 4 * gate_tokens * experts
    return buffers + probs


def kv_cache_bytes(sequences: float, length: int, spec: ModelSpec, tp: int,
                   dtype_bytes: int) -> float:
    """Keys and values of one layer for `sequences` of `length` tokens, heads split over tp
    (an MLA latent is whole on every rank): `params.attention_shape`."""
    shape = attention_shape(spec)
    return (sequences * length * shape.kv_per_token / (tp if shape.kv_sliced else 1)
            * dtype_bytes)
