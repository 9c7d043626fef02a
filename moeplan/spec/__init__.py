"""The ground floor, importing nothing else of moeplan: what every other package agrees on.

Model and cluster specs and the built-in zoo (`model`, `cluster`, `zoo`, `data/`), the workload
and global setting (`workload`), the contracts between planner, runtime and validate (`plan`:
plan.json, `record`: run.json, `layout`: the rank layout), the phase vocabulary (`phases`), the
errors every command reports (`errors`) and atomic output files (`files`)."""

from moeplan.spec.cluster import DTYPE_BYTES, ClusterProfile, topology_graph
from moeplan.spec.model import ModelSpec
from moeplan.spec.zoo import cluster_names, load_cluster, load_model, model_names

__all__ = [
    "DTYPE_BYTES", "ClusterProfile", "ModelSpec", "topology_graph",
    "cluster_names", "load_cluster", "load_model", "model_names",
]
