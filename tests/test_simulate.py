"""Flow simulator: max-min fairness, shortest paths on the topology graph, agreement with the
analytic model where nothing is shared, and slower where links are shared or routing is skewed."""

from __future__ import annotations

import random

import networkx as nx
import pytest
from tolerance import F64_REL

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.env import Env
from moeplan.planner.planning import Request, plan
from moeplan.planner.simulate import Simulator, links_for, max_min_rates, sample_loads, transfer_s
from moeplan.spec import layout as L
from moeplan.spec import load_cluster, load_model
from moeplan.spec.cluster import topology_graph
from moeplan.spec.workload import Workload


def env_for(cluster: str, gpus: int, **changes) -> Env:
    c = load_cluster(cluster)
    if changes:
        c = c.model_validate({**c.model_dump(), **changes})
    w = Workload(mode="train", global_batch=gpus, micro_batch=1, seq_len=2048, dtype="bf16")
    return Env(load_model("1.3b-pr-moe"), c, w, gpus)


def test_max_min_fair_rates():
    # two flows share link 0 (capacity 10); flow 1 also crosses link 1 (capacity 2)
    rates = max_min_rates([(0,), (0, 1)], [10.0, 2.0], [0, 1])
    assert rates[1] == pytest.approx(2.0, rel=F64_REL) and rates[0] == pytest.approx(8.0, rel=F64_REL)


def test_paths_are_shortest_paths_of_the_topology_graph():
    env = env_for("ndv4-a100-40gb", 16)
    links = links_for(env)
    g = topology_graph(env.cluster, 2)
    for a, b in [(0, 5), (0, 8), (3, 12), (15, 7)]:
        hops = len(links.path(a, b))
        assert hops == nx.shortest_path_length(g, f"gpu{a}", f"gpu{b}")


@pytest.mark.parametrize("gpus, ep, algo", [(8, 8, "flat"), (64, 64, "flat"),
                                              (64, 64, "hierarchical"), (64, 16, "flat")])
def test_contention_free_all_to_all_equals_the_analytic_model(gpus, ep, algo):
    env = env_for("ndv4-a100-40gb", gpus)
    sim = Simulator(env)
    nbytes = 32e6
    analytic = coll.all_to_all_s(nbytes, env.span(ep, 1), env.cluster, algo)
    simulated = sim.all_to_all_s(L.ep_groups(gpus, ep, 1), nbytes, algo)
    assert simulated == pytest.approx(analytic, rel=1e-6)


def test_ring_allreduce_equals_the_analytic_model():
    env = env_for("ndv4-a100-40gb", 32)
    sim = Simulator(env)
    for groups, size, stride in [(L.tp_groups(32, 8), 8, 1), (L.dp_groups(32, 1), 32, 1)]:
        analytic = coll.allreduce_s(64e6, env.span(size, stride), env.cluster)
        assert sim.allreduce_s(groups, 64e6) == pytest.approx(analytic, rel=1e-6)


def test_shared_links_make_the_simulation_slower():
    # PCIe between GPU and NIC slower than the NIC share: the analytic model does not see it
    slow_host = {"host": {**load_cluster("ndv4-a100-40gb").host.model_dump(),
                          "bandwidth_Bps": 5e9}}
    env = env_for("ndv4-a100-40gb", 64, **slow_host)
    sim = Simulator(env)
    analytic = coll.all_to_all_s(32e6, env.span(64, 1), env.cluster, "flat")
    assert sim.all_to_all_s(L.ep_groups(64, 64, 1), 32e6, "flat") > 1.5 * analytic
    # one NIC for the 8 GPUs of a node: eight flows through it take eight times as long
    flows = [(r, 8 + r, 1e6) for r in range(8)]
    links = links_for(env_for("ndv4-a100-40gb", 16, nics_per_node=1))
    assert transfer_s(flows, links) == pytest.approx(8 * transfer_s(flows[:1], links), rel=F64_REL)


