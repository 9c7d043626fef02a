"""Why nothing fits: the least-memory plan and the memory terms that break the budget."""

from __future__ import annotations

from collections import defaultdict

from moeplan.cost_models import step
from moeplan.cost_models.env import Env
from moeplan.planner.options import layer_options
from moeplan.planner.space import NO_FIX, Fix
from moeplan.spec.workload import Setting

GiB = 2.0 ** 30

TERM_NAMES = {
    "weights": "weights", "expert_weights": "expert weights", "gradients": "gradients",
    "expert_gradients": "expert gradients", "optimizer_states": "optimizer states",
    "expert_optimizer_states": "expert optimizer states", "activations": "activations",
    "kv_cache": "KV cache", "logits": "logits", "workspace": "one layer's working activations",
    "reduce_bucket": "DeepSpeed's gradient reduce bucket",
}


def describe_layers(numbers: list[int]) -> str:
    """1-based layer numbers as text: '1-24', '2,4..24', '3, 7, 8'."""
    if not numbers:
        return "none"
    if len(numbers) <= 2:
        return ", ".join(str(n) for n in numbers)
    step_ = numbers[1] - numbers[0]
    if all(b - a == step_ for a, b in zip(numbers, numbers[1:])):
        if step_ == 1:
            return f"{numbers[0]}-{numbers[-1]}"
        return f"{numbers[0]},{numbers[1]}..{numbers[-1]}"
    return ", ".join(str(n) for n in numbers)


def least_memory(env: Env, s: Setting,
                 fix: Fix = NO_FIX) -> tuple[float, dict[str, tuple[float, list[int]]]]:
    """Memory of the least-memory plan under setting `s`, by term, with the layers behind each."""
    options = layer_options(env, s, fix)
    terms: dict[str, list] = defaultdict(lambda: [0.0, []])
    head = step.head_cost(env, s)
    for k, v in head.memory.items():
        terms[k][0] += v
    transient, transient_layer = head.transient_bytes, None
    for i in range(env.spec.num_layers):
        o = min(options[i], key=lambda o: (o.cost.memory_bytes + o.cost.transient_bytes, o.choice))
        for k, v in o.cost.memory.items():
            terms[k][0] += v
            terms[k][1].append(i + 1)
        if o.cost.transient_bytes > transient:
            transient, transient_layer = o.cost.transient_bytes, i + 1
    if transient:
        terms["workspace"] = [transient, [transient_layer] if transient_layer else []]
    total = sum(v[0] for v in terms.values())
    return total, {k: (v[0], v[1]) for k, v in terms.items()}


def why_infeasible(env: Env, candidates: list[Setting], fix: Fix = NO_FIX) -> str:
    best = min(((least_memory(env, s, fix), s) for s in candidates),
               key=lambda x: (x[0][0], x[1]))
    (total, terms), s = best
    dev = env.cluster.device
    top = sorted(terms.items(), key=lambda kv: -kv[1][0])[:3]
    parts = []
    for name, (nbytes, layers) in top:
        where = f" in layers {describe_layers(layers)}" if layers else ""
        parts.append(f"{TERM_NAMES.get(name, name)} {nbytes / GiB:.1f} GiB{where}")
    fixed = f" with {fix.text()}" if fix != NO_FIX else ""
    return (f"{env.spec.name} does not fit on {env.gpus} x {dev.name}{fixed}: the least-memory plan "
            f"(tp={s.tp}, micro-batch {s.micro_batch}"
            f"{', recompute' if s.recompute else ''}) needs {total / GiB:.1f} GiB per GPU — "
            f"{'; '.join(parts)}; a GPU has {dev.memory_bytes / GiB:.1f} GiB "
            f"({dev.usable_bytes / GiB:.1f} GiB usable)")


def over_budget(env: Env, s: Setting, layer_costs: list, head) -> str:
    """Why a fixed configuration does not fit: its total and largest memory terms."""
    terms: dict[str, list] = defaultdict(lambda: [0.0, []])
    for k, v in head.memory.items():
        terms[k][0] += v
    for i, cost in enumerate(layer_costs):
        for k, v in cost.memory.items():
            terms[k][0] += v
            terms[k][1].append(i + 1)
    transient = max([head.transient_bytes] + [c.transient_bytes for c in layer_costs])
    if transient:
        terms["workspace"][0] = transient
    total = sum(v[0] for v in terms.values())
    top = sorted(terms.items(), key=lambda kv: -kv[1][0])[:3]
    parts = [f"{TERM_NAMES.get(k, k)} {b / GiB:.1f} GiB"
             + (f" in layers {describe_layers(layers)}" if layers else "")
             for k, (b, layers) in top]
    dev = env.cluster.device
    return (f"{env.spec.name} with tp={s.tp}, micro-batch {s.micro_batch} and the given expert "
            f"degrees needs {total / GiB:.1f} GiB per GPU on {dev.name} — {'; '.join(parts)}; "
            f"a GPU has {dev.usable_bytes / GiB:.1f} GiB usable")
