"""`ClusterProfile`: the hardware as data (device, node shape, link tiers, fitted collectives).

Every constant carries its source in a `source` field. `topology_graph` turns a profile and a node
count into a networkx graph (GPUs, NVSwitch, NICs, leaf and spine switches) for the simulator;
networkx is imported only there, so `moeplan search` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeplan.spec.model import PRINTABLE

MAX_PER_NODE = 1024  # GPUs or NICs in one node: far above any machine, low enough to enumerate
# Bounds no real machine comes near — a minute of fixed time per message, operation or phase; a
# byte or FLOP per second; a millionth of peak; a factor of a million — which keep every cost
# far inside float range whatever a profile file says.
Seconds = Annotated[float, Field(ge=0, le=60)]
Rate = Annotated[float, Field(ge=1, le=1e21)]
Fraction = Annotated[float, Field(ge=1e-6, le=1)]
Factor = Annotated[float, Field(ge=1e-6, le=1e6)]

if TYPE_CHECKING:  # pragma: no cover
    import networkx

Dtype = Literal["fp32", "fp16", "bf16"]
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}


class EfficiencyCurve(BaseModel):
    """Achieved fraction of peak FLOP/s for a GEMM of `flops` operations.

    efficiency(flops) = max_efficiency · flops / (flops + half_flops): small GEMMs are latency- and
    tile-bound, large ones approach `max_efficiency`. `moeplan profile` fits both parameters.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_efficiency: Fraction
    half_flops: float = Field(ge=0, le=1e21)
    source: str = ""


class PhaseOverhead(BaseModel):
    """Fixed seconds of one layer phase: forward and backward of a training pass (autograd on),
    and one inference forward (no autograd)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    forward_s: Seconds
    backward_s: Seconds
    infer_s: Seconds
    work_scale: Factor = Field(1.0, description=(
        "training passes: measured time above the fixed part over the phase's roofline time "
        "(its kernels' distance from the fitted GEMM/bandwidth roofline: attention kernels, "
        "GELU, layer norms, gathers), at the first probe size"))
    work_points: list[tuple[Seconds, Factor]] = Field(default_factory=list, description=(
        "(roofline seconds of one forward pass, work scale) at each probe size; the cost model "
        "interpolates between them"))
    decode_points: list[tuple[Seconds, Factor]] = Field(default_factory=list, description=(
        "the same for one decode token (infer_s measured at the smallest probe size)"))


class FrameworkOverhead(BaseModel):
    """What the runtime's framework costs per layer phase whatever the tensor sizes: Python and
    module calls, autograd nodes, phase marks, kernel launches — measured by `moeplan profile` on
    the runtime's own modules at a negligible size (hidden 8, 8 tokens).

    Keys: `dense.<phase>` and `moe.<phase>` for a dense and a PR-MoE layer (`moe.experts` at no
    local experts, plus `moe.experts_per_local` for each local expert), and `head` for embedding,
    LM head and loss. Where a profile has none, the cost model charges counted operations times
    `op_overhead_s` instead."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    phases: dict[str, PhaseOverhead]
    optimizer_tensor_s: Seconds = Field(description="AdamW step, gradient clipping and "
                                                        "zero_grad per parameter tensor ...")
    optimizer_param_s: Seconds = Field(0.0, description="... and per parameter (one rank "
                                                            "alone)")
    ranks: int = Field(1, ge=1, description="ranks on the measured host")
    cores: int | None = Field(None, ge=1, description=(
        "CPU cores the ranks share; a CPU profile describes one host that runs every rank, as "
        "`moerun` does (None: each rank has a device of its own)"))
    contention: Factor = Field(1.0, description=(
        "the probe's time with every rank of the node running it at once over its time on one "
        "rank alone (others idle): ranks sharing cores, memory bandwidth, SMT siblings"))
    decode_contention: Factor = Field(1.0, description="the same, greedy decoding")
    exchange_extra_s: Seconds = Field(0.0, description=(
        "seconds each all-to-all call of a training pass took inside a running step beyond what "
        "the model charged it (microbenchmarked exchange + waits): ranks arriving at different "
        "moments, waking blocked ranks — the probe run expert-parallel on every rank"))
    decode_exchange_extra_s: Seconds = Field(0.0, description="the same, decoding")
    untimed_layer_s: Seconds | None = Field(None, description=(
        "a training step's time outside every timed phase, per layer and micro-step, in that "
        "run: moerun's work between the timed passes goes layer by layer (each gate's noise "
        "keys and routing loads, the glue between phases) beside a batch per micro-step; "
        "None (a profile from before it was measured): `untimed_fraction` instead"))
    decode_untimed_layer_s: Seconds | None = Field(None, description=(
        "the same, per layer and decode token"))
    untimed_fraction: float = Field(0.0, ge=0, le=1e6, description=(
        "where `untimed_layer_s` is None: a training step's time outside every timed phase over "
        "the timed time, in that run (it grew with the step's compute, which the untimed work "
        "does not: 0.31 s charged where a 2.7 s step took 0.04 s)"))
    decode_untimed_fraction: float = Field(0.0, ge=0, le=1e6,
                                           description="the same, per decode token")
    grad_sync_extra_s: Seconds = Field(0.0, description=(
        "seconds the gradient sync of that run took per step beyond what the model charged it"))
    in_step: Factor = Field(1.0, description=(
        "the compute of that run (its timed time less its all-to-alls and gradient sync) over "
        "what the model charged it: what compute costs inside a running step beyond the "
        "microbenchmarks and `contention` — waking from every collective wait, caches the "
        "exchanges evicted, the runtime's own loop; every compute phase, the head and the "
        "optimizer are charged this much more (training)"))
    decode_in_step: Factor = Field(1.0, description="the same, per decode token")
    turn_share: float = Field(1.0, ge=0, le=1e6, description=(
        "ranks taking turns on shared cores (more ranks than `cores`): the share of its peers' "
        "turns a rank waits at the next collective, measured in that run — the rest it spends "
        "descheduled inside its own compute phases, which `in_step` carries (1: every turn "
        "shows up as a wait)"))
    decode_turn_share: float = Field(1.0, ge=0, le=1e6, description="the same, per decode token")
    skew: float = Field(0.0, ge=0, le=1e6, description=(
        "how far the slowest rank trails the mean over one training step of the probe, all "
        "ranks at once: what a rank waits at a collective for its peers, per second of compute"))
    source: str = ""


