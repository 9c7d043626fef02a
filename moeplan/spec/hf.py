"""A Hugging Face `config.json` of a MoE language model as a `ModelSpec` — no network, no
`transformers`: the fields each architecture's modelling code reads, mapped by hand.

  MixtralForCausalLM      every layer MoE (num_local_experts, num_experts_per_tok), SwiGLU experts
                          of intermediate_size, GQA, RMSNorm, rotary, no biases, untied head
  Qwen2MoeForCausalLM     MoE every decoder_sparse_step-th layer (1-based) except mlp_only_layers
                          (dense, intermediate_size); experts of moe_intermediate_size; a shared
                          expert of shared_expert_intermediate_size behind a sigmoid gate; biases
                          on q, k, v only
  Qwen3MoeForCausalLM     as Qwen2-MoE without the shared expert; head_dim of its own; query and
                          key RMSNorms per head
  OlmoeForCausalLM        every layer MoE; query and key RMSNorms over the whole projection
  DeepseekV2/V3ForCausalLM the first first_k_dense_replace layers dense (intermediate_size), then
                          MoE every moe_layer_freq-th: n_routed_experts of moe_intermediate_size,
                          n_shared_experts of the same width always on; multi-head latent
                          attention (LatentAttention). V3's multi-token-prediction layers are not
                          part of the model planned here.
Anything else ends with one line naming the architecture.
"""

from __future__ import annotations

import math
from typing import Any

from moeplan.spec.errors import SpecError
from moeplan.spec.model import MAX_LAYERS, LatentAttention, ModelSpec

SUPPORTED = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
             "OlmoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


MAX_CONFIG_INT = 2**53  # floats hold every whole number up to here; no config's size nears it


def is_hf_config(doc: Any) -> bool:
    return isinstance(doc, dict) and ("architectures" in doc or "model_type" in doc) \
        and "num_hidden_layers" in doc


def _get(doc: dict, key: str, kind: type = int, default: Any = ...) -> Any:
    if key not in doc or doc[key] is None:
        if default is ...:
            raise SpecError(f"the Hugging Face config has no {key!r}")
        return default
    value = doc[key]
    if kind is int and (type(value) is not int or value < 0):
        raise SpecError(f"the Hugging Face config's {key} is {value!r}, not a whole number")
    if kind is int and value > MAX_CONFIG_INT:  # beyond any float the sizes are costed in
        raise SpecError(f"the Hugging Face config's {key} is a {value.bit_length()}-bit "
                        f"number, above 2^53")
    if kind is bool and type(value) is not bool:
        raise SpecError(f"the Hugging Face config's {key} is {value!r}, not true or false")
    return value


def _float(doc: dict, key: str, default: float) -> float:
    """A real number of the config (absent, null or 0: `default`); anything else is one line."""
    value = doc.get(key)
    if not value:
        return default
    if type(value) not in (int, float):
        raise SpecError(f"the Hugging Face config's {key} is {value!r}, not a number")
    try:
        x = float(value)
    except OverflowError:
        x = float("inf")
    if not math.isfinite(x):
        raise SpecError(f"the Hugging Face config's {key} is not a finite number")
    return x


def _every(step: int, layers: int, dense: list[int] | None = None, first: int = 0,
           offset: int = 1) -> list[bool]:
    """MoE layers: 0-based i with (i + offset) % step == 0, from `first` on, less `dense`."""
    if step <= 0:
        raise SpecError(f"the Hugging Face config's MoE layer step is {step}, not positive")
    skip = set(dense or [])
    return [i >= first and (i + offset) % step == 0 and i not in skip for i in range(layers)]


