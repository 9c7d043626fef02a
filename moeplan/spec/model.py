"""`ModelSpec`: the model as data (layers, widths, per-layer expert counts, gating settings).

A spec says nothing about parallelism or hardware; parameter counts and FLOPs are computed from it
in `moeplan.cost_models`, never by walking module names.
"""

from __future__ import annotations

from math import ceil
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# names are printed to terminals and written into files: no control characters (escapes, bells)
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"


MAX_LAYERS = 1024

class Distillation(BaseModel):
    """Staged knowledge distillation of a Mixture-of-Students (DeepSpeed-MoE §4.2).

    loss = CE + alpha · KL(teacher ‖ student) · T², and KD is switched off after `stop_step`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    teacher: str
    alpha: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    stop_step: int | None = Field(None, ge=0)
    source: str = ""


class LatentAttention(BaseModel):
    """DeepSeek-V2/V3's multi-head latent attention (MLA): queries through an optional low-rank
    `q_lora_rank` projection, keys and values through a shared `kv_lora_rank` latent plus a
    decoupled rotary key of `qk_rope_head_dim` per token."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    q_lora_rank: int = Field(0, ge=0)  # 0: queries projected at full rank
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)


MAX_EXPERTS = 2**16  # far beyond any published MoE (DeepSeek-V3: 256 routed experts)


class ModelSpec(BaseModel):
    """A GPT-style decoder whose FFN layers may be Mixture-of-Experts layers.

    `experts[i]` is the expert count of transformer layer i (0-based); 0 means a dense FFN.
    `residual` makes every MoE layer a Residual-MoE: out = moe(x)·c0 + mlp(x)·c1.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(max_length=200, pattern=PRINTABLE)
    description: str = ""
    source: str = ""
    # at most 1,024: the deepest transformer published (DeepNet, Wang et al. 2022) has 1,000
    # layers; the exact search's time grows with the square of the layers (3 s at 1,000)
    num_layers: int = Field(gt=0, le=MAX_LAYERS)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    ffn_hidden: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    experts: list[int]
    residual: bool = False
    top_k: int = Field(1, ge=1, le=8)
    renormalize_top_k: bool = True  # the chosen experts' weights rescaled to sum to 1 (k > 1)
    capacity_factor: float = Field(1.0, gt=0)
    eval_capacity_factor: float = Field(1.0, gt=0)
    min_capacity: int = Field(4, ge=0)
    # inference pads each expert to at least this many rows (DeepSpeed-MoE's inference gates
    # with min capacity 1: every GPU then runs only the rows its experts can receive)
    eval_min_capacity: int = Field(1, ge=0)
    drop_tokens: bool = True
    aux_loss_coef: float = Field(0.01, ge=0)
    # DeepSpeed TopKGate's training-time randomness (its defaults): top-1 keeps a random subset
    # of an expert's tokens when they overflow its capacity (`use_rts`), not the earliest;
    # top-2 samples the second expert with Gumbel noise (`top2_2nd_expert_sampling`);
    # `noisy_gate_policy` "rsample" samples top-1's expert the same way (DeepSpeed's RSample)
    use_rts: bool = True
    second_expert_sampling: bool = True
    noisy_gate_policy: Literal["none", "rsample"] = "none"
    tied_embeddings: bool = True
    reported_params: float | None = Field(None, gt=0)
    distillation: Distillation | None = None
    # the blocks of today's MoE models (Hugging Face configs: `moeplan.spec.hf`); the defaults
    # are DeepSpeed-MoE's GPT-2 blocks, so the zoo's models do not set them
    mlp: Literal["gelu", "swiglu"] = "gelu"  # swiglu: a gated MLP, three matrices
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    kv_heads: int | None = Field(None, gt=0)  # grouped-query attention [default: heads]
    head_dim: int | None = Field(None, gt=0)  # [default: hidden / heads]
    bias: bool = True  # biases of the linear layers
    qkv_bias: bool | None = None  # biases of the query/key/value projections [default: bias]
    qk_norm: Literal["none", "head", "full"] = "none"  # norms of queries and keys (Qwen3, OLMoE)
    latent_attention: LatentAttention | None = None  # MLA (DeepSeek-V2/V3) instead of MHA/GQA
    expert_ffn_hidden: int | None = Field(None, gt=0)  # fine-grained experts [default: ffn_hidden]
    shared_ffn_hidden: int = Field(0, ge=0)  # always-on shared expert(s), their total width
    shared_gate: bool = False  # a sigmoid gate Linear(h, 1) on the shared expert (Qwen2-MoE)

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if len(self.experts) != self.num_layers:
            raise ValueError(
                f"experts has {len(self.experts)} entries but num_layers is {self.num_layers}"
            )
        if any(e < 0 or e == 1 for e in self.experts):
            raise ValueError("every expert count must be 0 (dense) or at least 2")
        if any(e > MAX_EXPERTS for e in self.experts):
            raise ValueError(f"an expert count above {MAX_EXPERTS} is not a model one can plan")
        if self.head_dim is None and self.latent_attention is None and self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} are not a multiple of kv_heads {self.kv_heads}")
        if any(0 < e < self.top_k for e in self.experts):
            raise ValueError(f"top-{self.top_k} gating needs at least {self.top_k} experts per "
                             "MoE layer")
        if self.residual and self.shared_ffn_hidden:
            raise ValueError("a residual MLP (PR-MoE) and a shared expert are two names for one "
                             "thing: give one")
        return self

    @property
    def expert_ffn(self) -> int:
        return self.expert_ffn_hidden or self.ffn_hidden

    def capacity(self, experts: int, gate_tokens: int, train: bool) -> int:
        """Rows per expert of one gate call of `gate_tokens` tokens (DeepSpeed TopKGate):
        ceil(k·cf·T/E), at least the min capacity; training and inference have their own cf and
        min capacity."""
        cf = self.capacity_factor if train else self.eval_capacity_factor
        floor = self.min_capacity if train else self.eval_min_capacity
        return max(ceil(self.top_k * cf * gate_tokens / experts), floor)

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the MoE layers."""
        return [i for i, e in enumerate(self.experts) if e]