class Device(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    kind: Literal["gpu", "cpu"] = Field(
        "gpu", description="what the runtime executes on: CUDA (Triton kernels, grouped expert "
                           "GEMM) or CPU (the torch reference) — it sets the operation counts")
    memory_bytes: int = Field(gt=0, le=2**60)
    reserved_bytes: int = Field(0, ge=0)
    peak_flops: dict[str, Rate]
    hbm_Bps: Rate
    hbm_efficiency: Fraction
    gemm_efficiency: EfficiencyCurve
    op_overhead_s: Seconds = 0.0
    score_element_s: Seconds = Field(
        0.0, description="seconds of attention's work per score element and head in one "
                               "forward pass (scale, max, exp, sum), beyond its matrix products: "
                               "what makes many narrow heads cost more than few wide ones")
    framework: FrameworkOverhead | None = None
    board_power_w: float | None = Field(None, gt=0, le=1e6, description=(
        "the board's maximum power (TDP, datasheet): energy from it is an upper bound"))
    source: str = ""

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserved_bytes


class LinkTier(BaseModel):
    """One tier of the interconnect: per-port unidirectional bandwidth, per-message latency."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    bandwidth_Bps: Rate
    latency_s: Seconds
    efficiency: Fraction
    source: str = ""


class FittedCollective(BaseModel):
    """alpha-beta fit of one collective on one tier, measured by `moeplan profile`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    collective: Literal["allreduce", "allgather", "reduce_scatter", "all_to_all"]
    tier: Literal["intra", "inter"]
    latency_s: Seconds
    bandwidth_Bps: Rate
    r2: float | None = None
    source: str = ""


class ExchangeScale(BaseModel):
    """How one all-to-all algorithm, timed by `moeplan profile` over a group spanning nodes,
    compares with its model built from the per-tier fits: measured ≈ latency_scale · latency
    part + transfer_scale · transfer part (`cost_models.collectives.*_parts`) back to back;
    after the links have idled, down to the `rested_*` fit by at most `credit_s`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    algorithm: Literal["flat", "hierarchical"]
    group_size: int = Field(gt=1)
    per_node: int = Field(gt=1)
    latency_scale: Factor
    transfer_scale: Factor
    rested_latency_scale: Factor | None = Field(None, description=(
        "the same fit over exchanges timed after every rank idled (`measure.REST_S`): what the "
        "links do when they have rested — a rate limiter's token bucket full again"))
    rested_transfer_scale: Factor | None = None
    credit_s: Seconds = Field(0.0, description=(
        "seconds of exchange time that resting saves at most (back to back less rested, where it "
        "saved clearly: `build.CLEAR_SAVING`): the bucket's depth in seconds, also the idle time that "
        "refills it; one per link, the smaller of the algorithms' estimates"))
    r2: float | None = None
    source: str = ""


class Fabric(BaseModel):
    """The network between nodes. Default: non-blocking (every NIC reaches every other at its
    line rate). A two-level leaf/spine fabric puts `nodes_per_leaf` nodes under each leaf switch
    and gives each leaf uplinks of its downlinks' bandwidth over `oversubscription` (2.0 = 2:1);
    rail-optimised, NIC k of those nodes goes to leaf k (rail k), so traffic between GPUs of the
    same local index stays on one leaf, and other traffic crosses the spine."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    nodes_per_leaf: int | None = Field(None, gt=0, description=(
        "nodes whose NICs (rail-optimised: one rail of them) share a leaf switch; None: one "
        "non-blocking fabric"))
    oversubscription: float = Field(1.0, ge=1, le=64, description=(
        "a leaf's downlink bandwidth over its uplink bandwidth"))
    rail_optimized: bool = False
    source: str = ""

    @property
    def blocking(self) -> bool:
        """Whether some traffic between nodes can be limited by a leaf's uplinks."""
        return ((self.nodes_per_leaf is not None or self.rail_optimized)
                and self.oversubscription > 1)


