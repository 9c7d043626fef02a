"""The phase vocabulary: the names under which the cost model predicts a layer's work, the runtime
times it, the simulator replays it and `validate` compares it (the keys of plan.json and run.json),
and `LayerPhase`, the key of one layer's phase in the runtime's timers and the profile's tables."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Phase(str, Enum):
    ATTENTION = "attention"
    MLP = "mlp"
    GATE = "gate"
    DISPATCH = "dispatch"  # gather of tokens into the experts' capacity buffers
    EXPERTS = "experts"
    COMBINE = "combine"
    TP_COMM = "tp_comm"  # tensor-slicing allreduces
    DISPATCH_A2A = "dispatch_a2a"
    ES_COMM = "es_comm"  # expert-slicing gathers and reductions
    COMBINE_A2A = "combine_a2a"
    GRAD_SYNC = "grad_sync"
    OPTIMIZER = "optimizer"
    UNTIMED = "untimed"  # what the step takes beyond its timed phases
    WAIT = "wait"  # ranks taking turns on shared cores, handed on to the next collective
    HEAD = "head"  # embedding, final norm, logits and loss
    TEACHER = "teacher"  # a Mixture-of-Students teacher's forward (knowledge distillation)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{phase}": the name, without Enum's slower path


def _names(*phases: Phase) -> tuple[str, ...]:
    return tuple(p.value for p in phases)


COMPUTE = _names(Phase.ATTENTION, Phase.MLP, Phase.GATE, Phase.DISPATCH, Phase.EXPERTS,
                 Phase.COMBINE)
COMM = _names(Phase.TP_COMM, Phase.DISPATCH_A2A, Phase.ES_COMM, Phase.COMBINE_A2A)
EXCHANGE = _names(Phase.DISPATCH_A2A, Phase.COMBINE_A2A)  # in the order a layer runs them
EXPERT_WORK = _names(Phase.EXPERTS, Phase.DISPATCH, Phase.COMBINE)
STEP_END = _names(Phase.GRAD_SYNC, Phase.OPTIMIZER)  # once per step, after the last layer
WAITING = EXCHANGE + _names(Phase.GRAD_SYNC, Phase.UNTIMED, Phase.WAIT)  # where waits show


HEAD_LAYER = "head"  # the layer label of the embedding, final norm, logits and loss


class LayerPhase(NamedTuple):
    """One layer's phase: where the runtime's phase timers, the probe's tables and the roofline
    put seconds. `layer` is the 0-based layer index, or `HEAD_LAYER`."""

    layer: int | str
    phase: Phase


HEAD_PHASE = LayerPhase(HEAD_LAYER, Phase.HEAD)
