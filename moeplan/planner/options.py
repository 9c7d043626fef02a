"""One layer's costed options under one global setting, and a complete candidate plan."""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.cost_models import step
from moeplan.cost_models.env import DENSE, Env, LayerChoice, LayerCost
from moeplan.planner import knapsack
from moeplan.planner.space import NO_FIX, Fix, layer_choices
from moeplan.spec.workload import Setting


@dataclass
class Evaluated:
    """One costed option of one layer under one setting."""

    choice: LayerChoice
    cost: LayerCost
    prefill_s: float = 0.0

    @property
    def item(self) -> knapsack.Item:
        return knapsack.Item(self.cost.time_s, self.cost.memory_bytes, self.cost.transient_bytes)


@dataclass
class Candidate:
    """A complete plan: one setting, one evaluated option per layer, the head."""

    setting: Setting
    layers: list[Evaluated]
    head: LayerCost
    time_s: float
    memory_bytes: float

    @property
    def global_batch(self) -> int:
        return self.setting.dp * self.setting.micro_batch

    def tokens_per_s(self, env: Env) -> float:
        if env.workload.mode == "train":
            return env.workload.global_batch * env.workload.seq_len / self.time_s
        return self.global_batch / self.time_s


def evaluate(env: Env, s: Setting, index: int, choice: LayerChoice) -> Evaluated:
    if env.workload.mode == "train":
        return Evaluated(choice, step.train_layer(env, s, index, choice))
    decode, prefill = step.infer_layer(env, s, index, choice)
    return Evaluated(choice, decode, prefill.time_s)


def layer_options(env: Env, s: Setting, fix: Fix = NO_FIX) -> dict[int, list[Evaluated]]:
    """Costed options for every layer index (identical layers share one list)."""
    by_experts: dict[int, list[Evaluated]] = {}
    out = {}
    for index, E in enumerate(env.spec.experts):
        if E not in by_experts:
            choices = [DENSE] if E == 0 else layer_choices(env, s, E, fix)
            by_experts[E] = [evaluate(env, s, index, c) for c in choices]
        out[index] = by_experts[E]
    return out
