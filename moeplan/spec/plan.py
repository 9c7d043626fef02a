"""`Plan`: the contract between planner and runtime (versioned pydantic model, deterministic JSON).

Layer numbers in a plan are 1-based, as in the paper ("MoE on layers 2, 4, …, 24").
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.spec.model import ModelSpec
from moeplan.spec.workload import Workload

SCHEMA_VERSION = 1


def digest(obj: BaseModel | dict) -> str:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ClusterRef(_Frozen):
    name: str
    device: str
    gpus: int = Field(gt=0)
    gpus_per_node: int = Field(gt=0)
    nodes: int = Field(gt=0)
    profile_digest: str


class Objective(_Frozen):
    name: Literal["throughput", "latency"]
    slo_ms: float | None = None


class Parallel(_Frozen):
    tp: int = Field(gt=0, description="tensor-slicing degree of non-expert weights")
    dp: int = Field(gt=0, description="data-parallel degree of non-expert weights")
    activation_checkpointing: bool = False


class LayerPrediction(_Frozen):
    time_s: float
    phases_s: dict[str, float]
    comm_bytes: dict[str, float]
    memory_bytes: dict[str, float]
    transient_bytes: float
    prefill_s: float | None = None
    simulated_s: float | None = Field(None, description="the simulator's time for this layer")
    dropped_fraction: float | None = Field(
        None, description="expected share of routed tokens dropped for capacity (simulated)")


class LayerPlan(_Frozen):
    index: int = Field(gt=0, description="1-based layer number")
    kind: Literal["dense", "moe"]
    experts: int | None = None
    ep: int | None = Field(None, gt=0)
    es: int | None = Field(None, gt=0)
    edp: int | None = Field(None, gt=0)
    a2a: Literal["flat", "hierarchical"] | None = None
    a2a_tp_coordinated: bool | None = None
    predicted: LayerPrediction
    runner_up: str | None = Field(None, description="next-best choice and how much slower it is")


class Band(_Frozen):
    """The headline figure (step time, or per-token latency) over the profile's spread: each
    group of calibrated terms at its p10 and its p90 (`ClusterProfile.spread`), the model
    re-costed, the groups' deviations combined in quadrature (independent terms)."""

    p10_s: float
    p90_s: float
    terms_s: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="each group's figure at its p10 and at its p90")


class Predicted(_Frozen):
    step_time_s: float | None = Field(None, gt=0, description="a training step (train plans)")
    latency_s: float | None = Field(None, gt=0, description="decode time per generated token "
                                                            "(inference plans)")
    prefill_s: float | None = None
    tokens_per_s: float
    memory_per_gpu_bytes: float
    memory_breakdown_bytes: dict[str, float]
    head_phases_s: dict[str, float]
    simulated_time_s: float | None = Field(
        None, description="step time (train) or per-token latency (infer) by the simulator")
    simulated_candidates: int = 0
    routing_skew: float | None = None
    simulated_critical_path: list[str] = Field(
        default_factory=list, description="where the simulated step goes: each phase summed over "
                                          "the layers, largest first (every rank runs the same "
                                          "sequence, so this is its critical path)")
    band: Band | None = Field(None, description="p10-p90 of the headline figure over the "
                                                "profile's spread (None: the profile has none)")


class SearchSummary(_Frozen):
    settings: int
    layer_options: int
    plans_covered: int


class Provenance(_Frozen):
    moeplan_version: str
    runtime: str = "moerun"  # whose kernels the predictions cost: moerun | deepspeed[-sparse]
    inputs_digest: str


def _check_layers(model: ModelSpec, layers: list[LayerPlan], N: int) -> None:
    if len(layers) != model.num_layers:
        raise ValueError(f"{len(layers)} layers for a {model.num_layers}-layer model")
    for i, layer in enumerate(layers, start=1):
        E = model.experts[i - 1]
        if layer.index != i or (layer.kind == "moe") != (E > 0):
            raise ValueError(f"layer {i} does not match the model (index/kind)")
        if layer.kind == "moe":
            if layer.experts != E or None in (layer.ep, layer.es, layer.edp, layer.a2a):
                raise ValueError(f"layer {i}: experts/ep/es/edp/a2a missing or wrong")
            if E % layer.ep or layer.ep * layer.es * layer.edp != N:
                raise ValueError(f"layer {i}: ep {layer.ep} × es {layer.es} × edp "
                                 f"{layer.edp} must equal {N} GPUs and ep divide {E}")
            if layer.es > 1 and layer.ep != E:
                raise ValueError(f"layer {i}: expert slicing (es {layer.es}) needs every "
                                 f"expert on its own rank (ep {layer.ep} = {E} experts)")


class Teacher(_Frozen):
    """A Mixture-of-Students plan's teacher: run forward on every micro-batch beside the
    student (the student's tp and dp; its MoE layers' degrees here), its predictions the
    forward's seconds per training step."""

    model: ModelSpec
    layers: list[LayerPlan]


class Plan(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelSpec
    cluster: ClusterRef
    workload: Workload
    objective: Objective
    parallel: Parallel
    layers: list[LayerPlan]
    predicted: Predicted
    search: SearchSummary
    notes: list[str] = []  # what the planner says about the request (e.g. a clamped --fix)
    provenance: Provenance
    teacher: Teacher | None = None  # Mixture-of-Students training: the teacher's forward

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        N = self.cluster.gpus
        if self.parallel.tp * self.parallel.dp != N:
            raise ValueError(f"tp {self.parallel.tp} × dp {self.parallel.dp} != {N} GPUs")
        w = self.workload
        if w.seq_len > self.model.max_seq_len:
            raise ValueError(f"workload seq_len {w.seq_len} exceeds the model's max_seq_len "
                             f"{self.model.max_seq_len}")
        if w.global_batch % (self.parallel.dp * w.micro_batch):
            raise ValueError(f"global_batch {w.global_batch} is not a multiple of dp "
                             f"{self.parallel.dp} × micro_batch {w.micro_batch}")
        _check_layers(self.model, self.layers, N)
        headline = "step_time_s" if w.mode == "train" else "latency_s"
        if getattr(self.predicted, headline) is None:  # what validate and export compare with
            raise ValueError(f"a {w.mode} plan without its predicted {headline}")
        if self.teacher is not None:
            t = self.teacher.model
            if self.workload.mode != "train":
                raise ValueError("a teacher belongs to a training plan")
            if t.vocab_size != self.model.vocab_size or t.max_seq_len < w.seq_len:
                raise ValueError(f"teacher {t.name} has another vocabulary or fewer positions "
                                 "than the student's workload")
            _check_layers(t, self.teacher.layers, N)
        return self

    def to_json(self) -> str:
        """Deterministic bytes: sorted keys, fixed indentation, trailing newline."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n"


__all__ = ["Plan", "LayerPlan", "Parallel", "Predicted", "Teacher", "digest", "SCHEMA_VERSION",
           "ModelSpec"]
