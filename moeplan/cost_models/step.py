"""Whole-step costs: a layer's phases per training step or per generated token, and the
embedding/LM-head part that every plan shares.

Training step = micro_steps × (forward·(1 + recompute) + backward) per layer, then gradient
synchronisation (non-expert parameters over dp, each MoE layer's experts over its edp) and the
optimizer. Inference = prefill of the prompt once, then one decode pass per generated token (its
attention context: `decode_pass`); the plan's latency is the decode pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.compute import gemm_s, memory_s, roofline_s
from moeplan.cost_models.env import DENSE, Env, LayerChoice, LayerCost, Pass
from moeplan.cost_models.layer import (
    COMM_PHASES,
    COMPUTE_PHASES,
    activation_bytes,
    add_turn_wait,
    fixed_s,
    forward,
    gradient_share,
    sharing,
    wait_factor,
    weight_memory,
    work_scale,
)
from moeplan.cost_models.memory import DEEPSPEED_REDUCE_BUCKET, kv_cache_bytes
from moeplan.cost_models.params import embedding_params, layer_params
from moeplan.cost_models.runtimes import is_deepspeed
from moeplan.cost_models.update import grad_sync_s, layer_tensors, optimizer_s, optimizer_step_s
from moeplan.spec.phases import Phase
from moeplan.spec.workload import Setting, Workload

HEAD_TENSORS = 4  # token and position embeddings, final layer norm weight and bias


def train_pass(env: Env, s: Setting) -> Pass:
    w = env.workload
    return Pass(tokens=s.micro_batch * w.seq_len, context=w.seq_len, decode=False)


def decode_pass(env: Env, s: Setting) -> Pass:
    """One generated token per sequence. moerun's static KV cache attends over the whole
    preallocated buffer under a mask (every step the same shapes, for CUDA graphs); DeepSpeed's
    kernels read the filled part, on average prompt + gen/2 positions."""
    w = env.workload
    context = w.seq_len if env.runtime == "moerun" else w.prompt_len + ceil(w.gen_len / 2)
    return Pass(tokens=s.micro_batch, context=context, decode=True)


def prefill_pass(env: Env, s: Setting) -> Pass:
    w = env.workload
    return Pass(tokens=s.micro_batch * w.prompt_len, context=w.prompt_len, decode=False)


def train_passes(env: Env, s: Setting, fwd: LayerCost, exchanges: bool) -> LayerCost:
    """A training step's phases from one forward pass's: compute phases run forward, (the
    recomputed forward,) and backward at twice the forward; communication once each way; every
    micro-step; then the ranks' waits for each other at the exchanges (`add_turn_wait`)."""
    steps, r = s.micro_steps(env.workload), int(s.recompute)
    cost = LayerCost(comm_bytes=fwd.comm_bytes)
    for name, t in fwd.phases.items():
        passes = (3 + r) if name in COMPUTE_PHASES else (2 + r)
        cost.phases[name] = steps * passes * t
        if name in fwd.fixed:
            cost.fixed[name] = steps * passes * fwd.fixed[name]
    add_turn_wait(env, cost, train=True, exchanges=exchanges)
    return cost


