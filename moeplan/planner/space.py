"""The search space: which global settings and per-MoE-layer choices are valid.

Rank layout (fixed, documented, and the same one the runtime builds its groups from):
  non-expert weights  rank = dp_index · tp + tp_index            (tp innermost: inside a node)
  MoE layer           rank = (edp_index · ep + ep_index) · es + es_index
so tensor-slicing and expert-slicing groups are consecutive ranks inside a node, an expert-parallel
group has stride es, and the expert-data-parallel group has stride ep·es.

Rules (each rejects a combination the layout or the model cannot express):
  tp divides the GPUs of a node and the attention heads and the FFN width; dp = N / tp.
  ep divides E; es > 1 only once ep = E (expert slicing is for GPUs that outnumber experts), and es
  divides the GPUs of a node and the FFN width; ep·es divides N and either divides the node size
  or is a multiple of it (groups never straddle a node boundary unevenly); edp = N / (ep·es).
  The hierarchical all-to-all is offered only where the ep group spans several nodes with several
  ranks on each (otherwise it is the flat one); TP-coordination only where tp > 1.
"""

from __future__ import annotations

from moeplan.cost_models.layer import Env, LayerChoice
from moeplan.cost_models.workload import Setting


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_degrees(env: Env) -> list[int]:
    spec, G = env.spec, env.gpus_per_node
    return [t for t in divisors(G)
            if spec.heads % t == 0 and spec.ffn_hidden % t == 0 and env.gpus % t == 0]


def micro_batches(per_rank: int, fixed: int | None, cap: int = 64) -> list[int]:
    """Micro-batch sizes that split `per_rank` sequences evenly (all divisors up to `cap`)."""
    if fixed is not None:
        return [fixed] if per_rank % fixed == 0 else []
    return [d for d in divisors(per_rank) if d <= cap]


def settings(env: Env, global_batch: int | None, micro_batch: int | None,
             infer_batches: list[int] | None = None) -> list[Setting]:
    """Every valid global setting, in a deterministic order.

    Train: global_batch sequences split over dp ranks and micro-batches; recomputation on or off.
    Infer: micro_batch = sequences per dp rank = global_batch / dp; when the global batch is free
    (throughput objective), every per-rank batch in `infer_batches`.
    """
    out: list[Setting] = []
    for tp in tp_degrees(env):
        dp = env.gpus // tp
        if env.workload.mode == "train":
            if global_batch % dp:
                continue
            for mb in micro_batches(global_batch // dp, micro_batch):
                for recompute in (False, True):
                    out.append(Setting(tp=tp, dp=dp, micro_batch=mb, recompute=recompute))
        elif global_batch is not None:
            if global_batch % dp == 0:
                out.append(Setting(tp=tp, dp=dp, micro_batch=global_batch // dp, recompute=False))
        else:
            for b in infer_batches or [1]:
                out.append(Setting(tp=tp, dp=dp, micro_batch=b, recompute=False))
    return out


def layer_choices(env: Env, s: Setting, experts: int) -> list[LayerChoice]:
    """Every valid (ep, es, a2a, coordinated) for a MoE layer of `experts` experts."""
    N, G, f = env.gpus, env.gpus_per_node, env.spec.ffn_hidden
    out: list[LayerChoice] = []
    for ep in divisors(experts):
        for es in (divisors(G) if ep == experts else [1]):
            size = ep * es
            if N % size or f % es or not (G % size == 0 or size % G == 0):
                continue
            span = env.span(ep, es)
            algos = ["flat", "hierarchical"] if span.nodes > 1 and span.per_node > 1 else ["flat"]
            for a2a in algos:
                for coordinated in ((False, True) if s.tp > 1 else (False,)):
                    out.append(LayerChoice(ep=ep, es=es, a2a=a2a, coordinated=coordinated))
    return out