class Pricing(BaseModel):
    """What one GPU-hour costs: a dated list price with its source (prices change: check it)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    usd_per_gpu_hour: float = Field(gt=0, le=1e4)
    as_of: str = Field(max_length=40, pattern=PRINTABLE)
    source: str = ""


SPREAD_TERMS = ("compute", "framework", "communication", "model")


class Spread(BaseModel):
    """How far one group of calibrated terms moves (10th and 90th percentile, as factors on
    the seconds they cost): `compute` — the phases' arithmetic and memory traffic (GEMM and
    copy speed, the runtime's work scales); `framework` — fixed seconds per operation and
    phase; `communication` — collectives and all-to-alls; `model` — the cost model's own error
    on such a host, measured by the accuracy bench, as a factor on the whole prediction. A
    measured profile takes the first three from its moments (each moment's median over the
    pooled median); a built-in one states them as assumptions."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    p10: Fraction
    p90: float = Field(ge=1, le=1e6)
    source: str = ""


class ClusterProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    description: str = ""
    source: str = ""
    device: Device
    name: str = Field(max_length=200, pattern=PRINTABLE)
    gpus_per_node: int = Field(gt=0, le=MAX_PER_NODE)
    max_nodes: int | None = Field(None, gt=0)
    intra: LinkTier
    inter: LinkTier
    host: LinkTier
    nics_per_node: int = Field(gt=0, le=MAX_PER_NODE)
    fabric: Fabric = Field(default_factory=Fabric)
    pricing: Pricing | None = None
    fitted: list[FittedCollective] = Field(default_factory=list)
    exchanges: list[ExchangeScale] = Field(default_factory=list)
    default_dtype: Dtype = "bf16"
    topology: dict | None = Field(None, description="what NVML reported when this profile was "
                                                    "measured (GPUs, NVLink peers, affinity)")
    spread: dict[Literal["compute", "framework", "communication", "model"], Spread] = Field(
        default_factory=dict, description="the calibrations' spread, by group: the band on "
                                          "every prediction")

    @model_validator(mode="after")
    def _check(self) -> "ClusterProfile":
        for dtype in {self.default_dtype, "fp32"}:
            if dtype not in self.device.peak_flops:
                raise ValueError(f"device.peak_flops has no entry for {dtype}")
        if self.device.reserved_bytes >= self.device.memory_bytes:
            raise ValueError("reserved_bytes must be smaller than memory_bytes")
        return self

    @property
    def inter_Bps_per_gpu(self) -> float:
        """A node's NIC bandwidth shared by its GPUs, all of which run the same collective at once."""
        return self.nics_per_node * self.inter.bandwidth_Bps / self.gpus_per_node

    def fitted_for(self, collective: str, tier: str) -> FittedCollective | None:
        for f in self.fitted:
            if f.collective == collective and f.tier == tier:
                return f
        return None

    def exchange_for(self, algorithm: str) -> ExchangeScale | None:
        return next((e for e in self.exchanges if e.algorithm == algorithm), None)