def train_layer(env: Env, s: Setting, index: int, c: LayerChoice) -> LayerCost:
    p = train_pass(env, s)
    cost = train_passes(env, s, forward(env, s, index, c, p), exchanges=c.ep * c.es > 1)
    steps = s.micro_steps(env.workload)
    lp = layer_params(env.spec, index)
    non_expert = lp.non_expert / s.tp
    expert = (lp.experts // c.ep) * lp.per_expert / c.es if lp.experts else 0.0
    edp, edp_stride = env.expert_dp_group(c, s.tp)
    sync = grad_sync_s(env, non_expert, s.dp, s.tp, latency=False, micro_steps=steps)
    if expert:
        sync += grad_sync_s(env, expert, edp, edp_stride, micro_steps=steps)
    cost.phases[Phase.GRAD_SYNC] = sync
    sharded = env.state.sharded
    shards = s.dp if sharded else 1
    cost.phases[Phase.OPTIMIZER] = optimizer_s(
        env, non_expert + expert, non_expert / shards + expert / (edp if sharded else 1),
        layer_tensors(env.spec, index), shards, micro_steps=steps)
    cost.memory = weight_memory(env, s, index, c)
    act = activation_bytes(env, s, index, c, p)
    if s.recompute:  # keep the layer input; rebuild the rest one layer at a time in backward
        cost.memory["activations"] = p.tokens * env.spec.hidden * env.residual_bytes
        cost.transient_bytes = act
    else:
        cost.memory["activations"] = act
    return cost


def infer_layer(env: Env, s: Setting, index: int, c: LayerChoice) -> tuple[LayerCost, LayerCost]:
    """(decode cost per generated token, prefill cost once per batch) of one layer."""
    decode = forward(env, s, index, c, decode_pass(env, s))
    add_turn_wait(env, decode, train=False, exchanges=c.ep * c.es > 1, decode=True)
    prefill_p = prefill_pass(env, s)
    prefill = forward(env, s, index, c, prefill_p)
    add_turn_wait(env, prefill, train=False, exchanges=c.ep * c.es > 1)
    decode.memory = weight_memory(env, s, index, c)
    w = env.workload
    decode.memory["kv_cache"] = kv_cache_bytes(s.micro_batch, w.seq_len, env.spec, s.tp,
                                               env.dtype_bytes)
    decode.transient_bytes = activation_bytes(env, s, index, c, prefill_p)
    return decode, prefill


def teacher_choice(env: Env, experts: int) -> LayerChoice:
    """The degrees a Mixture-of-Students teacher's MoE layer runs with beside its student: its
    experts spread as far as the world allows (ep the largest divisor of E that divides the
    world and fits its nodes), no slicing, flat all-to-all — DeepSpeed's usual ep = E."""
    G, N = env.gpus_per_node, env.gpus
    ep = max(d for d in range(1, experts + 1)
             if experts % d == 0 and N % d == 0 and (G % d == 0 or d % G == 0))
    return LayerChoice(ep=ep, es=1, a2a="flat", coordinated=False)


@dataclass
class TeacherCost:
    layers: list[tuple[LayerChoice, LayerCost]]  # one forward pass of each layer
    head_s: float  # one forward pass of the logits
    micro_steps: int

    @property
    def time_s(self) -> float:
        """Seconds per training step: a forward of every micro-batch."""
        return self.micro_steps * (self.head_s + sum(c.time_s for _, c in self.layers))


def teacher_cost(env: Env, s: Setting) -> TeacherCost:
    """The teacher's forward on each micro-batch of a Mixture-of-Students step (DeepSpeed-MoE
    §4.2): the student's tp, each MoE layer at `teacher_choice`, in evaluation (inference
    capacity, no dropout, no gradients), then the logits of every token for the KD loss."""
    w = env.workload
    teacher = replace(env, spec=env.teacher, teacher=None, workload=Workload(
        mode="infer", global_batch=w.global_batch, micro_batch=w.micro_batch, seq_len=w.seq_len,
        prompt_len=w.seq_len - 1, gen_len=1, dtype=w.dtype, zero_stage=0))
    p = Pass(tokens=s.micro_batch * w.seq_len, context=w.seq_len, decode=False)
    layers = []
    for i, E in enumerate(teacher.spec.experts):
        c = teacher_choice(teacher, E) if E else DENSE
        cost = forward(teacher, s, i, c, p)
        add_turn_wait(teacher, cost, train=False, exchanges=c.ep * c.es > 1)
        cost.memory = weight_memory(teacher, s, i, c)
        layers.append((c, cost))
    spec, dev, b = teacher.spec, teacher.cluster.device, teacher.dtype_bytes
    V, h = spec.vocab_size, spec.hidden
    roof = roofline_s(gemm_s(p.tokens, V / s.tp, h, dev, w.dtype), b * V * h / s.tp, dev, 0.0)
    slow, _ = sharing(teacher)
    head = slow * (env.scales.compute * roof + fixed_s(teacher, Phase.HEAD, p))
    return TeacherCost(layers, head, s.micro_steps(w))


def head_cost(env: Env, s: Setting) -> LayerCost:
    """Token/position embedding and the tied LM head (vocabulary-parallel over tp)."""
    spec, dev, dt, b = env.spec, env.cluster.device, env.workload.dtype, env.dtype_bytes
    h, V, k = spec.hidden, spec.vocab_size, env.scales
    params = embedding_params(spec) / s.tp
    tp_span = env.span(s.tp, 1)
    cost = LayerCost()
    train = env.workload.mode == "train"
    st = env.state
    cost.memory["weights"] = st.weights * params
    if train:
        slow, _ = sharing(env)
        p = train_pass(env, s)
        steps = s.micro_steps(env.workload)
        roof = roofline_s(gemm_s(p.tokens, V / s.tp, h, dev, dt), b * V * h / s.tp, dev, 0.0)
        fwd = (slow * (k.compute * work_scale(env, Phase.HEAD, p, roof) * roof
                       + fixed_s(env, Phase.HEAD, p))
               + k.communication * coll.allreduce_s(p.tokens * h * b, tp_span, env.cluster))
        cost.phases[Phase.HEAD] = steps * 3 * fwd
        # ranks wait for each other's head compute at the next collectives (the first and the
        # last all-to-all, the gradient sync); charged with the gradient sync
        fw = dev.framework
        cost.phases[Phase.GRAD_SYNC] = (
            grad_sync_s(env, params, s.dp, s.tp, micro_steps=steps)
            + wait_factor(env) * cost.phases[Phase.HEAD]
            + (k.communication * fw.grad_sync_extra_s if fw and env.gpus > 1 else 0.0))
        shards = s.dp if st.sharded else 1
        cost.phases[Phase.OPTIMIZER] = (
            optimizer_s(env, params, params / shards, HEAD_TENSORS, shards, micro_steps=steps)
            + optimizer_step_s(env))  # the step's once-only host syncs, charged here
        cost.memory["gradients"] = st.gradients * params / gradient_share(env, s.dp)
        cost.memory["optimizer_states"] = st.optimizer * params / shards
        cost.memory["logits"] = 4.0 * p.tokens * V / s.tp  # fp32 logits for the loss
        if is_deepspeed(env.runtime) and env.workload.zero_stage >= 1:
            cost.memory["reduce_bucket"] = DEEPSPEED_REDUCE_BUCKET * st.weights
        if env.teacher is not None:
            t = teacher_cost(env, s)
            cost.phases[Phase.TEACHER] = t.time_s
            cost.memory["teacher_weights"] = (
                b * embedding_params(env.teacher) / s.tp
                + sum(v for _, c in t.layers for v in c.memory.values()))
            cost.memory["logits"] *= 2  # the teacher's beside the student's
        return cost
    # Inference: logits only for the newest token of each sequence.
    tokens = s.micro_batch
    slow, _ = sharing(env, decode=True)
    p = decode_pass(env, s)
    roof = roofline_s(gemm_s(tokens, V / s.tp, h, dev, dt), b * V * h / s.tp, dev, 0.0)
    cost.phases[Phase.HEAD] = (slow * (k.compute * work_scale(env, Phase.HEAD, p, roof) * roof
                                       + fixed_s(env, Phase.HEAD, p))
                               + k.communication * coll.allgather_s(tokens * V * b, tp_span,
                                                                    env.cluster))
    wait = wait_factor(env, decode=True) * cost.phases[Phase.HEAD]
    if wait:  # at the next token's first collective: the plan hands it on
        cost.phases[Phase.WAIT] = wait
    cost.transient_bytes = 4.0 * tokens * V / s.tp
    return cost


def with_untimed(env: Env, s: Setting, head: LayerCost, layers_s: float) -> LayerCost:
    """The head with the step's `untimed` seconds added: what the runtime spends outside every
    timed phase (the batch, each gate's noise keys and routing loads, glue between phases) —
    the measured profile's seconds per layer and micro-step (per layer and token in decode), or
    for a profile from before those, its fraction of everything else (`layers_s` is the layers'
    total). Unchanged without a measured framework."""
    fw = env.cluster.device.framework
    if fw is None:
        return head
    train = env.workload.mode == "train"
    per_layer = fw.untimed_layer_s if train else fw.decode_untimed_layer_s
    if per_layer is not None:
        passes = env.spec.num_layers * (s.micro_steps(env.workload) if train else 1)
        t = env.scales.framework * per_layer * passes
    else:
        f = fw.untimed_fraction if train else fw.decode_untimed_fraction
        t = f * (layers_s + head.time_s)
    if t <= 0.0:
        return head
    out = LayerCost(phases=dict(head.phases), comm_bytes=head.comm_bytes, memory=head.memory,
                    transient_bytes=head.transient_bytes, fixed=head.fixed)
    out.phases[Phase.UNTIMED] = t
    return out


def prefill_head_s(env: Env, s: Setting) -> float:
    """The prompt pass embeds every prompt token and reads the head once for the last one."""
    dev = env.cluster.device
    return memory_s(env.dtype_bytes * s.micro_batch * env.workload.prompt_len * env.spec.hidden,
                    dev) + head_cost(env, s).phases[Phase.HEAD]


__all__ = ["COMM_PHASES", "COMPUTE_PHASES", "train_layer", "infer_layer", "head_cost",
           "prefill_head_s", "with_untimed"]
