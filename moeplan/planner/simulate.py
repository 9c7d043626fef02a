"""Flow-level simulation of a plan: communication as flows over the cluster's links with max-min
fair sharing, compute from the cost model, routing imbalance sampled from a skew.

Topology: the graph of `spec.cluster.topology_graph` — GPU -- NVSwitch inside a node, GPU --
PCIe -- NIC -- network across nodes (NICs round-robin over GPUs; the network one non-blocking
fabric, or leaf switches under a spine whose uplinks may be oversubscribed, rail-optimised or not).
Links are directed, one capacity per direction. A message from GPU a to GPU b follows its shortest
path:
  same node   a->switch, switch->b
  otherwise   a->nic(a), nic(a)->leaf(a), [leaf(a)->spine, spine->leaf(b),] leaf(b)->nic(b), nic(b)->b
(`test_simulate.py` checks these are the graph's shortest paths). Capacities are the analytic
model's per tier (the profile's fits), a leaf's uplink its NICs' over the oversubscription.

Collectives become the flows their algorithm sends — every group of the layer at once, so groups
that share a NIC share its bandwidth as they do on the machine:
  all-to-all, flat          every member sends bytes/p to every other member
  all-to-all, hierarchical  intra-node exchange, then inter-node exchange among equal local indices
  allgather / reduce-scatter ring inside each node, then ring across nodes (as the cost model)
  allreduce                 reduce-scatter + allgather
Rates are max-min fair (progressive filling); flows are advanced event by event until all finish.
Per-message latency is added as in the analytic model (messages × tier latency), so a
contention-free case reproduces the analytic time, and any shared or hot link makes it slower.

Routing skew: per MoE layer, expert loads are drawn from a Dirichlet with concentration
1/skew (skew 0 = uniform). With capacity-bound gating (drop_tokens) the buffers, and so the time,
do not change — the expected fraction of dropped tokens does; without dropping, the capacity (and
every buffer and expert GEMM) grows to the busiest expert's load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from math import ceil

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.env import Env
from moeplan.cost_models.layer import gate_tokens
from moeplan.cost_models.step import decode_pass, train_pass
from moeplan.planner.options import Candidate
from moeplan.spec import layout as L
from moeplan.spec.cluster import topology_graph
from moeplan.spec.phases import EXCHANGE, EXPERT_WORK, Phase

INF = float("inf")


# ---------------------------------------------------------------------------------- topology
class Links:
    """The directed links of the topology graph (capacities in bytes/s) and the route from any GPU
    to any other, for N GPUs in nodes of G."""

    def __init__(self, graph, capacity: dict[str, float], uplink_scale: float):
        self.index: dict[tuple[str, str], int] = {}
        caps: list[float] = []
        for u, v, d in graph.edges(data=True):
            cap = (d["bandwidth_Bps"] * uplink_scale if d["tier"] == "uplink"
                   else capacity[d["tier"]])
            for edge in ((u, v), (v, u)):
                self.index[edge] = len(caps)
                caps.append(cap)
        self.caps = tuple(caps)
        self.graph = graph
        self.kind = dict(graph.nodes(data="kind"))
        self.node = {n: d["node"] for n, d in graph.nodes(data=True) if d["kind"] == "gpu"}
        self.nic = {n: next(m for m in graph[n] if self.kind[m] == "nic") for n in self.node}
        self.leaf = {n: next(m for m in graph[n] if self.kind[m] in ("leaf", "fabric"))
                     for n, k in self.kind.items() if k == "nic"}
        self.switch = {n: f"node{self.node[n]}/switch" for n in self.node}
        self.network = graph.subgraph(n for n, k in self.kind.items()
                                      if k in ("leaf", "spine", "fabric"))  # switches only
        self.routes: dict[tuple[str, str], tuple[int, ...]] = {}
        self.paths: dict[tuple[int, int], tuple[int, ...]] = {}

    def _hops(self, nodes: list[str]) -> tuple[int, ...]:
        return tuple(self.index[(u, v)] for u, v in zip(nodes, nodes[1:]))

    def _route(self, a: str, b: str) -> tuple[int, ...]:
        """Leaf to leaf through the switches (never back down through a node)."""
        if (a, b) not in self.routes:
            import networkx as nx  # already loaded by topology_graph; kept off search's start-up
            self.routes[(a, b)] = self._hops(nx.shortest_path(self.network, a, b))
        return self.routes[(a, b)]

    def path(self, a: int, b: int) -> tuple[int, ...]:
        if (a, b) not in self.paths:
            ga, gb = f"gpu{a}", f"gpu{b}"
            if self.node[ga] == self.node[gb]:
                hops = self._hops([ga, self.switch[ga], gb])
            else:
                na, nb = self.nic[ga], self.nic[gb]
                la, lb = self.leaf[na], self.leaf[nb]
                hops = (self._hops([ga, na, la]) + self._route(la, lb)
                        + self._hops([lb, nb, gb]))
            self.paths[(a, b)] = hops
        return self.paths[(a, b)]


def links_for(env: Env) -> Links:
    """The topology graph of the environment's nodes with the analytic model's capacities: NVLink
    and NIC ports at the profile's fitted all-to-all bandwidths, a leaf's uplink in proportion."""
    c, N, G = env.cluster, env.gpus, env.gpus_per_node
    _, intra_bw = coll.tier_link(c, "all_to_all", "intra")
    _, inter_per_gpu = coll.tier_link(c, "all_to_all", "inter")
    # the analytic inter bandwidth is per GPU with the node's GPUs sharing its NICs: per NIC port
    nic_bw = inter_per_gpu * G / c.nics_per_node
    host_bw = c.host.bandwidth_Bps * c.host.efficiency
    graph = topology_graph(c, ceil(N / G))
    return Links(graph, {"intra": intra_bw, "host": host_bw, "inter": nic_bw},
                 uplink_scale=nic_bw / c.inter.bandwidth_Bps)


# ---------------------------------------------------------------------------- fluid solver
def max_min_rates(paths: list[tuple[int, ...]], caps: list[float], active: list[int]
                  ) -> dict[int, float]:
    """Progressive filling: raise all rates together; freeze the flows of each link that fills."""
    rates: dict[int, float] = {}
    remaining = list(caps)
    live = set(active)
    while live:
        count: dict[int, int] = {}
        for f in live:
            for l in paths[f]:
                count[l] = count.get(l, 0) + 1
        share = min(remaining[l] / n for l, n in count.items())
        full = {l for l, n in count.items() if remaining[l] / n <= share * (1 + 1e-9)}
        frozen = [f for f in live if any(l in full for l in paths[f])]
        for f in frozen:
            rates[f] = share
            for l in paths[f]:
                remaining[l] -= share
            live.discard(f)
    return rates


def transfer_s(flows: list[tuple[int, int, float]], links: Links) -> float:
    """Time until every (src, dst, bytes) flow, all starting together, has arrived."""
    flows = [(a, b, n) for a, b, n in flows if n > 0 and a != b]
    if not flows:
        return 0.0
    paths = [links.path(a, b) for a, b, _ in flows]
    left = [n for _, _, n in flows]
    active = list(range(len(flows)))
    t = 0.0
    while active:
        rates = max_min_rates(paths, list(links.caps), active)
        dt = min(left[f] / rates[f] for f in active)
        t += dt
        still = []
        for f in active:
            left[f] -= rates[f] * dt
            if left[f] > 1e-9 * flows[f][2]:
                still.append(f)
        active = still
    return t


# ---------------------------------------------------------------------------- collectives
def _closure(groups: L.Groups, G: int) -> L.Groups:
    """The groups that share a node with the first one, transitively: with a periodic layout
    every other such set is a translate of it, so simulating it is simulating them all."""
    nodes = {r // G for r in groups[0]}
    chosen: list[list[int]] = []
    changed = True
    while changed:
        changed = False
        for g in groups:
            if g not in chosen and any(r // G in nodes for r in g):
                chosen.append(g)
                new = {r // G for r in g} - nodes
                if new:
                    nodes |= new
                changed = True
    return chosen


def _ring(groups: L.Groups, G: int, nbytes: float) -> tuple[list, list]:
    """(intra-node flows, inter-node flows) of the hierarchical ring over `nbytes` per rank."""
    intra, inter = [], []
    for g in groups:
        by_node: dict[int, list[int]] = {}
        for r in g:
            by_node.setdefault(r // G, []).append(r)
        members = list(by_node.values())
        per, n = len(members[0]), len(members)
        for m in members:
            for i, r in enumerate(m):
                intra.append((r, m[(i + 1) % per], nbytes * (per - 1) / per))
        for i in range(per):
            ring = [m[i] for m in members]
            for j, r in enumerate(ring):
                inter.append((r, ring[(j + 1) % n], nbytes * (n - 1) / n / per))
    return intra, inter


class Simulator:
    """Simulated collective times for one environment, cached by (kind, groups, bytes)."""

    def __init__(self, env: Env):
        self.env = env
        self.links = links_for(env)
        self.cache: dict[tuple, float] = {}

    def _cached(self, key: tuple, fn) -> float:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def allgather_s(self, groups: L.Groups, out_bytes: float, collective: str = "allgather"
                    ) -> float:
        """Hierarchical ring allgather (or reduce-scatter) of `out_bytes` per rank."""
        if len(groups[0]) <= 1 or out_bytes <= 0:
            return 0.0
        G = self.env.gpus_per_node
        span = _span(groups[0], G)

        def run() -> float:
            intra, inter = _ring(_closure(groups, G), G, out_bytes)
            t = transfer_s(intra, self.links) + transfer_s(inter, self.links)
            lat_i, _ = coll.tier_link(self.env.cluster, collective, "intra")
            lat_e, _ = coll.tier_link(self.env.cluster, collective, "inter")
            return t + (span.per_node - 1) * lat_i + (span.nodes - 1) * lat_e
        return self._cached(("ring", collective, _sig(groups), out_bytes), run)

    def allreduce_s(self, groups: L.Groups, nbytes: float) -> float:
        return 2.0 * self.allgather_s(groups, nbytes, "allreduce")

    def all_to_all_s(self, groups: L.Groups, nbytes: float, algorithm: str) -> float:
        if len(groups[0]) <= 1 or nbytes <= 0:
            return 0.0
        G = self.env.gpus_per_node
        span = _span(groups[0], G)
        hier = algorithm == "hierarchical" and span.nodes > 1 and span.per_node > 1

        def run() -> float:
            """The flows of the algorithm over the links; latencies as the analytic model's."""
            c = self.env.cluster
            chosen = _closure(groups, G)
            k_lat, k_bytes = coll.exchange_scale(c, algorithm if hier else "flat", span)
            if not hier:
                p = len(groups[0])
                flows = [(a, b, nbytes / p) for g in chosen for a in g for b in g]
                latency, _ = coll.all_to_all_flat_parts(nbytes, span, c)
                return k_bytes * transfer_s(flows, self.links) + k_lat * latency
            g_, n = span.per_node, span.nodes
            intra, inter = [], []
            for grp in chosen:
                nodes = L.split_by_node(grp, G)
                for members in nodes[0]:
                    intra += [(a, b, nbytes / g_) for a in members for b in members]
                for members in nodes[1]:
                    inter += [(a, b, nbytes / n) for a in members for b in members]
            latency, _ = coll.all_to_all_hierarchical_parts(nbytes, span, c)
            return (k_bytes * (transfer_s(intra, self.links) + coll.layout_transform_s(nbytes, c)
                               + transfer_s(inter, self.links)) + k_lat * latency)
        return self._cached(("a2a", hier, _sig(groups), nbytes), run)


