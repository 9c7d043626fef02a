"""Parameter counts computed from a `ModelSpec` (GPT-2 style blocks, biases included).

Per block: attention 4h² + 4h (fused QKV and output projection with biases), MLP 2hf + f + h, two
LayerNorms 4h. A MoE layer replaces the MLP by E expert MLPs plus a bias-free router h·E; a
Residual-MoE (PR-MoE) layer keeps the dense MLP beside the experts and adds the coefficient
Linear(h, 2) (2h + 2). Embeddings: token V·h + learned positions S·h, final LayerNorm 2h; the LM head
is tied to the token embedding (GPT-2), so it adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.spec.model import ModelSpec


def attention_params(h: int) -> int:
    return 4 * h * h + 4 * h


def mlp_params(h: int, f: int) -> int:
    return 2 * h * f + f + h


def layernorm_params(h: int) -> int:
    return 2 * h


def embedding_params(spec: ModelSpec) -> int:
    """Token and position embeddings plus the final LayerNorm (the LM head is tied)."""
    head = 0 if spec.tied_embeddings else spec.vocab_size * spec.hidden
    return (spec.vocab_size + spec.max_seq_len) * spec.hidden + layernorm_params(spec.hidden) + head


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
    base = attention_params(h) + 2 * layernorm_params(h)
    if E == 0:
        return LayerParams(non_expert=base + mlp_params(h, f), per_expert=0, experts=0)
    router = h * E
    residual = mlp_params(h, f) + 2 * h + 2 if spec.residual else 0
    return LayerParams(non_expert=base + router + residual, per_expert=mlp_params(h, f), experts=E)


def total_params(spec: ModelSpec) -> int:
    return embedding_params(spec) + sum(layer_params(spec, i).total for i in range(spec.num_layers))


def active_params(spec: ModelSpec) -> int:
    """Parameters one token touches: everything non-expert plus top_k experts per MoE layer."""
    total = embedding_params(spec)
    for i in range(spec.num_layers):
        p = layer_params(spec, i)
        total += p.non_expert + p.per_expert * min(spec.top_k, p.experts)
    return total
