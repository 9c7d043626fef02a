"""The weight update of a training step: the gradients' synchronisation by ZeRO stage and the
optimizer step (Adam's memory traffic and its per-tensor operations), per layer and for the
embedding; `step.train_layer` and `step.head_cost` add them to the layer's phases.
"""

from __future__ import annotations

from moeplan.cost_models import collectives as coll
from moeplan.cost_models.compute import memory_s
from moeplan.cost_models.layer import Env, sharing
from moeplan.cost_models.runtimes import HOST_SYNC_S, gpu_optimizer

OPTIMIZER_OPS_PER_TENSOR = 16  # CPU: AdamW single-tensor step 10.2, clipping + zero_grad 5.3
ADAM_BYTES_PER_PARAM = 28  # read fp16 grad + fp32 master, m, v; write master, m, v and fp16 weight


def grad_sync_s(env: Env, nbytes: float, size: int, stride: int, latency: bool = True,
                micro_steps: int = 1) -> float:
    """Gradient synchronisation by ZeRO stage: allreduce (0), + parameter allgather (1),
    reduce-scatter + allgather (2), over a group of `size` ranks with `stride`. DeepSpeed's
    ZeRO-2 keeps only its partition of the gradients, so it reduce-scatters after every
    backward — once per micro-step, not once per step (DeepSpeed issue #2252, its maintainer:
    "gradient reduction is required after every backward because of gradient partitioning").

    The runtime reduces all gradients that share a group as one flat bucket, so a layer's
    non-expert gradients add only bytes (`latency=False`); the bucket's latency is charged once,
    with the embedding's gradients (`step.head_cost`)."""
    if not latency:
        return max(0.0, grad_sync_s(env, nbytes, size, stride, micro_steps=micro_steps)
                   - grad_sync_s(env, 1e-9, size, stride, micro_steps=micro_steps))
    span, net = env.span(size, stride), env.scales.communication
    if env.workload.zero_stage == 0:
        return net * coll.allreduce_s(nbytes, span, env.cluster)
    gather = coll.allgather_s(nbytes, span, env.cluster)
    if env.workload.zero_stage == 1:
        return net * (coll.allreduce_s(nbytes, span, env.cluster) + gather)
    reductions = micro_steps if env.runtime == "deepspeed" else 1
    return net * (reductions * coll.reduce_scatter_s(nbytes, span, env.cluster) + gather)


def optimizer_s(env: Env, local_params: float, tensors: int, shards: int = 1) -> float:
    """Adam's memory traffic over the local parameters plus its per-tensor operations; on a
    GPU as the runtime's optimizer runs there (`runtimes.gpu_optimizer`), where a rank under
    ZeRO 1/2 covers about 1/`shards` of the tensors."""
    dev = env.cluster.device
    fw = dev.framework
    k = env.scales
    if fw is not None:  # measured on one rank alone; every rank steps at once, no collective
        slow, turns = sharing(env)
        return slow * turns * (k.framework * tensors * fw.optimizer_tensor_s
                               + k.compute * local_params * fw.optimizer_param_s)
    w = env.workload
    counted = gpu_optimizer(env.runtime, w.zero_stage, w.dtype) if dev.kind == "gpu" else None
    if counted is None:
        return (k.compute * memory_s(ADAM_BYTES_PER_PARAM * local_params, dev)
                + k.framework * tensors * OPTIMIZER_OPS_PER_TENSOR * dev.op_overhead_s)
    launches, syncs, nbytes, per_element = counted
    mine = tensors / shards
    return (k.compute * memory_s(nbytes * local_params, dev)
            + k.framework * ((launches * mine + per_element * local_params) * dev.op_overhead_s
                             + syncs * mine * HOST_SYNC_S))


def layer_tensors(spec, index: int) -> int:
    """Parameter tensors of a layer in the runtime (layer norms, attention, MLP or router +
    experts + residual MLP and its coefficient)."""
    base = 4 + 8  # two layer norms; q, k, v weights and biases, projection weight and bias
    if not spec.experts[index]:
        return base + 4
    return base + 1 + 4 + (6 if spec.residual else 0)