def _sig(groups: L.Groups) -> tuple:
    return tuple(tuple(g) for g in groups)


def _span(group: list[int], G: int) -> coll.GroupSpan:
    nodes = {r // G for r in group}
    return coll.GroupSpan(size=len(group), per_node=len(group) // len(nodes), nodes=len(nodes))


# --------------------------------------------------------------------------------- a plan
@dataclass
class SimResult:
    time_s: float  # step (train) or per-token decode (infer) time
    layers: list[dict[str, float]]  # per layer: phase -> seconds (same units as the plan)
    critical_path: list[tuple[str, float]] = field(default_factory=list)  # phase, seconds
    load_factor: list[float] = field(default_factory=list)  # busiest expert / mean, per layer
    dropped_fraction: list[float] = field(default_factory=list)


def sample_loads(experts: int, tokens: int, skew: float, rng: random.Random) -> list[int]:
    """Tokens per expert: multinomial over Dirichlet(1/skew) shares (uniform when skew = 0).

    Beyond 2048 tokens each count is drawn from the normal approximation of its binomial
    (mean n·s, variance n·s·(1-s)), which keeps a search with many large layers fast."""
    if skew <= 0:
        shares = [1.0 / experts] * experts
    else:
        draws = [rng.gammavariate(1.0 / skew, 1.0) for _ in range(experts)]
        total = sum(draws)
        shares = [d / total for d in draws]
    if tokens > 2048:
        return [max(0, round(rng.gauss(tokens * s, (tokens * s * (1 - s)) ** 0.5)))
                for s in shares]
    counts = [0] * experts
    for e in rng.choices(range(experts), weights=shares, k=tokens):
        counts[e] += 1
    return counts


def simulate(env: Env, cand: Candidate, skew: float = 0.0, seed: int = 0,
             sim: Simulator | None = None) -> SimResult:
    """Simulate one training step (or decode token) of a candidate from the search."""
    sim = sim or Simulator(env)
    s, spec = cand.setting, env.spec
    N, tp = env.gpus, s.tp
    rng = random.Random(seed)
    train = env.workload.mode == "train"
    p = train_pass(env, s) if train else decode_pass(env, s)
    tp_groups = L.tp_groups(N, tp)
    out = SimResult(time_s=cand.head.time_s, layers=[])
    for i, ev in enumerate(cand.layers):
        c, cost = ev.choice, ev.cost
        phases = dict(cost.phases)
        tp_bytes = cost.comm_bytes.get("tp_allreduce", 0.0)
        if tp > 1 and tp_bytes:
            analytic = coll.allreduce_s(tp_bytes, env.span(tp, 1), env.cluster)
            simulated = sim.allreduce_s(tp_groups, tp_bytes)
            extra = 0.0
            if c.coordinated:
                extra_a = coll.allgather_s(tp_bytes, env.span(tp, 1), env.cluster)
                extra = (sim.allgather_s(tp_groups, tp_bytes) - extra_a)
            phases[Phase.TP_COMM] = _scaled(phases[Phase.TP_COMM], analytic, simulated, extra,
                                        cost.fixed.get(Phase.TP_COMM, 0.0))
        factor, dropped = 1.0, 0.0
        E = spec.experts[i]
        if E:
            T_r = gate_tokens(env, s, c, p)
            cap = spec.capacity(E, T_r, train)
            loads = sample_loads(E, T_r * spec.top_k, skew, rng)
            busiest = max(loads)
            dropped = sum(max(0, x - cap) for x in loads) / max(1, sum(loads))
            if not spec.drop_tokens:
                factor = max(1.0, busiest / max(cap, 1))
                dropped = 0.0
            a2a = cost.comm_bytes.get("a2a", 0.0) * factor
            stride = env.ep_stride(c.es, s.tp)
            eps = L.ep_groups(N, c.ep, stride)
            analytic = coll.all_to_all_s(cost.comm_bytes.get("a2a", 0.0),
                                         env.span(c.ep, stride), env.cluster, c.a2a)
            simulated = sim.all_to_all_s(eps, a2a, c.a2a)
            for ph in EXCHANGE:
                phases[ph] = _scaled(phases[ph], analytic, simulated,
                                     fixed=cost.fixed.get(ph, 0.0))
            if c.es > 1 and Phase.ES_COMM in phases:
                es_b = cost.comm_bytes.get("es_gather", 0.0)
                es_g = L.es_groups(N, c.ep, c.es)
                an = (coll.allgather_s(es_b, env.span(c.es, 1), env.cluster)
                      + coll.reduce_scatter_s(es_b, env.span(c.es, 1), env.cluster))
                si = (sim.allgather_s(es_g, es_b * factor)
                      + sim.allgather_s(es_g, es_b * factor, "reduce_scatter"))
                phases[Phase.ES_COMM] = _scaled(phases[Phase.ES_COMM], an, si,
                                            fixed=cost.fixed.get(Phase.ES_COMM, 0.0))
            for ph in EXPERT_WORK:
                phases[ph] = phases.get(ph, 0.0) * factor
        out.layers.append(phases)
        out.load_factor.append(factor)
        out.dropped_fraction.append(dropped)
        out.time_s += sum(phases.values())
    # every rank runs the same sequence of phases, so the step's critical path is that sequence;
    # report where its time goes: each phase summed over the layers (and the head), largest first
    totals: dict[str, float] = {}
    for phases in out.layers + [cand.head.phases]:
        for ph, t in phases.items():
            totals[ph] = totals.get(ph, 0.0) + t
    out.critical_path = sorted(((ph, t) for ph, t in totals.items() if t > 0),
                               key=lambda x: (-x[1], x[0]))
    return out


def _scaled(phase_s: float, analytic: float, simulated: float, extra: float = 0.0,
            fixed: float = 0.0) -> float:
    """The plan's phase (per step: passes × micro-steps × one collective, plus the framework's
    fixed seconds `fixed`) with the collective's analytic time replaced by the simulated one
    (`extra`: a second collective of the phase)."""
    if analytic <= 0:
        return phase_s
    return (phase_s - fixed) * (simulated + extra) / analytic + fixed
