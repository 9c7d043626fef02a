"""The topology graph built from a cluster profile."""

from __future__ import annotations

import networkx as nx

from moeplan.spec import load_cluster, topology_graph


def test_graph_shape_and_paths():
    c = load_cluster("ndv4-a100-40gb")
    g = topology_graph(c, num_nodes=2)
    kinds = nx.get_node_attributes(g, "kind")
    assert sum(k == "gpu" for k in kinds.values()) == 16
    assert sum(k == "nic" for k in kinds.values()) == 16
    inside = nx.shortest_path(g, "gpu0", "gpu7")
    assert inside == ["gpu0", "node0/switch", "gpu7"]
    across = nx.shortest_path(g, "gpu0", "gpu8")
    assert "fabric" in across and any("nic" in n for n in across)
    nic_edge = g.edges["node0/nic0", "fabric"]
    assert nic_edge["bandwidth_Bps"] == c.inter.bandwidth_Bps