def test_skewed_routing_drops_more_and_slows_dropless_models():
    rng = random.Random(0)
    uniform = sample_loads(64, 64_000, 0.0, rng)
    skewed = sample_loads(64, 64_000, 2.0, rng)
    assert max(skewed) > 2 * max(uniform)
    spec = load_model("350m-pr-moe")
    cluster = load_cluster("ndv4-a100-40gb")
    r = Request(gpus=16, global_batch=64, seq_len=1024)
    base, _ = plan(spec, cluster, r)
    skew, _ = plan(spec, cluster, Request(gpus=16, global_batch=64, seq_len=1024,
                                          routing_skew=2.0))
    assert max(l.predicted.dropped_fraction or 0 for l in skew.layers) > max(
        l.predicted.dropped_fraction or 0 for l in base.layers)
    dropless = spec.model_copy(update={"drop_tokens": False})
    p0, _ = plan(dropless, cluster, r)
    p1, _ = plan(dropless, cluster, Request(gpus=16, global_batch=64, seq_len=1024,
                                            routing_skew=2.0))
    assert p1.predicted.simulated_time_s > 1.05 * p0.predicted.simulated_time_s


def test_plan_records_both_predictions():
    p, result = plan(load_model("1.3b-pr-moe"), load_cluster("ndv4-a100-40gb"), Request(gpus=64))
    assert p.predicted.simulated_time_s == pytest.approx(p.predicted.step_time_s, rel=0.05)
    assert p.predicted.simulated_candidates == 16
    assert all(l.predicted.simulated_s is not None for l in p.layers)
    path = p.predicted.simulated_critical_path
    seconds = [float(entry.split()[1]) / 1e3 for entry in path]
    assert seconds == sorted(seconds, reverse=True)
    assert sum(seconds) == pytest.approx(p.predicted.simulated_time_s, rel=1e-3)
    assert result.simulated is not None
    off, _ = plan(load_model("1.3b-pr-moe"), load_cluster("ndv4-a100-40gb"),
                  Request(gpus=64, simulate_top=0))
    assert off.predicted.simulated_time_s is None


# ----------------------------------------------------------------- leaf/spine fabrics
def fabric_env(gpus: int, **fabric) -> Env:
    return env_for("ndv4-a100-40gb", gpus, fabric=fabric)


