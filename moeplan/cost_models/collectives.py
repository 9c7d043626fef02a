"""Collective times: alpha-beta per link tier, for groups laid out over nodes.

A group is `size` ranks with a fixed `stride` in a world whose ranks fill nodes of G GPUs in order.
`GroupSpan` says how many of them share a node (g) and how many nodes they cover (n).

Bandwidths: intra-node is the per-GPU NVLink port; inter-node is the node's NIC bandwidth divided by
its G GPUs, because every GPU of a node runs the same collective of the same layer at the same time,
so they share the NICs. Behind an oversubscribed leaf/spine fabric (`Fabric`) the inter-node
transfer of a group spanning leaves is longer by `spine_factor`. Where `moeplan profile` fitted a
collective on a tier, the fit replaces the link constants (its bandwidth is already effective, so no
efficiency is applied). Where it also timed both all-to-all algorithms over a group spanning nodes,
`exchange_scale` corrects the latency and the transfer parts of that algorithm's model by the fitted
factors (whether peers' messages overlap, what the hierarchical exchange's second call and
regrouping really cost). Where exchanges timed after the links idled came out shorter (a rate
limiter's token bucket, which the step's compute refills), an exchange after idle time is that much
shorter (`after_idle`).

All functions return seconds; `nbytes` is per rank and named for what it measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from moeplan.spec.cluster import ClusterProfile


@dataclass(frozen=True)
class GroupSpan:
    size: int
    per_node: int
    nodes: int


def group_span(size: int, stride: int, gpus_per_node: int) -> GroupSpan:
    """Span of ranks r0, r0+stride, …, r0+(size-1)·stride with r0 aligned to size·stride."""
    per_node = max(1, min(size, gpus_per_node // stride)) if stride <= gpus_per_node else 1
    return GroupSpan(size=size, per_node=per_node, nodes=ceil(size / per_node))


def tier_link(cluster: ClusterProfile, collective: str, tier: str) -> tuple[float, float]:
    """(latency_s, effective bytes/s per GPU) for one collective on one tier."""
    fit = cluster.fitted_for(collective, tier)
    if fit is not None:
        return fit.latency_s, fit.bandwidth_Bps
    if tier == "intra":
        link = cluster.intra
        return link.latency_s, link.bandwidth_Bps * link.efficiency
    return cluster.inter.latency_s, cluster.inter_Bps_per_gpu * cluster.inter.efficiency


def spine_factor(cluster: ClusterProfile, span: GroupSpan, pattern: str) -> float:
    """How much longer a group's inter-node transfer takes where its leaves' uplinks, not its
    NICs, limit it: c·o (at least 1), c the share of a node's inter-node bytes that leave its
    leaf, o the oversubscription. The group's nodes are consecutive from a leaf's first.

    pattern: `ring` (each node sends to the next: one node of each leaf's m sends out of it,
    c = 1/m), `same_rail` (every node to every other, between GPUs of one local index, as the
    hierarchical exchange's second step: c = (n-m)/(n-1)), `flat` (every GPU to every other:
    rail-optimised, a peer is also on my leaf only on my rail)."""
    fabric = cluster.fabric
    n = span.nodes
    if not fabric.blocking or n <= 1:
        return 1.0
    m = min(fabric.nodes_per_leaf or n, n)
    if pattern == "ring":
        leaving = 1.0 / m if n > m else 0.0
    else:
        same_rail = 1.0
        if pattern == "flat" and fabric.rail_optimized:
            same_rail = max(1, span.per_node // cluster.nics_per_node) / span.per_node
        leaving = 1.0 - same_rail * (m - 1) / (n - 1)
    return max(1.0, leaving * fabric.oversubscription)


def allgather_s(out_bytes: float, span: GroupSpan, cluster: ClusterProfile,
                collective: str = "allgather") -> float:
    """Hierarchical ring allgather of `out_bytes` (the gathered size) per rank.

    Inside a node each GPU receives (g-1)/g of the buffer over NVLink with g-1 steps; across nodes
    the g GPUs of a node share the (n-1)/n of the buffer that must cross, n-1 steps.
    Reduce-scatter moves the same bytes in the opposite direction.
    """
    if span.size <= 1 or out_bytes <= 0:
        return 0.0
    g, n = span.per_node, span.nodes
    t = 0.0
    if g > 1:
        lat, bw = tier_link(cluster, collective, "intra")
        t += (g - 1) * lat + out_bytes * (g - 1) / g / bw
    if n > 1:
        lat, bw = tier_link(cluster, collective, "inter")
        t += (n - 1) * lat + out_bytes * (n - 1) / n / g / bw * spine_factor(cluster, span, "ring")
    return t


def reduce_scatter_s(in_bytes: float, span: GroupSpan, cluster: ClusterProfile) -> float:
    return allgather_s(in_bytes, span, cluster, collective="reduce_scatter")


def allreduce_s(nbytes: float, span: GroupSpan, cluster: ClusterProfile) -> float:
    """Ring allreduce = reduce-scatter + allgather: 2(p-1)/p of the buffer per rank."""
    return 2.0 * allgather_s(nbytes, span, cluster, collective="allreduce")


def exchange_scale(cluster: ClusterProfile, algorithm: str, span: GroupSpan
                   ) -> tuple[float, float]:
    """(latency factor, transfer factor) that a measured profile fitted for this all-to-all
    algorithm over a group spanning nodes with several ranks on each (back to back); (1, 1)
    otherwise (one node:
    the intra-node fit is already the exchange itself; one rank per node: the inter-node fit)."""
    if span.nodes > 1 and span.per_node > 1:
        scale = cluster.exchange_for(algorithm)
        if scale is not None:
            return scale.latency_scale, scale.transfer_scale
    return 1.0, 1.0


def all_to_all_flat_parts(nbytes: float, span: GroupSpan, cluster: ClusterProfile
                          ) -> tuple[float, float]:
    """(latency, transfer) seconds of a flat all-to-all of `nbytes` per rank (1/p to each of p).

    One message per peer: latency grows with p (g-1 local peers, p-g remote ones); the local and the
    remote bytes travel at once on their own tiers, so the slower tier sets the transfer time.
    """
    p, g = span.size, span.per_node
    lat_i, bw_i = tier_link(cluster, "all_to_all", "intra")
    lat_e, bw_e = tier_link(cluster, "all_to_all", "inter")
    local_peers, remote_peers = g - 1, p - g
    latency = local_peers * lat_i + remote_peers * lat_e
    remote = nbytes * remote_peers / p / bw_e * spine_factor(cluster, span, "flat")
    transfer = max(nbytes * local_peers / p / bw_i, remote)
    return latency, transfer


def all_to_all_hierarchical_parts(nbytes: float, span: GroupSpan, cluster: ClusterProfile
                                  ) -> tuple[float, float]:
    """(latency, transfer) seconds of DeepSpeed-MoE's hierarchical all-to-all: intra-node
    exchange, layout transform, inter-node exchange (a group spanning nodes, several per node).

    Step 1 sends (g-1)/g of the buffer to the g-1 local peers so that each GPU holds what its node
    owes GPUs of the same local index elsewhere; a local copy (read + write) regroups it by
    destination node; step 2 sends (n-1)/n of it to the n-1 remote peers. Messages: (g-1) + (n-1)
    instead of p-1, at the price of moving the buffer twice.
    """
    g, n = span.per_node, span.nodes
    lat_i, bw_i = tier_link(cluster, "all_to_all", "intra")
    lat_e, bw_e = tier_link(cluster, "all_to_all", "inter")
    latency = (g - 1) * lat_i + cluster.device.op_overhead_s + (n - 1) * lat_e
    transfer = (nbytes * (g - 1) / g / bw_i + layout_transform_s(nbytes, cluster)
                + nbytes * (n - 1) / n / bw_e * spine_factor(cluster, span, "same_rail"))
    return latency, transfer


def layout_transform_s(nbytes: float, cluster: ClusterProfile) -> float:
    """The hierarchical exchange's regrouping by destination node: the buffer read and written
    once (its per-operation cost is counted with the latencies)."""
    device = cluster.device
    return 2.0 * nbytes / (device.hbm_Bps * device.hbm_efficiency)


def after_idle(t: float, parts: tuple[float, float], span: GroupSpan, cluster: ClusterProfile,
               algorithm: str, idle_s: float) -> float:
    """An exchange of back-to-back time `t` (model `parts`: latency, transfer) that starts after
    its links idled `idle_s`: a rate limiter whose token bucket refills while the step computes
    sends the first `credit_s` worth at line rate, so the exchange is `min(idle_s, credit_s)`
    shorter, down to what it measured fully rested (`ExchangeScale`). Unchanged where the
    profile saw no difference (no bucket) or did not time this algorithm over nodes."""
    scale = cluster.exchange_for(algorithm) if span.nodes > 1 and span.per_node > 1 else None
    if scale is None or idle_s <= 0 or scale.credit_s <= 0 or scale.rested_latency_scale is None:
        return t
    latency, transfer = parts
    rested = scale.rested_latency_scale * latency + scale.rested_transfer_scale * transfer
    return max(min(t, rested), t - min(idle_s, scale.credit_s))


def all_to_all_flat_s(nbytes: float, span: GroupSpan, cluster: ClusterProfile,
                      idle_s: float = 0.0) -> float:
    if span.size <= 1 or nbytes <= 0:
        return 0.0
    parts = all_to_all_flat_parts(nbytes, span, cluster)
    k_lat, k_bytes = exchange_scale(cluster, "flat", span)
    return after_idle(k_lat * parts[0] + k_bytes * parts[1], parts, span, cluster, "flat", idle_s)


def all_to_all_hierarchical_s(nbytes: float, span: GroupSpan, cluster: ClusterProfile,
                              idle_s: float = 0.0) -> float:
    if span.nodes <= 1 or span.per_node <= 1:
        return all_to_all_flat_s(nbytes, span, cluster, idle_s)
    if nbytes <= 0:
        return 0.0
    parts = all_to_all_hierarchical_parts(nbytes, span, cluster)
    k_lat, k_bytes = exchange_scale(cluster, "hierarchical", span)
    return after_idle(k_lat * parts[0] + k_bytes * parts[1], parts, span, cluster,
                      "hierarchical", idle_s)


def all_to_all_s(nbytes: float, span: GroupSpan, cluster: ClusterProfile, algorithm: str,
                 idle_s: float = 0.0) -> float:
    """A flat or hierarchical all-to-all of `nbytes` per rank, its links idle `idle_s` before."""
    if algorithm == "hierarchical":
        return all_to_all_hierarchical_s(nbytes, span, cluster, idle_s)
    return all_to_all_flat_s(nbytes, span, cluster, idle_s)