def topology_graph(profile: ClusterProfile, num_nodes: int) -> "networkx.Graph":
    """The cluster as a graph: GPU -- NVSwitch inside a node, GPU -- PCIe -- NIC -- network.

    NICs are assigned to GPUs round-robin (GPU-NIC affinity as on NDv4/DGX nodes). The network is
    one node `fabric` (non-blocking), or leaf switches (`pod{p}/leaf`, rail-optimised
    `pod{p}/rail{k}`) under one `spine` whose leaf uplinks carry the leaf's downlink bandwidth
    over the oversubscription (the spine switches of a Clos, aggregated: ECMP spreads flows over
    them).

    Edge attribute `bandwidth_Bps` is the unidirectional capacity of that link and `tier` one of
    intra, host, inter (NIC to leaf or fabric), uplink (leaf to spine); node attribute `kind` is
    one of gpu, switch, nic, leaf, spine, fabric. GPU nodes are named by global rank ("gpu{r}").
    """
    import networkx as nx

    fabric, G, R = profile.fabric, profile.gpus_per_node, profile.nics_per_node
    nic_bw = profile.inter.bandwidth_Bps
    g = nx.Graph(name=profile.name)
    per_leaf = fabric.nodes_per_leaf or num_nodes
    if fabric.nodes_per_leaf is None and not fabric.rail_optimized:
        g.add_node("fabric", kind="fabric")
    else:
        g.add_node("spine", kind="spine")

    def leaf_of(node: int, nic: int) -> str:
        if fabric.nodes_per_leaf is None and not fabric.rail_optimized:
            return "fabric"
        pod = node // per_leaf
        name = f"pod{pod}/rail{nic}" if fabric.rail_optimized else f"pod{pod}/leaf"
        if name not in g:
            nodes_here = min(per_leaf, num_nodes - pod * per_leaf)
            downlinks = nodes_here * (1 if fabric.rail_optimized else R)
            g.add_node(name, kind="leaf", pod=pod)
            g.add_edge(name, "spine", bandwidth_Bps=downlinks * nic_bw / fabric.oversubscription,
                       latency_s=0.0, tier="uplink")
        return name

    for n in range(num_nodes):
        switch = f"node{n}/switch"
        g.add_node(switch, kind="switch", node=n)
        nics = [f"node{n}/nic{k}" for k in range(R)]
        for k, nic in enumerate(nics):
            g.add_node(nic, kind="nic", node=n, rail=k)
            g.add_edge(nic, leaf_of(n, k), bandwidth_Bps=nic_bw,
                       latency_s=profile.inter.latency_s, tier="inter")
        for local in range(G):
            gpu = f"gpu{n * G + local}"
            g.add_node(gpu, kind="gpu", node=n, local=local)
            g.add_edge(gpu, switch, bandwidth_Bps=profile.intra.bandwidth_Bps,
                       latency_s=profile.intra.latency_s, tier="intra")
            g.add_edge(gpu, nics[local % len(nics)], bandwidth_Bps=profile.host.bandwidth_Bps,
                       latency_s=profile.host.latency_s, tier="host")
    return g
