"""One transformer layer under one parallel choice: seconds per phase, bytes moved, memory.

Shapes per GPU for a forward pass of T tokens per data-parallel rank (tensor-slicing degree tp):
  attention   QKV (T×h)·(h×3h/tp), scores and values 2·(T×ctx)·h/tp, projection (T×h/tp)·(h/tp×h)
  mlp         (T×h)·(h×f/tp), (T×f/tp)·(f/tp×h)          — dense layers and the PR-MoE residual MLP
  gate        router (T_r×h)·(h×E) in fp32 softmax; T_r = ceil(T/tp) when the all-to-all is
              TP-coordinated (each tensor-slicing rank routes 1/tp of the tokens), else T
  capacity    C = max(ceil(k·cf·T_r/E), min capacity)   (ModelSpec.capacity, DeepSpeed TopKGate)
  dispatch    gather into the [E, C, h] buffer; all-to-all over the ep group (stride es)
  es_comm     expert slicing: allgather the received rows over es, reduce-scatter the partial outputs
  experts     E/ep local experts, each on ep·es·C rows, FFN sliced f/es
  combine     all-to-all back, weighted scatter to token order; TP-coordinated: allgather over tp

Training runs each forward compute phase 1 + recompute times and backward at twice the forward
FLOPs; each communication runs once per forward pass and once in backward.
"""

from __future__ import annotations

from math import ceil, log

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.compute import gemm_s, memory_s, roofline_s
from moeplan.cost_models.env import Env, LayerChoice, LayerCost, Pass
from moeplan.cost_models.memory import (
    attention_activation_bytes,
    kv_cache_bytes,
    mlp_activation_bytes,
    moe_activation_bytes,
)
from moeplan.cost_models.params import attention_shape, layer_params, mlp_matrices
from moeplan.cost_models.runtimes import (
    DEEPSPEED_SYNCS,
    HOST_SYNC_S,
    block_scale,
    is_deepspeed,
    operations,
)
from moeplan.cost_models.traffic import (
    block_elementwise_bytes,
    deepspeed_traffic,
    elementwise_bytes,
)
from moeplan.spec.phases import COMM, COMPUTE, EXCHANGE, Phase
from moeplan.spec.workload import Setting

COMPUTE_PHASES = COMPUTE
# MoE phases each runtime implements its own way (DeepSpeed: fp32 gate with its capacity
# scalars, einsum or gather dispatch and combine, a loop over local experts): a measured
# profile's probe, which runs moerun, describes them for moerun (`own_kernels` says where else)
OWN_KERNELS = (Phase.GATE, Phase.DISPATCH, Phase.COMBINE, Phase.EXPERTS)
COMM_PHASES = COMM


def ops(env: Env, name: str, p: Pass, local_experts: int = 0) -> float:
    """Operations one forward pass of a phase is charged (`runtimes.operations`)."""
    training = env.workload.mode == "train" and not p.decode
    return operations(env.runtime, env.cluster.device.kind, name, training, local_experts,
                      env.spec)


def fixed_s(env: Env, key: str, p: Pass, local_experts: int = 0) -> float:
    """Framework seconds one pass of a phase is charged whatever its size; `key` is
    "dense.<phase>", "moe.<phase>" or "head".

    Measured (`device.framework`, from the runtime's own modules) where the profile has it;
    otherwise the counted operations times `op_overhead_s`, and communication wrappers cost
    nothing beyond their collective. Training charges compute phases three passes and
    communication phases two (`step.train_layer`), so one pass carries that share of the
    measured forward + backward."""
    dev = env.cluster.device
    phase = key.rpartition(".")[2]
    name = "residual_mlp" if key == "moe.mlp" else phase  # the operation counts' name
    comm = phase in COMM_PHASES
    fw = dev.framework
    k = env.scales.framework
    if fw is None:
        if comm:
            return 0.0
        return k * ops(env, name, p, local_experts) * dev.op_overhead_s
    train = env.workload.mode == "train" and not p.decode

    def one(k: str) -> float:
        o = fw.phases.get(k)
        if o is None:
            return 0.0
        return (o.forward_s + o.backward_s) / (2 if comm else 3) if train else o.infer_s

    t = one(key) * block_scale(name, env.spec, train)  # the probe's blocks -> the spec's
    if key == "moe.experts":
        t += local_experts * one("moe.experts_per_local")
    if env.runtime != "moerun" and name in OWN_KERNELS:  # the probe is moerun's: its kernels
        # -> the runtime's, by their operation counts
        t *= ops(env, name, p, local_experts) / operations(
            "moerun", dev.kind, name, train, local_experts, env.spec)
    return k * t


