"""The inputs every cost term reads: the environment of a search (model, cluster, workload,
world size, runtime), a MoE layer's degrees, one forward pass, and a layer's costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from math import ceil

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.memory import TrainState, train_state
from moeplan.cost_models.runtimes import is_deepspeed
from moeplan.spec.cluster import DTYPE_BYTES, ClusterProfile
from moeplan.spec.model import ModelSpec
from moeplan.spec.workload import Workload


@dataclass(frozen=True)
class Scales:
    """Factors on the seconds of each group of calibrated terms (`ClusterProfile.spread`):
    1 is the profile as calibrated; the band on a prediction re-costs it at each group's p10
    and p90."""

    compute: float = 1.0
    framework: float = 1.0
    communication: float = 1.0


@dataclass(frozen=True)
class Env:
    """The fixed inputs of a search: model, cluster, workload, world size."""

    spec: ModelSpec
    cluster: ClusterProfile
    workload: Workload
    gpus: int
    runtime: str = "moerun"  # whose kernels, launches and loops are costed: moerun | deepspeed
    scales: Scales = Scales()
    teacher: ModelSpec | None = None  # a Mixture-of-Students' teacher, run forward each step

    @property
    def gpus_per_node(self) -> int:
        return min(self.cluster.gpus_per_node, self.gpus)

    @property
    def nodes(self) -> int:
        return ceil(self.gpus / self.gpus_per_node)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.workload.dtype]

    @property
    def residual_bytes(self) -> int:
        """Bytes per element of the residual stream: moerun trains under autocast, whose
        residual stream (embedding + projections) and layer-norm inputs stay fp32."""
        train = self.workload.mode == "train"
        return 4 if (self.runtime == "moerun" and train) else self.dtype_bytes

    @cached_property
    def state(self) -> TrainState:
        """The training state per parameter in the runtime's precision layout
        (`memory.train_state`); in inference the weights in the plan's dtype, nothing else."""
        w = self.workload
        if w.mode != "train":
            return TrainState(self.dtype_bytes, 0, 0, 0, 0, False)
        return train_state(w.dtype, self.runtime, w.zero_stage)

    @cached_property
    def layers_per_moe_layer(self) -> float:
        """The model's layers per MoE layer (a PR-MoE: 2), counted once per environment."""
        return self.spec.num_layers / max(1, len(self.spec.moe_layers))

    def span(self, size: int, stride: int) -> coll.GroupSpan:
        return coll.group_span(size, stride, self.gpus_per_node)

    def ep_stride(self, es: int, tp: int) -> int:
        """Ranks between neighbours of an expert-parallel group: `es` in moerun's layout; in
        DeepSpeed's training, whose expert-parallel groups lie within a data-parallel group
        (ranks of one tp index: utils/groups.py `_get_expert_parallel_ranks`), tp (its es is 1
        or tp)."""
        if is_deepspeed(self.runtime) and self.workload.mode == "train":
            return max(es, tp)
        return es

    def expert_dp_group(self, c: LayerChoice, tp: int) -> tuple[int, int]:
        """(ranks, stride) of the group an expert's gradients are reduced and its states
        sharded over: N / (ep · s) ranks, ep · s apart (s: `ep_stride`)."""
        stride = c.ep * self.ep_stride(c.es, tp)
        return self.gpus // stride, stride


@dataclass(frozen=True, order=True)
class LayerChoice:
    """Per-MoE-layer degrees; dense layers use `DENSE`."""

    ep: int
    es: int
    a2a: str
    coordinated: bool

    def edp(self, gpus: int) -> int:
        return gpus // (self.ep * self.es)


DENSE = LayerChoice(ep=1, es=1, a2a="none", coordinated=False)


@dataclass(frozen=True)
class Pass:
    """One forward pass: tokens per data-parallel rank and the attention context per token."""

    tokens: int
    context: int
    decode: bool


@dataclass
class LayerCost:
    phases: dict[str, float] = field(default_factory=dict)  # seconds (per step / per token)
    comm_bytes: dict[str, float] = field(default_factory=dict)  # bytes per GPU per operation
    memory: dict[str, float] = field(default_factory=dict)  # persistent bytes per GPU
    transient_bytes: float = 0.0  # working memory while this layer runs
    # the framework's fixed seconds inside each communication phase (same units as `phases`),
    # kept apart so the simulator rescales only the collective itself
    fixed: dict[str, float] = field(default_factory=dict)

    @property
    def time_s(self) -> float:
        return sum(self.phases.values())

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())