def from_hf(doc: dict, name: str) -> ModelSpec:
    """The ModelSpec of a Hugging Face config (`name`: what to call it)."""
    archs = doc.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch not in SUPPORTED:
        shown = arch if arch is not None else f"model_type {doc.get('model_type')!r}"
        raise SpecError(f"Hugging Face architecture {shown} is not one moeplan reads "
                        f"({', '.join(SUPPORTED)})")
    L = _get(doc, "num_hidden_layers")
    if L > MAX_LAYERS:  # before any per-layer list is built
        raise SpecError(f"the Hugging Face config's num_hidden_layers is {L}, above the "
                        f"{MAX_LAYERS} moeplan plans")
    h, heads = _get(doc, "hidden_size"), _get(doc, "num_attention_heads")
    common: dict[str, Any] = dict(
        name=name, description=f"{arch} from a Hugging Face config",
        source="Hugging Face config.json", num_layers=L, hidden=h, heads=heads,
        vocab_size=_get(doc, "vocab_size"), max_seq_len=_get(doc, "max_position_embeddings"),
        kv_heads=_get(doc, "num_key_value_heads", default=heads), mlp="swiglu", norm="rmsnorm",
        positions="rope", bias=False, norm_eps=_float(doc, "rms_norm_eps", 1e-6),
        rope_theta=_float(doc, "rope_theta", 10000.0),
        tied_embeddings=_get(doc, "tie_word_embeddings", bool, False),
        capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, eval_min_capacity=0,
        drop_tokens=False, use_rts=False, second_expert_sampling=False)
    k = _get(doc, "num_experts_per_tok")
    if arch == "MixtralForCausalLM":
        E = _get(doc, "num_local_experts")
        moe = [True] * L
        spec = dict(ffn_hidden=_get(doc, "intermediate_size"), renormalize_top_k=True,
                    aux_loss_coef=_float(doc, "router_aux_loss_coef", 0.0))
    elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        E = _get(doc, "num_experts")
        moe = _every(_get(doc, "decoder_sparse_step", default=1), L,
                     dense=doc.get("mlp_only_layers") or [])
        spec = dict(ffn_hidden=_get(doc, "intermediate_size"),
                    expert_ffn_hidden=_get(doc, "moe_intermediate_size"),
                    renormalize_top_k=_get(doc, "norm_topk_prob", bool, False),
                    aux_loss_coef=_float(doc, "router_aux_loss_coef", 0.0))
        if arch == "Qwen2MoeForCausalLM":
            shared = _get(doc, "shared_expert_intermediate_size", default=0)
            spec.update(qkv_bias=True, shared_ffn_hidden=shared, shared_gate=shared > 0)
        else:
            spec.update(head_dim=_get(doc, "head_dim", default=h // heads if heads else 0),
                        qk_norm="head",
                        qkv_bias=bool(doc.get("attention_bias", False)))
    elif arch == "OlmoeForCausalLM":
        E = _get(doc, "num_experts")
        moe = [True] * L
        spec = dict(ffn_hidden=_get(doc, "intermediate_size"), qk_norm="full",
                    renormalize_top_k=_get(doc, "norm_topk_prob", bool, False),
                    aux_loss_coef=_float(doc, "router_aux_loss_coef", 0.0))
    else:  # DeepSeek-V2 / V3
        E = _get(doc, "n_routed_experts")
        moe = _every(_get(doc, "moe_layer_freq", default=1), L,
                     first=_get(doc, "first_k_dense_replace", default=0), offset=0)
        fe = _get(doc, "moe_intermediate_size")
        spec = dict(ffn_hidden=_get(doc, "intermediate_size"), expert_ffn_hidden=fe,
                    shared_ffn_hidden=_get(doc, "n_shared_experts", default=0) * fe,
                    renormalize_top_k=_get(doc, "norm_topk_prob", bool, False),
                    aux_loss_coef=_float(doc, "aux_loss_alpha", 0.0),
                    latent_attention=LatentAttention(
                        q_lora_rank=_get(doc, "q_lora_rank", default=0),
                        kv_lora_rank=_get(doc, "kv_lora_rank"),
                        qk_nope_head_dim=_get(doc, "qk_nope_head_dim"),
                        qk_rope_head_dim=_get(doc, "qk_rope_head_dim"),
                        v_head_dim=_get(doc, "v_head_dim")))
    return ModelSpec(**common, **spec, top_k=k, experts=[E if m else 0 for m in moe])
