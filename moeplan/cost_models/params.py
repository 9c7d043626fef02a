"""Parameter counts computed from a `ModelSpec`.

GPT-2 blocks (the zoo's, biases included): attention 4h² + 4h (query, key, value and output
projections with biases), MLP 2hf + f + h, two LayerNorms 4h. A MoE layer replaces the MLP by E
expert MLPs plus a bias-free router h·E; a Residual-MoE (PR-MoE) layer keeps the dense MLP beside
the experts and adds the coefficient Linear(h, 2) (2h + 2). Embeddings: token V·h + learned
positions S·h, final LayerNorm 2h; a tied LM head adds nothing.
Today's blocks: grouped-query attention (h·a·d queries and output, 2·h·g·d keys and values for g kv
heads of width d), latent attention (DeepSeek's MLA, `attention_params`), gated MLPs 3hf, RMSNorm
h, query/key norms, rotary positions (no table), fine-grained experts of their own width, shared
experts (an always-on MLP, with Qwen2-MoE's gate h), an untied LM head V·h.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.spec.model import ModelSpec


def attention_params(spec: ModelSpec) -> int:
    h, a = spec.hidden, spec.heads
    m = spec.latent_attention
    if m is not None:
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = (h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * a * qk if m.q_lora_rank
             else h * a * qk)
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank + m.kv_lora_rank * a * (
            m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + a * m.v_head_dim * h + (h if spec.bias else 0)
    d = spec.head_dim or h // a
    g = spec.kv_heads or a
    qkv_bias = spec.bias if spec.qkv_bias is None else spec.qkv_bias
    weights = h * a * d + 2 * h * g * d + a * d * h
    biases = (a * d + 2 * g * d if qkv_bias else 0) + (h if spec.bias else 0)
    norms = {"none": 0, "head": 2 * d, "full": a * d + g * d}[spec.qk_norm]
    return weights + biases + norms


def mlp_params(spec: ModelSpec, f: int) -> int:
    h = spec.hidden
    if spec.mlp == "swiglu":
        return 3 * h * f + (2 * f + h if spec.bias else 0)
    return 2 * h * f + (f + h if spec.bias else 0)


def norm_params(spec: ModelSpec) -> int:
    return (2 if spec.norm == "layernorm" else 1) * spec.hidden


def embedding_params(spec: ModelSpec) -> int:
    """Token (and learned position) embeddings, the final norm, and an untied LM head."""
    head = 0 if spec.tied_embeddings else spec.vocab_size * spec.hidden
    positions = spec.max_seq_len * spec.hidden if spec.positions == "learned" else 0
    return spec.vocab_size * spec.hidden + positions + norm_params(spec) + head


@dataclass(frozen=True)
class AttentionShape:
    """What the cost model needs of a layer's attention (widths summed over heads)."""

    projection_out: int  # output width of the projections from the hidden (q, k, v; MLA's
    #                      latent and up-projections folded in by their weights)
    output_in: int  # input width of the output projection (heads × value width)
    qk: int  # heads × query/key width: the score product's reduction
    v: int  # heads × value width: the product with the values
    weights: int  # weight matrices' parameters
    kv_per_token: int  # KV-cache elements per token and layer
    kv_sliced: bool  # whether tensor slicing splits the cache (heads) or every rank keeps it


def attention_shape(spec: ModelSpec) -> AttentionShape:
    """GPT-2 (3h, h, h, h, 4h², 2h); GQA with g kv heads of width d: (a·d + 2g·d, a·d, a·d,
    a·d, …, 2g·d); MLA (DeepSeek): the cache holds the latent and the rotary key
    (kv_lora_rank + qk_rope_head_dim per token, whole on every tp rank), as DeepSeek's own
    inference caches it; the score and value products run at the heads' full widths (the
    up-projections not absorbed into them — an upper bound on their FLOPs)."""
    h, a = spec.hidden, spec.heads
    m = spec.latent_attention
    if m is not None:
        weights = attention_params(spec) - (h if spec.bias else 0)  # the matrices only
        return AttentionShape(projection_out=(weights - a * m.v_head_dim * h) // h,
                              output_in=a * m.v_head_dim,
                              qk=a * (m.qk_nope_head_dim + m.qk_rope_head_dim),
                              v=a * m.v_head_dim, weights=weights,
                              kv_per_token=m.kv_lora_rank + m.qk_rope_head_dim, kv_sliced=False)
    d = spec.head_dim or h // a
    g = spec.kv_heads or a
    return AttentionShape(projection_out=a * d + 2 * g * d, output_in=a * d, qk=a * d, v=a * d,
                          weights=(a * d + 2 * g * d) * h + a * d * h, kv_per_token=2 * g * d,
                          kv_sliced=True)


def mlp_matrices(spec: ModelSpec) -> int:
    return 3 if spec.mlp == "swiglu" else 2


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer layer split by how they are parallelised."""

    non_expert: int  # attention, LayerNorms, router, residual MLP and coefficient: tensor-sliced / dp
    per_expert: int  # one expert MLP: expert-parallel / expert-sliced / edp
    experts: int

    @property
    def expert_total(self) -> int:
        return self.per_expert * self.experts

    @property
    def total(self) -> int:
        return self.non_expert + self.expert_total


def layer_params(spec: ModelSpec, index: int) -> LayerParams:
    h, f, E = spec.hidden, spec.ffn_hidden, spec.experts[index]
    base = attention_params(spec) + 2 * norm_params(spec)
    if E == 0:
        return LayerParams(non_expert=base + mlp_params(spec, f), per_expert=0, experts=0)
    router = h * E
    residual = mlp_params(spec, f) + 2 * h + 2 if spec.residual else 0
    shared = (mlp_params(spec, spec.shared_ffn_hidden) + (h if spec.shared_gate else 0)
              if spec.shared_ffn_hidden else 0)
    return LayerParams(non_expert=base + router + residual + shared,
                       per_expert=mlp_params(spec, spec.expert_ffn), experts=E)


def total_params(spec: ModelSpec) -> int:
    return embedding_params(spec) + sum(layer_params(spec, i).total for i in range(spec.num_layers))


def active_params(spec: ModelSpec) -> int:
    """Parameters one token touches: everything non-expert plus top_k experts per MoE layer."""
    total = embedding_params(spec)
    for i in range(spec.num_layers):
        p = layer_params(spec, i)
        total += p.non_expert + p.per_expert * min(spec.top_k, p.experts)
    return total
