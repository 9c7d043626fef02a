"""The weight update of a training step: the gradients' synchronisation by ZeRO stage and the
optimizer step (Adam's memory traffic and its per-tensor operations), per layer and for the
embedding; `step.train_layer` and `step.head_cost` add them to the layer's phases.
"""

from __future__ import annotations

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.compute import memory_s
from moeplan.cost_models.env import Env
from moeplan.cost_models.layer import sharing
from moeplan.cost_models.runtimes import (
    HOST_SYNC_S,
    OptimizerCount,
    gpu_optimizer,
    is_deepspeed,
    optimizer_work,
)

OPTIMIZER_OPS_PER_TENSOR = 16  # CPU: AdamW single-tensor step 10.2, clipping + zero_grad 5.3
ADAM_BYTES_PER_PARAM = 28  # read fp16 grad + fp32 master, m, v; write master, m, v and fp16 weight


def reductions(env: Env, micro_steps: int) -> int:
    """Gradient reductions a step. DeepSpeed's ZeRO-2 keeps only its partition of the
    gradients, so it reduces after every backward — once per micro-step, not once per step
    (DeepSpeed issue #2252, its maintainer: "gradient reduction is required after every
    backward because of gradient partitioning"); otherwise once, at the step."""
    return micro_steps if env.workload.zero_stage == 2 and is_deepspeed(env.runtime) else 1


def grad_sync_s(env: Env, params: float, size: int, stride: int, latency: bool = True,
                micro_steps: int = 1) -> float:
    """Synchronisation of `params` gradient elements over a group of `size` ranks with
    `stride`: an allreduce, as often as `reductions` says — moerun's ZeRO-2 reduce-scatters
    instead, while DeepSpeed's allreduces each bucket whole for all ranks at once (v0.16.4
    stage_1_and_2.py, `use_multi_rank_bucket_allreduce`, on by default) — then, where the
    optimizer states are partitioned, the updated weights' allgather; bytes by the runtime's
    precision layout (`memory.train_state`).

    The runtime reduces all gradients that share a group as one flat bucket, so a layer's
    non-expert gradients add only bytes (`latency=False`); the bucket's latency is charged once,
    with the embedding's gradients (`step.head_cost`)."""
    if not latency:
        return max(0.0, grad_sync_s(env, params, size, stride, micro_steps=micro_steps)
                   - grad_sync_s(env, 1e-9, size, stride, micro_steps=micro_steps))
    span, net, st = env.span(size, stride), env.scales.communication, env.state
    reduced = st.reduced * params
    if env.workload.zero_stage == 2 and not is_deepspeed(env.runtime):
        sync = coll.reduce_scatter_s(reduced, span, env.cluster)
    else:
        sync = reductions(env, micro_steps) * coll.allreduce_s(reduced, span, env.cluster)
    if st.gathered:
        sync += coll.allgather_s(st.gathered * params, span, env.cluster)
    return net * sync


def optimizer_s(env: Env, local: float, share: float, tensors: int, shards: int = 1,
                micro_steps: int = 1) -> float:
    """The optimizer's work on a rank holding `local` parameter elements in `tensors` tensors
    and stepping `share` of those elements, about 1/`shards` of the tensors (ZeRO 1/2 or
    DeepSpeed's BF16 optimizer): Adam's memory traffic plus its per-tensor operations; on a GPU
    as the runtime reduces and steps there (`runtimes.gpu_optimizer`: the reduction's local
    copies, the gradient accumulation it does every micro-step). Once-a-step host syncs:
    `optimizer_step_s`."""
    dev = env.cluster.device
    fw = dev.framework
    k = env.scales
    if fw is not None:  # measured on one rank alone; every rank steps at once, no collective
        slow, turns = sharing(env)
        return slow * turns * (k.framework * tensors * fw.optimizer_tensor_s
                               + k.compute * share * fw.optimizer_param_s)
    c = counted(env)
    if c is None:
        return (k.compute * memory_s(ADAM_BYTES_PER_PARAM * share, dev)
                + k.framework * tensors * OPTIMIZER_OPS_PER_TENSOR * dev.op_overhead_s)
    mine = tensors / shards
    launches, nbytes = optimizer_work(c, local, share, tensors, mine, micro_steps,
                                      reductions(env, micro_steps))
    return (k.compute * memory_s(nbytes, dev)
            + k.framework * (launches * dev.op_overhead_s + c.tensor_syncs * mine * HOST_SYNC_S))


def counted(env: Env) -> OptimizerCount | None:
    """The runtime's counted weight update where the cost model charges it: on a GPU whose
    profile has not measured the framework (None elsewhere)."""
    dev, w = env.cluster.device, env.workload
    if dev.framework is not None or dev.kind != "gpu":
        return None
    return gpu_optimizer(env.runtime, w.zero_stage, w.dtype)


def optimizer_step_s(env: Env) -> float:
    """The optimizer's host syncs that come once a step, whatever the layers."""
    c = counted(env)
    return 0.0 if c is None else env.scales.framework * c.step_syncs * HOST_SYNC_S


def layer_tensors(spec, index: int) -> int:
    """Parameter tensors of a layer in the runtime (layer norms, attention, MLP or router +
    experts + residual MLP and its coefficient)."""
    base = 4 + 8  # two layer norms; q, k, v weights and biases, projection weight and bias
    if not spec.experts[index]:
        return base + 4
    return base + 1 + 4 + (6 if spec.residual else 0)