def test_leaf_spine_paths_are_shortest_paths_and_cross_the_spine_only_between_leaves():
    env = fabric_env(32, nodes_per_leaf=2, oversubscription=2.0)
    links = links_for(env)
    g = topology_graph(env.cluster, 4)
    assert g.edges["pod0/leaf", "spine"]["bandwidth_Bps"] == pytest.approx(
        2 * 8 * env.cluster.inter.bandwidth_Bps / 2, rel=F64_REL)
    for a, b in [(0, 5), (0, 8), (3, 12), (0, 16), (31, 2)]:
        path = nx.shortest_path(g, f"gpu{a}", f"gpu{b}")
        assert len(links.path(a, b)) == len(path) - 1
        assert ("spine" in path) == (a // 16 != b // 16)


def test_rail_optimised_fabric_keeps_same_index_traffic_on_its_rail():
    env = fabric_env(32, nodes_per_leaf=4, rail_optimized=True)
    g = topology_graph(env.cluster, 4)
    links = links_for(env)
    up = {links.index[("pod0/rail0", "spine")], links.index[("spine", "pod0/rail1")]}
    assert not up & set(links.path(0, 24))  # local index 0 on both nodes: rail 0's leaf
    assert up <= set(links.path(0, 25))  # rail 0 to rail 1: over the spine (no NVLink detour)
    for a, b in [(0, 24), (0, 25), (7, 9)]:
        assert len(links.path(a, b)) == nx.shortest_path_length(g, f"gpu{a}", f"gpu{b}")


def test_two_to_one_spine_slows_inter_rack_exchanges_as_predicted():
    """4 nodes of 8 GPUs, 2 nodes under each leaf, 2:1 uplinks. A flat all-to-all over all 32:
    every GPU sends 16 of its 32 slices to the other rack, 256 slices of nbytes/32 up each leaf,
    whose uplink carries 16 NIC ports / 2 = 8 ports' worth: nbytes / port seconds, where the
    non-blocking fabric takes its NIC's 24 remote slices: 0.75 nbytes / port — 4/3 as long. An
    exchange inside one rack (the 16 GPUs under one leaf) does not slow down."""
    nbytes = 64e6
    flat, blocked = fabric_env(32), fabric_env(32, nodes_per_leaf=2, oversubscription=2.0)
    port = links_for(flat).caps[links_for(flat).index[("node0/nic0", "fabric")]]
    lat, _ = coll.all_to_all_flat_parts(nbytes, flat.span(32, 1), flat.cluster)
    hand = {"nonblocking": lat + 0.75 * nbytes / port, "2:1": lat + nbytes / port}
    for env, key in [(flat, "nonblocking"), (blocked, "2:1")]:
        analytic = coll.all_to_all_s(nbytes, env.span(32, 1), env.cluster, "flat")
        simulated = Simulator(env).all_to_all_s(L.ep_groups(32, 32, 1), nbytes, "flat")
        assert analytic == pytest.approx(hand[key], rel=1e-9)
        assert simulated == pytest.approx(hand[key], rel=1e-6)
    inside = [Simulator(env).all_to_all_s(L.ep_groups(32, 16, 1), nbytes, "flat")
              for env in (flat, blocked)]
    assert inside[1] == pytest.approx(inside[0], rel=1e-9)
    assert coll.all_to_all_s(nbytes, blocked.span(16, 1), blocked.cluster, "flat") == \
        pytest.approx(inside[0], rel=1e-6)


@pytest.mark.parametrize("fabric", [dict(nodes_per_leaf=2, oversubscription=3.0),
                                    dict(nodes_per_leaf=2, oversubscription=3.0,
                                         rail_optimized=True),
                                    dict(nodes_per_leaf=4, oversubscription=2.0,
                                         rail_optimized=True),
                                    dict(nodes_per_leaf=8, oversubscription=2.0,
                                         rail_optimized=True)])
@pytest.mark.parametrize("algo", ["flat", "hierarchical"])
def test_analytic_spine_factor_matches_the_simulated_fabric(fabric, algo):
    env = fabric_env(64, **fabric)
    nbytes = 32e6
    analytic = coll.all_to_all_s(nbytes, env.span(64, 1), env.cluster, algo)
    simulated = Simulator(env).all_to_all_s(L.ep_groups(64, 64, 1), nbytes, algo)
    assert simulated == pytest.approx(analytic, rel=1e-6)
    ring = coll.allreduce_s(nbytes, env.span(64, 1), env.cluster)
    assert Simulator(env).allreduce_s(L.dp_groups(64, 1), nbytes) == pytest.approx(ring, rel=1e-6)


def test_hierarchical_exchange_gains_from_rails_where_the_spine_is_thin():
    """Rail-optimised, 2:1: the hierarchical exchange's inter-node step stays on each rail's
    leaf inside a unit of 8 nodes, while the flat exchange crosses the spine for 7/8 of it."""
    env = fabric_env(64, nodes_per_leaf=8, oversubscription=2.0, rail_optimized=True)
    open_ = fabric_env(64)
    nbytes = 32e6
    for algo, slower in [("flat", True), ("hierarchical", False)]:
        t = coll.all_to_all_s(nbytes, env.span(64, 1), env.cluster, algo)
        t0 = coll.all_to_all_s(nbytes, open_.span(64, 1), open_.cluster, algo)
        assert (t > 1.5 * t0) == slower and t >= t0 * (1 - 1e-12)
