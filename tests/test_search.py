"""The search is exact: it equals brute force over every plan on small instances."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tolerance import F64_REL

from moeplan.cost_models.step import head_cost
from moeplan.planner import knapsack
from moeplan.planner.planning import Request, make_env, plan
from moeplan.planner.search import INFER_BATCHES, layer_options
from moeplan.planner.space import settings
from moeplan.spec import load_cluster, load_model
from moeplan.spec.errors import ConfigError, InfeasibleError
from moeplan.spec.plan import Plan
from tests.conftest import small_cluster, tiny_spec


def all_plans(env, global_batch, micro_batch):
    """(time, memory, tokens/s, setting) of every plan of the instance, fitting or not."""
    out = []
    for s in settings(env, global_batch, micro_batch, INFER_BATCHES):
        head = head_cost(env, s)
        opts = layer_options(env, s)
        for combo in itertools.product(*(opts[i] for i in range(env.spec.num_layers))):
            mem = (head.memory_bytes + sum(o.cost.memory_bytes for o in combo)
                   + max([head.transient_bytes] + [o.cost.transient_bytes for o in combo]))
            t = head.time_s + sum(o.cost.time_s for o in combo)
            tps = (env.workload.global_batch * env.workload.seq_len / t
                   if env.workload.mode == "train" else s.dp * s.micro_batch / t)
            out.append((t, mem, tps, s))
    return out


def budgets(plans):
    mems = sorted(m for _, m, _, _ in plans)
    return [mems[int(q * (len(mems) - 1))] for q in (0.0, 0.05, 0.2, 0.5, 1.0)]


CASES = [
    dict(mode="train", global_batch=16),
    dict(mode="train", global_batch=16, zero_stage=0),
    dict(mode="infer", global_batch=8, prompt_len=64, gen_len=32),
    dict(mode="infer", objective="throughput", slo_ms=1.0, prompt_len=64, gen_len=32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("experts", [(0, 4, 0, 8), (4, 4, 8)])
def test_search_equals_brute_force(case, experts):
    spec = tiny_spec(experts=experts)
    probe_env, objective = make_env(spec, small_cluster(), Request(gpus=8, **case))
    gb = probe_env.workload.global_batch if "global_batch" in case else None
    plans = all_plans(probe_env, gb, None)
    for budget in budgets(plans):
        cluster = small_cluster(memory_bytes=int(budget) + 1)
        fits = [p for p in plans if p[1] <= cluster.device.usable_bytes]
        if objective.slo_s is not None:
            fits = [p for p in fits if p[0] <= objective.slo_s]
        if not fits:
            with pytest.raises(InfeasibleError):
                plan(spec, cluster, Request(gpus=8, **case))
            continue
        got, _ = plan(spec, cluster, Request(gpus=8, **case))
        assert got.predicted.memory_per_gpu_bytes <= cluster.device.usable_bytes
        if objective.name == "throughput" and case["mode"] == "infer":
            assert got.predicted.tokens_per_s == pytest.approx(max(p[2] for p in fits), rel=1e-9)
        else:
            t = got.predicted.step_time_s or got.predicted.latency_s
            assert t == pytest.approx(min(p[0] for p in fits), rel=1e-9)


# Memory in whole bytes, as in the planner; times as arbitrary floats.
items = st.builds(knapsack.Item, st.floats(0, 10), st.integers(0, 10).map(float),
                  st.integers(0, 5).map(float))


@hsettings(max_examples=150, deadline=None)
@given(st.lists(st.lists(items, min_size=1, max_size=4), min_size=1, max_size=4),
       st.integers(0, 40).map(float), st.integers(0, 3).map(float))
def test_knapsack_equals_brute_force(layers, budget, floor):
    best = None
    for combo in itertools.product(*layers):
        mem = sum(i.memory_bytes for i in combo) + max([floor] + [i.transient_bytes for i in combo])
        if mem <= budget:
            t = sum(i.time_s for i in combo)
            best = t if best is None else min(best, t)
    sol = knapsack.solve(layers, budget, floor_transient=floor)
    if best is None:
        assert sol is None
    else:
        assert sol is not None and sol.time_s == pytest.approx(best, abs=1e-9)
        chosen = [layers[i][k] for i, k in enumerate(sol.picks)]
        assert sum(i.memory_bytes for i in chosen) + max(
            [floor] + [i.transient_bytes for i in chosen]) <= budget + 1


def test_knapsack_ties_go_to_the_lexicographically_first_picks():
    """Two plans of equal time and memory: the one whose picks come first in lexicographic
    order, whatever order the frontier met them in."""
    layer = [knapsack.Item(1.0, 2.0, 0.0), knapsack.Item(2.0, 1.0, 0.0)]
    sol = knapsack.solve([layer, layer], 3.0)
    assert (sol.time_s, sol.memory_bytes, sol.picks) == (3.0, 3.0, (0, 1))
    three = knapsack.solve([layer, layer, layer], 5.0)  # (0, 0, 1), (0, 1, 0), (1, 0, 0) tie
    assert (three.time_s, three.picks) == (4.0, (0, 0, 1))


def test_plan_is_deterministic_and_valid():
    spec, cluster = load_model("1.3b-pr-moe"), load_cluster("ndv4-a100-40gb")
    a, _ = plan(spec, cluster, Request(gpus=64))
    b, _ = plan(spec, cluster, Request(gpus=64))
    assert a.to_json() == b.to_json()
    again = Plan.model_validate(json.loads(a.to_json()))
    assert again == a
    assert [l.index for l in a.layers] == list(range(1, 25))
    moe = [l for l in a.layers if l.kind == "moe"]
    assert len(moe) == 12 and all(l.ep * l.es * l.edp == 64 for l in moe)
    assert a.predicted.memory_per_gpu_bytes <= cluster.device.usable_bytes
    assert a.predicted.tokens_per_s == pytest.approx(512 * 2048 / a.predicted.step_time_s, rel=F64_REL)


def test_plan_rejects_inconsistent_degrees():
    p, _ = plan(tiny_spec(), small_cluster(), Request(gpus=8, mode="train", global_batch=16))
    data = json.loads(p.to_json())
    data["layers"][1]["ep"] = 3
    with pytest.raises(ValueError, match="layer 2"):
        Plan.model_validate(data)
    data = json.loads(p.to_json())
    data["parallel"]["dp"] = 3
    with pytest.raises(ValueError, match="tp"):
        Plan.model_validate(data)


def test_memory_model_rejects_what_cannot_fit():
    with pytest.raises(InfeasibleError) as e:
        plan(load_model("1.3b-moe-128"), load_cluster("ndv4-a100-40gb"), Request(gpus=4))
    msg = str(e.value)
    assert "does not fit on 4 x A100-SXM4-40GB" in msg and "expert" in msg and "\n" not in msg
    assert "40.0 GiB" in msg


def test_more_gpus_make_room():
    spec, cluster = load_model("1.3b-moe-128"), load_cluster("ndv4-a100-40gb")
    p, _ = plan(spec, cluster, Request(gpus=64))
    assert p.predicted.memory_per_gpu_bytes <= cluster.device.usable_bytes


def test_large_inference_search_is_exact_and_sane():
    p, r = plan(load_model("47b-moe-128"), load_cluster("ndv4-a100-40gb"),
                Request(gpus=4096, mode="infer"))
    assert p.predicted.latency_s > 0 and r.stats.plans_covered > 10 ** 40
    assert all(l.ep * l.es * l.edp == 4096 for l in p.layers if l.kind == "moe")


def test_batch_that_does_not_split_is_a_config_error():
    with pytest.raises(ConfigError, match="global-batch 100"):
        plan(load_model("1.3b-pr-moe"), load_cluster("ndv4-a100-40gb"),
             Request(gpus=64, global_batch=100))
