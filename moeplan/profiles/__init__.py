"""Inputs as data: model specs, cluster profiles, the built-in zoo and their loaders."""

from moeplan.profiles.cluster import DTYPE_BYTES, ClusterProfile, topology_graph
from moeplan.profiles.model import ModelSpec
from moeplan.profiles.zoo import cluster_names, load_cluster, load_model, model_names

__all__ = [
    "DTYPE_BYTES", "ClusterProfile", "ModelSpec", "topology_graph",
    "cluster_names", "load_cluster", "load_model", "model_names",
]
