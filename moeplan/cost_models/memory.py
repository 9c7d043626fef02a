"""Memory per GPU, by component, for one layer and for the embedding/LM head.

Activation sizes follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (2022), eq. 2 with tensor parallelism and no sequence parallelism, per token and 2-byte
activations: attention block (3 + 8/t)·h + 5·a·ctx/t (scores, softmax, dropout mask), MLP
(3 + 16/t)·h, two LayerNorm inputs 2·h each. A MoE FFN stores its dispatched, received, expert-internal
and combined buffers (rows = experts × capacity) and the fp32 gate probabilities.

Mixed-precision Adam (DeepSpeed/Megatron): 2-byte weights and gradients, 12 bytes of fp32 master
weights, momentum and variance per parameter (8 without a master copy when training in fp32).
ZeRO stage 1 partitions optimizer states over the data-parallel group (experts: over their edp
group); stage 2 also partitions gradients — at their peak only under DeepSpeed, which
reduce-scatters during the backward; moerun reduces after it (`layer.gradient_share`).
"""

from __future__ import annotations

from moeplan.spec.model import ModelSpec


def optimizer_bytes_per_param(dtype_bytes: int) -> int:
    return 12 if dtype_bytes < 4 else 8


def attention_activation_bytes(tokens: float, context: float, h: int, heads: int, tp: int,
                               dtype_bytes: int) -> float:
    per_token = h * (5 + 8 / tp) + 5 * heads * context / tp
    return tokens * per_token * dtype_bytes / 2


def mlp_activation_bytes(tokens: float, h: int, tp: int, dtype_bytes: int) -> float:
    return tokens * h * (5 + 16 / tp) * dtype_bytes / 2


def moe_activation_bytes(spec: ModelSpec, experts: int, tokens: float, gate_tokens: float,
                         rows: float, received_rows: float, es: int, dtype_bytes: int) -> float:
    """MoE FFN buffers on one GPU: `rows` = experts·capacity dispatched by this GPU,
    `received_rows` = rows its local expert slices compute on (es·experts·capacity)."""
    h, f = spec.hidden, spec.ffn_hidden
    buffers = (2 * rows * h + received_rows * (2 * h + 2 * f / es) + tokens * 2 * h) * dtype_bytes
    probs = 2 * 4 * gate_tokens * experts
    return buffers + probs


def kv_cache_bytes(sequences: float, length: int, h: int, tp: int, dtype_bytes: int) -> float:
    """Keys and values of one layer for `sequences` of `length` tokens, heads split over tp."""
    return 2 * sequences * length * h / tp * dtype_bytes
