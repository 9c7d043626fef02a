"""The sweep file (`moeplan sweep --out sweep.json`): every point a capacity sweep costed, with
the models, cluster profiles and options it used, so `moeplan report --sweep` can draw it, re-plan
its recommended points and test their sensitivity without the user's original files."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.spec.cluster import ClusterProfile
from moeplan.spec.model import ModelSpec
from moeplan.spec.plan import Plan

SWEEP_SCHEMA_VERSION = 1


class SweepRow(BaseModel):
    """One point: what it costs, or why it cannot run. Seconds, bytes, dollars, kWh."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    cluster: str
    gpus: int = Field(gt=0)
    nodes: int = Field(gt=0)
    mode: Literal["train", "infer"]
    per_gpu_batch: int | None = Field(None, gt=0, description="inference: sequences per GPU")
    feasible: bool
    limit: str = Field("", description="why the point cannot run, in one line")
    global_batch: int | None = None
    step_time_s: float | None = None
    latency_s: float | None = Field(None, description="per generated token")
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    memory_per_gpu_bytes: float | None = None
    degrees: str = Field("", description="tp, then each distinct MoE layer choice and its count")
    usd_per_gpu_hour: float | None = None
    usd_per_hour: float | None = None
    gpu_hours_per_m_tokens: float | None = Field(None, description="per million tokens "
                                                                   "trained or generated")
    usd_per_m_tokens: float | None = None  # the same GPU-hours at the price
    run_tokens: float | None = Field(None, description="training: tokens of the whole run")
    run_days: float | None = None
    run_gpu_hours: float | None = None
    run_usd: float | None = None
    run_energy_kwh_max: float | None = Field(None, description=(
        "GPU-hours times the boards' maximum power: an upper bound (GPUs only, no host, "
        "network or cooling)"))
    plan: Plan | None = None

    @model_validator(mode="after")
    def _costed(self) -> SweepRow:
        """A feasible point carries the figures every reader of the file relies on."""
        if self.feasible:
            need = ("global_batch", "tokens_per_s", "tokens_per_s_per_gpu",
                    "memory_per_gpu_bytes", "gpu_hours_per_m_tokens",
                    "step_time_s" if self.mode == "train" else "latency_s")
            missing = [name for name in need if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a feasible point needs {', '.join(missing)}")
        return self

    def table(self) -> dict:
        """The CSV's columns: everything but the plan."""
        return self.model_dump(exclude={"plan"})


COLUMNS = [name for name in SweepRow.model_fields if name != "plan"]


class SweepAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    mode: Literal["train", "infer"]
    met: bool
    point: int | None = Field(None, description="index into rows: the answer, or the closest")
    text: str


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    schema_version: Literal[1] = SWEEP_SCHEMA_VERSION
    options: dict
    target: dict[str, float | None] = Field(default_factory=dict)
    models: dict[str, ModelSpec]
    clusters: dict[str, ClusterProfile]
    rows: list[SweepRow]
    answers: list[SweepAnswer] = Field(default_factory=list)
