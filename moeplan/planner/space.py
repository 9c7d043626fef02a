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
  ranks on each (otherwise it is the flat one) and the runtime has it (`a2a_algorithms`: not
  DeepSpeed's training nor today's DeepSpeed); TP-coordination only where tp > 1, and always
  there under DeepSpeed (`coordination`); DeepSpeed's training slices experts only over tp
  (`slices_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from math import isqrt

from moeplan.cost_models.env import Env, LayerChoice
from moeplan.cost_models.runtimes import a2a_algorithms, coordination, slices_experts
from moeplan.spec.errors import ConfigError
from moeplan.spec.workload import Setting


@dataclass(frozen=True)
class Fix:
    """Degrees the user fixed (`moeplan search --fix KEY=VALUE`); None leaves one to the search.
    Fixing all of them costs one configuration. `ep` above a layer's expert count means ep = E
    there (DeepSpeed 0.6 clamps it so)."""

    tp: int | None = None
    ep: int | None = None
    es: int | None = None
    edp: int | None = None
    a2a: str | None = None
    coordinated: bool | None = None
    micro_batch: int | None = None
    recompute: bool | None = None

    def text(self) -> str:
        return " ".join(f"--fix {KEYS_BY_FIELD[f.name]}={_show(getattr(self, f.name))}"
                        for f in fields(self) if getattr(self, f.name) is not None)

    def ep_for(self, experts: int) -> int | None:
        return None if self.ep is None else min(self.ep, experts)


NO_FIX = Fix()
FIX_KEYS = {"tp": "tp", "ep": "ep", "es": "es", "edp": "edp", "a2a": "a2a",
            "tp-coordinated": "coordinated", "micro-batch": "micro_batch",
            "recompute": "recompute"}
KEYS_BY_FIELD = {v: k for k, v in FIX_KEYS.items()}
BOOLS = {"true": True, "false": False}


def _show(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def parse_fix(items: list[str] | tuple[str, ...]) -> Fix:
    """`KEY=VALUE` items -> Fix; a bad item raises ConfigError naming it."""
    values: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name = FIX_KEYS.get(key.strip())
        if not sep or name is None:
            raise ConfigError(f"--fix {item!r}: expected KEY=VALUE with KEY one of "
                              f"{', '.join(FIX_KEYS)}")
        raw = raw.strip().lower()
        if name in values:
            raise ConfigError(f"--fix {key} is given twice")
        if name == "a2a":
            if raw not in ("flat", "hierarchical"):
                raise ConfigError(f"--fix a2a={raw}: expected flat or hierarchical")
            values[name] = raw
        elif name in ("coordinated", "recompute"):
            if raw not in BOOLS:
                raise ConfigError(f"--fix {key}={raw}: expected true or false")
            values[name] = BOOLS[raw]
        else:
            if not raw.isdigit() or not 0 < int(raw) <= 2**20:
                raise ConfigError(f"--fix {key}={raw}: expected a positive whole number")
            values[name] = int(raw)
    return Fix(**values)


def divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, O(√n)."""
    small = [d for d in range(1, isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def tp_degrees(env: Env) -> list[int]:
    """Tensor-slicing degrees within a node that split the heads, the FFN widths and the world;
    grouped-query attention's kv heads split over tp or are replicated within it."""
    spec, G = env.spec, env.gpus_per_node
    g = spec.kv_heads or spec.heads
    return [t for t in divisors(G)
            if spec.heads % t == 0 and spec.ffn_hidden % t == 0 and env.gpus % t == 0
            and spec.shared_ffn_hidden % t == 0 and (g % t == 0 or t % g == 0)]


def micro_batches(per_rank: int, fixed: int | None, cap: int = 64) -> list[int]:
    """Micro-batch sizes that split `per_rank` sequences evenly (all divisors up to `cap`)."""
    if fixed is not None:
        return [fixed] if per_rank % fixed == 0 else []
    return [d for d in divisors(per_rank) if d <= cap]


def settings(env: Env, global_batch: int | None, micro_batch: int | None,
             infer_batches: list[int] | None = None, fix: Fix = NO_FIX) -> list[Setting]:
    """Every valid global setting, in a deterministic order.

    Train: global_batch sequences split over dp ranks and micro-batches; recomputation on or off.
    Infer: micro_batch = sequences per dp rank = global_batch / dp; when the global batch is free
    (throughput objective), every per-rank batch in `infer_batches`.
    """
    out: list[Setting] = []
    micro_batch = micro_batch if fix.micro_batch is None else fix.micro_batch
    for tp in tp_degrees(env):
        if fix.tp is not None and tp != fix.tp:
            continue
        dp = env.gpus // tp
        if env.workload.mode == "train":
            if global_batch % dp:
                continue
            for mb in micro_batches(global_batch // dp, micro_batch):
                for recompute in (False, True):
                    if fix.recompute in (None, recompute):
                        out.append(Setting(tp=tp, dp=dp, micro_batch=mb, recompute=recompute))
        elif global_batch is not None:
            if global_batch % dp == 0:
                out.append(Setting(tp=tp, dp=dp, micro_batch=global_batch // dp, recompute=False))
        else:
            for b in infer_batches or [1]:
                out.append(Setting(tp=tp, dp=dp, micro_batch=b, recompute=False))
    return out


def layer_choices(env: Env, s: Setting, experts: int, fix: Fix = NO_FIX) -> list[LayerChoice]:
    """Every valid (ep, es, a2a, coordinated) for a MoE layer of `experts` experts that agrees
    with the fixed degrees."""
    N, G, f = env.gpus, env.gpus_per_node, env.spec.expert_ffn
    out: list[LayerChoice] = []
    for ep in divisors(experts):
        if fix.ep is not None and ep != fix.ep_for(experts):
            continue
        for es in (divisors(G) if ep == experts else [1]):
            size = ep * es
            if N % size or f % es or not (G % size == 0 or size % G == 0):
                continue
            if fix.es not in (None, es) or fix.edp not in (None, N // size):
                continue
            if not slices_experts(env.runtime, env.workload.mode, es, s.tp):
                continue
            stride = env.ep_stride(es, s.tp)
            if N % (ep * stride):  # DeepSpeed's training: ep divides the data-parallel degree
                continue
            span = env.span(ep, stride)
            algos = (a2a_algorithms(env.runtime, env.workload.mode)
                     if span.nodes > 1 and span.per_node > 1 else ("flat",))
            for a2a in algos:
                for coordinated in coordination(env.runtime, s.tp):
                    if fix.a2a in (None, a2a) and fix.coordinated in (None, coordinated):
                        out.append(LayerChoice(ep=ep, es=es, a2a=a2a, coordinated=coordinated))
    return out