def sharing(env: Env, decode: bool = False) -> tuple[float, float]:
    """(slowdown of compute while ranks run side by side, turns they take on shared cores).

    Where ranks share CPU cores (a measured CPU profile, which has `cores`), `contention` was
    measured with `ranks` ranks on the host: beyond one rank per core they take turns (a factor
    ranks/cores), and what is left is the slowdown of ranks running side by side (SMT siblings,
    memory bandwidth). A plan of N ranks, all on the profiled host as `moerun` starts them,
    takes max(1, N/cores) turns: compute phases run at the side-by-side speed and the turns
    show up as waiting at the next collective. Decode passes (many small operations) use the
    contention measured on decoding. Devices of their own: no turns, no side-by-side slowdown.
    Either way, compute inside a running step costs the profile's measured `in_step` factor
    (`decode_in_step`) more again. Without a measured framework: (1, 1)."""
    fw = env.cluster.device.framework
    if fw is None:
        return 1.0, 1.0
    in_step = fw.decode_in_step if decode else fw.in_step
    if not fw.cores:
        return in_step, 1.0
    contention = fw.decode_contention if decode else fw.contention
    side_by_side = max(1.0, contention / max(1.0, fw.ranks / fw.cores))
    return side_by_side * in_step, max(1.0, env.gpus / fw.cores)


def own_kernels(env: Env, phase: str) -> bool:
    """Whether the runtime runs a MoE phase with kernels the measured profile's probe (moerun)
    did not time: DeepSpeed's gate, dispatch and combine (its fp32 gate, its einsums or
    gathers); its per-expert loop only where moerun's experts run otherwise — on a GPU (one
    grouped GEMM) or as batched GEMMs (gated or bias-free experts): on CPU ranks moerun's loop
    over biased GELU experts launches the same GEMMs as DeepSpeed's, whose work scale the probe
    measured."""
    if env.runtime == "moerun" or phase not in OWN_KERNELS:
        return False
    if phase != Phase.EXPERTS:
        return True
    spec = env.spec
    return env.cluster.device.kind == "gpu" or spec.mlp == "swiglu" or not spec.bias


def work_scale(env: Env, key: str, p: Pass, roofline: float) -> float:
    """How far a phase's kernels run from the roofline, where the profile measured it (training
    passes and the prompt pass on the training points, decode passes on the decode points):
    interpolated in log(roofline seconds) between the probe sizes, the nearest one's outside
    them. Unmeasured: 1 — as for another runtime's own MoE kernels (`own_kernels`)."""
    fw = env.cluster.device.framework
    if fw is None or key not in fw.phases or own_kernels(env, key.rpartition(".")[2]):
        return 1.0
    o = fw.phases[key]
    if p.decode:
        pts, default = sorted(o.decode_points), 1.0
    else:
        pts, default = sorted(o.work_points), o.work_scale
    if not pts:
        return default
    if roofline <= pts[0][0]:
        return pts[0][1]
    if roofline >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= roofline <= x1:
            w = log(roofline / x0) / log(x1 / x0) if x1 > x0 else 0.0
            return y0 + w * (y1 - y0)
    return pts[-1][1]


