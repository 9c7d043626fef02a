"""The phase vocabulary: the names under which the cost model predicts a layer's work, the runtime
times it, the simulator replays it and `validate` compares it (the keys of plan.json and run.json)."""

from __future__ import annotations

from enum import Enum


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

    def __str__(self) -> str:
        return self.value


def _names(*phases: Phase) -> tuple[str, ...]:
    return tuple(p.value for p in phases)


COMPUTE = _names(Phase.ATTENTION, Phase.MLP, Phase.GATE, Phase.DISPATCH, Phase.EXPERTS,
                 Phase.COMBINE)
COMM = _names(Phase.TP_COMM, Phase.DISPATCH_A2A, Phase.ES_COMM, Phase.COMBINE_A2A)
EXCHANGE = _names(Phase.DISPATCH_A2A, Phase.COMBINE_A2A)  # in the order a layer runs them
EXPERT_WORK = _names(Phase.EXPERTS, Phase.DISPATCH, Phase.COMBINE)
STEP_END = _names(Phase.GRAD_SYNC, Phase.OPTIMIZER)  # once per step, after the last layer
WAITING = EXCHANGE + _names(Phase.GRAD_SYNC, Phase.UNTIMED, Phase.WAIT)  # where waits show
