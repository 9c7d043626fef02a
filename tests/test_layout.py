"""Rank enumeration (pure, no processes): every group partitions the world as the layout says."""

from __future__ import annotations

import pytest

from moeplan.spec import layout as L


def partitions(groups, world):
    flat = sorted(r for g in groups for r in g)
    return flat == list(range(world))


@pytest.mark.parametrize("world,tp", [(8, 1), (8, 2), (16, 4), (4, 4)])
def test_tp_and_dp_groups(world, tp):
    tps, dps = L.tp_groups(world, tp), L.dp_groups(world, tp)
    assert partitions(tps, world) and partitions(dps, world)
    assert all(g == list(range(g[0], g[0] + tp)) for g in tps)
    assert all(len(set(g) & set(h)) == 1 for g in tps for h in dps)


@pytest.mark.parametrize("world,ep,es", [(8, 4, 1), (8, 4, 2), (16, 2, 2), (8, 8, 1), (4, 1, 1)])
def test_moe_groups_are_orthogonal(world, ep, es):
    lay = L.moe_layout(world, 4, ep, es, hierarchical=False)
    for groups, size in ((lay.ep, ep), (lay.es, es), (lay.edp, world // (ep * es))):
        assert partitions(groups, world) and all(len(g) == size for g in groups)
    assert all(len(set(a) & set(b)) <= 1 for a in lay.ep for b in lay.es)
    assert all(g == list(range(g[0], g[0] + es)) for g in lay.es)
    # ep groups have stride es
    assert all(b - a == es for g in lay.ep for a, b in zip(g, g[1:]))


def test_hierarchical_split():
    lay = L.moe_layout(8, 2, ep=8, es=1, hierarchical=True)
    assert lay.intra == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.inter == [[0, 2, 4, 6], [1, 3, 5, 7]]
    lay = L.moe_layout(8, 4, ep=4, es=2, hierarchical=True)
    assert lay.ep == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay.intra == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert lay.inter == [[0, 4], [2, 6], [1, 5], [3, 7]]


def test_uneven_nodes_rejected():
    with pytest.raises(ValueError, match="uneven"):
        L.split_by_node([0, 1, 2, 4], 4)