def forward(env: Env, s: Setting, index: int, c: LayerChoice, p: Pass) -> LayerCost:
    """Seconds per phase and bytes per communication for one forward pass of layer `index`."""
    spec, dev, dt = env.spec, env.cluster.device, env.workload.dtype
    h, f, tp, T, b = spec.hidden, spec.ffn_hidden, s.tp, p.tokens, env.dtype_bytes
    E = spec.experts[index]
    cost = LayerCost()
    ph, cb = cost.phases, cost.comm_bytes

    a = attention_shape(spec)
    attn_flops_s = (gemm_s(T, a.projection_out / tp, h, dev, dt)
                    + gemm_s(T, h, a.output_in / tp, dev, dt)
                    + gemm_s(T, p.context, a.qk / tp, dev, dt)
                    + gemm_s(T, p.context, a.v / tp, dev, dt))
    kv_read = kv_cache_bytes(T, p.context, spec, tp, b) if p.decode else 0.0
    kind = "moe" if E else "dense"

    def fixed(phase: str, local_experts: int = 0, in_situ: bool = False) -> float:
        """The framework's seconds; for an exchange that happens (`in_situ`), plus what the
        profile saw one take inside a running step beyond the model (`exchange_extra_s`)."""
        t = fixed_s(env, kind + "." + phase, p, local_experts)
        fw = dev.framework
        if in_situ and fw is not None:
            t += env.scales.communication * (fw.decode_exchange_extra_s if p.decode
                                             else fw.exchange_extra_s)
        if phase in COMM_PHASES:
            cost.fixed[phase] = t
        return t

    def compute(phase: str, flops_s: float, nbytes: float, local_experts: int = 0,
                serial_bytes: float = 0.0, serial_s: float = 0.0,
                added_bytes: float = 0.0) -> float:
        """Roofline (bound by FLOPs or bytes) plus the bytes of the memory-bound kernels that
        run after it (`serial_bytes`) and other work charged per element (`serial_s`), times
        the phase's measured work scale, plus the passes today's blocks add (which the work
        scale, measured on DeepSpeed-style blocks, does not describe) and the phase's fixed
        framework seconds."""
        roof = roofline_s(flops_s, nbytes, dev, 0.0) + memory_s(serial_bytes, dev) + serial_s
        return (env.scales.compute * (work_scale(env, kind + "." + phase, p, roof) * roof
                                      + memory_s(added_bytes, dev))
                + fixed(phase, local_experts))

    # the softmax's work on every score element of every head (`Device.score_element_s`)
    score_s = spec.heads / tp * T * p.context * dev.score_element_s
    ph[Phase.ATTENTION] = compute(Phase.ATTENTION, attn_flops_s,
                                  b * (a.weights / tp + 2 * T * h) + kv_read,
                                  serial_bytes=elementwise_bytes(env, s, p, Phase.ATTENTION),
                                  serial_s=score_s,
                                  added_bytes=block_elementwise_bytes(env, s, p, Phase.ATTENTION))

    # a dense layer's MLP, or beside the experts PR-MoE's residual MLP or shared experts
    f_mlp = f if (E == 0 or spec.residual) else spec.shared_ffn_hidden
    has_mlp = f_mlp > 0
    m = mlp_matrices(spec)
    if has_mlp:
        mlp_flops_s = (m - 1) * gemm_s(T, f_mlp / tp, h, dev, dt) + gemm_s(T, h, f_mlp / tp,
                                                                          dev, dt)
        ph[Phase.MLP] = compute(Phase.MLP, mlp_flops_s, b * (m * h * f_mlp / tp + 2 * T * h),
                                serial_bytes=elementwise_bytes(env, s, p, Phase.MLP, f_mlp),
                                added_bytes=block_elementwise_bytes(env, s, p, Phase.MLP, f_mlp))
    elif E:  # no MLP beside the experts: the phase is the block's residual adds
        ph[Phase.MLP] = fixed(Phase.MLP)

    tp_span = env.span(tp, 1)
    cb["tp_allreduce"] = T * h * b
    net = env.scales.communication
    ph[Phase.TP_COMM] = (net * (1 + has_mlp) * coll.allreduce_s(T * h * b, tp_span, env.cluster)
                         + fixed(Phase.TP_COMM))
    if E == 0:
        return _shared(env, cost, p)

    es_mode = es_inference(env, s, c, p)
    T_r = gate_tokens(env, s, c, p)
    C = spec.capacity(E, T_r, train=env.workload.mode == "train")
    rows = E * C
    local = E // c.ep
    # expert slicing gathers the rows after the exchange (training), or the tokens before the
    # gate (inference: the slices then share the gate's rows)
    expert_rows = c.ep * C * (1 if es_mode else c.es)
    deepspeed = is_deepspeed(env.runtime)
    einsum = env.runtime == "deepspeed"  # DeepSpeed up to v0.19.3: one-hot einsum dispatch

    training = env.workload.mode == "train" and not p.decode

    def traffic(phase: str, experts: int, capacity: int, ffn: int = 0, chunked: bool = False):
        return deepspeed_traffic(env.runtime, phase, spec.top_k, b, T_r, experts, capacity, h,
                                 training, s.recompute, ffn, chunked)

    def counted(phase: str, m_: int, n_: int, k_: int, dtype: str, **extra) -> float:
        """A DeepSpeed phase as counted by running its layer (`deepspeed_traffic`): its GEMMs
        (an m_×k_·k_×n_ product: the fp32 router, the einsums) at their roofline scaled to the
        counted FLOPs, every other kernel's bytes after them."""
        t = traffic(phase, E, C)
        scale = t.gemm_flops / (2.0 * m_ * n_ * k_)
        return compute(phase, gemm_s(m_ * scale, n_, k_, dev, dtype), t.gemm_bytes,
                       serial_bytes=t.other_bytes, **extra)

    gate_blocks = block_elementwise_bytes(env, s, p, Phase.GATE)
    if deepspeed:  # its TopKGate: router and softmax in fp32, int64 masks, [S, E, C] (einsum)
        ph[Phase.GATE] = counted(Phase.GATE, T_r, E, h, "fp32", added_bytes=gate_blocks)
    else:
        ph[Phase.GATE] = compute(Phase.GATE, gemm_s(T_r, E, h, dev, "fp32"),
                                 4 * T_r * (h + 3 * E), added_bytes=gate_blocks)
    if not deepspeed and not spec.drop_tokens and dev.kind == "gpu":
        ph[Phase.GATE] += HOST_SYNC_S  # dropless: moerun reads the busiest expert's load back
    if einsum:
        ph[Phase.GATE] += DEEPSPEED_SYNCS * HOST_SYNC_S
    if deepspeed:  # einsum "sec,sm->ecm" (a GEMM over S·E·C), or _sparse_encode's gather
        ph[Phase.DISPATCH] = counted(Phase.DISPATCH, rows, h, T_r, dt)
    else:
        ph[Phase.DISPATCH] = compute(Phase.DISPATCH, 0.0, b * (T_r * h + rows * h))
    a2a_bytes = rows * h * b
    cb["a2a"] = a2a_bytes
    ep_span = env.span(c.ep, env.ep_stride(c.es, tp))
    for phase in EXCHANGE:  # in the phases' order; timed below
        ph[phase] = fixed(phase, in_situ=c.ep * c.es > 1)
    es_s = 0.0
    if c.es > 1:
        # training: allgather the received rows, reduce-scatter the partial outputs; inference
        # "gather": allgather the tokens, reduce-scatter the partial outputs; "shared": the
        # slices' tokens are the same, their outputs all-reduced (= reduce-scatter + allgather)
        es_span = env.span(c.es, 1)
        moved = {None: c.es * a2a_bytes, "gather": T_r * h * b, "shared": T_r * h * b}[es_mode]
        cb["es_gather"] = moved
        es_s = net * (coll.allgather_s(moved, es_span, env.cluster)
                      + coll.reduce_scatter_s(moved, es_span, env.cluster))
    es_fixed = fixed(Phase.ES_COMM)
    if es_s or es_fixed:
        ph[Phase.ES_COMM] = es_s + es_fixed
    # Expected local experts that receive at least one token (uniform routing); all of them once
    # the pass carries many tokens, a few during decode — which is what makes decode cheaper on
    # more GPUs: each holds fewer experts, so reads fewer weights per token.
    # Which local experts' weights are read: DeepSpeed's loop runs every one on its padded
    # rows, and so does moerun's loop on CPU (skipping one would need its count on the host);
    # moerun's inference grouped GEMM on a GPU skips the experts no token chose (a device flag):
    # the expected number that receive one under uniform routing.
    routed = c.ep * c.es * T_r * spec.top_k
    skips = (not deepspeed and dev.kind == "gpu"
             and (p.decode or env.workload.mode == "infer"))
    active = local * (1.0 - (1.0 - 1.0 / E) ** routed) if skips else local
    fe = spec.expert_ffn
    expert_flops_s = local * ((m - 1) * gemm_s(expert_rows, fe / c.es, h, dev, dt)
                              + gemm_s(expert_rows, h, fe / c.es, dev, dt))
    expert_bytes = b * (active * m * h * fe / c.es + local * expert_rows * 2 * h)
    # DeepSpeed's loop: besides the GEMMs its activation, bias and output cat, as counted
    ds_expert_bytes = (traffic(Phase.EXPERTS, local, expert_rows, fe // c.es,
                               chunked=c.ep > 1 and local > 1).other_bytes
                       if deepspeed else 0.0)
    ph[Phase.EXPERTS] = compute(Phase.EXPERTS, expert_flops_s, expert_bytes, local,
                                serial_bytes=ds_expert_bytes,
                                added_bytes=block_elementwise_bytes(
                                    env, s, p, Phase.EXPERTS, fe // c.es, local, expert_rows))
    if deepspeed:  # einsum "sec,ecm->sm", or _sparse_decode's gather, fp32 weighting and sum
        ph[Phase.COMBINE] = counted(Phase.COMBINE, T_r, h, rows, dt)
    else:
        ph[Phase.COMBINE] = compute(Phase.COMBINE, 0.0, b * (rows * h + T_r * h))
    if c.coordinated and tp > 1:
        cb["tp_allgather"] = T * h * b
        ph[Phase.TP_COMM] += net * coll.allgather_s(T * h * b, tp_span, env.cluster)
    _shared(env, cost, p)
    # One token bucket (where the links have one: `after_idle`) serves every exchange of the
    # step and refills whenever they idle: through the compute of this layer and of the layers
    # without an exchange that come with it (a PR-MoE has a dense layer per MoE layer), and
    # while its ranks wait for their peers' turns; the layer's two exchanges share that.
    per_layer = env.layers_per_moe_layer
    idle = ((1.0 + wait_factor(env, p.decode)) * per_layer / 2
            * sum(t for k, t in ph.items() if k in COMPUTE_PHASES))
    a2a_s = net * coll.all_to_all_s(a2a_bytes, ep_span, env.cluster, c.a2a, idle)
    for phase in EXCHANGE:
        ph[phase] += a2a_s
    return cost


def es_inference(env: Env, s: Setting, c: LayerChoice, p: Pass) -> str | None:
    """How an inference pass runs expert slicing (`runtime/model.py` chooses the same): "gather"
    (the es ranks hold different tokens: gathered before the gate, as DeepSpeed-MoE's inference
    does), "shared" (the es ranks are tensor-slicing peers holding the same tokens), or None —
    training, no slicing, or es ranks only some of which share tokens (the training path)."""
    if c.es == 1 or (env.workload.mode == "train" and not p.decode):
        return None
    if c.coordinated or s.tp == 1:
        return "gather"
    return "shared" if s.tp % c.es == 0 else None


def gate_tokens(env: Env, s: Setting, c: LayerChoice, p: Pass) -> int:
    """Tokens one gate call routes: the pass's (1/tp of them when TP-coordinated), times es
    where inference gathers the slicing group's tokens before the gate."""
    T_r = ceil(p.tokens / s.tp) if c.coordinated else p.tokens
    return T_r * (c.es if es_inference(env, s, c, p) == "gather" else 1)


def _shared(env: Env, cost: LayerCost, p: Pass) -> LayerCost:
    """Compute phases at the speed of ranks running side by side (`sharing`)."""
    slow, _ = sharing(env, p.decode)
    if slow != 1.0:
        for ph in COMPUTE_PHASES:
            if ph in cost.phases:
                cost.phases[ph] *= slow
    return cost


def wait_factor(env: Env, decode: bool = False) -> float:
    """Seconds a rank waits at collectives for its peers per second of its own compute: the
    others' turns on shared cores (turns − 1, of which the profile's measured `turn_share`
    shows up as waiting), or at least the measured skew between ranks running side by side.
    0 without a measured profile."""
    fw = env.cluster.device.framework
    if fw is None or env.gpus == 1:
        return 0.0
    share = fw.decode_turn_share if decode else fw.turn_share
    return max(share * (sharing(env, decode)[1] - 1.0), fw.skew)


def add_turn_wait(env: Env, cost: LayerCost, train: bool, exchanges: bool,
                  decode: bool = False) -> None:
    """Ranks wait at the layer's collectives for their peers' compute (`wait_factor` × the
    layer's compute): at the layer's all-to-alls where it `exchanges` (ep·es > 1), or as `wait`
    for a layer without one (dense, or ep·es = 1), which the plan hands on to the next
    collective (where the runtime's timers see it). A forward pass waits for the experts at the
    combine and for the rest at the dispatch; backward runs the layer the other way round, so in
    training (backward twice the forward) the two all-to-alls wait about equally."""
    factor = wait_factor(env, decode)
    if factor <= 0.0:
        return
    compute = {ph: t for ph, t in cost.phases.items() if ph in COMPUTE_PHASES}
    wait = factor * sum(compute.values())
    if exchanges:
        at_combine = (wait / 2 if train else
                      wait * compute.get(Phase.EXPERTS, 0.0) / max(sum(compute.values()), 1e-30))
        for ph, t in ((Phase.DISPATCH_A2A, wait - at_combine), (Phase.COMBINE_A2A, at_combine)):
            cost.phases[ph] += t
            cost.fixed[ph] = cost.fixed.get(ph, 0.0) + t
    else:
        cost.phases[Phase.WAIT] = wait


def activation_bytes(env: Env, s: Setting, index: int, c: LayerChoice, p: Pass) -> float:
    """Activations one forward pass of this layer keeps for backward (or needs as workspace)."""
    spec, b, tp, T = env.spec, env.dtype_bytes, s.tp, p.tokens
    E = spec.experts[index]
    deepspeed = is_deepspeed(env.runtime)  # Megatron's attention and dropout; moerun has none
    dropout = deepspeed and env.workload.mode == "train"
    total = attention_activation_bytes(T, p.context, spec.hidden, spec.heads, tp, b,
                                       scores=deepspeed, dropout=dropout)
    f_mlp = spec.ffn_hidden if (E == 0 or spec.residual) else spec.shared_ffn_hidden
    if f_mlp:
        total += mlp_activation_bytes(T, spec.hidden, tp, b, f_mlp, spec.mlp == "swiglu",
                                      dropout=dropout)
    if E:
        T_r = gate_tokens(env, s, c, p)
        C = spec.capacity(E, T_r, train=env.workload.mode == "train")
        received = E * C * (1 if es_inference(env, s, c, p) else c.es)
        total += moe_activation_bytes(spec, E, T, T_r, E * C, received, c.es, b)
    # the two layer norms' inputs, counted above at the dtype's bytes, are the residual stream's
    return total + 2 * T * spec.hidden * (env.residual_bytes - b)


def weight_memory(env: Env, s: Setting, index: int, c: LayerChoice) -> dict[str, float]:
    """Weights, gradients and optimizer states of this layer on one GPU."""
    lp = layer_params(env.spec, index)
    train = env.workload.mode == "train"
    st = env.state
    non_expert = lp.non_expert / s.tp
    expert = (lp.experts // c.ep) * lp.per_expert / c.es if lp.experts else 0.0
    edp, _ = env.expert_dp_group(c, s.tp)
    mem = {"weights": st.weights * non_expert, "expert_weights": st.weights * expert}
    if train:
        mem["gradients"] = st.gradients * non_expert / gradient_share(env, s.dp)
        mem["expert_gradients"] = st.gradients * expert / gradient_share(env, edp)
        mem["optimizer_states"] = st.optimizer * non_expert / (s.dp if st.sharded else 1)
        mem["expert_optimizer_states"] = st.optimizer * expert / (edp if st.sharded else 1)
    return {k: v for k, v in mem.items() if v}


def gradient_share(env: Env, group: int) -> int:
    """Over how many ranks a parameter's gradient memory is split at its peak: ZeRO-2 under
    DeepSpeed reduces buckets during the backward and keeps only its partition; moerun
    reduces once the backward is over, so the whole gradients exist until then."""
    return group if env.workload.zero_stage >= 2 and is_deepspeed(env.runtime) else 1
