"""Count DeepSpeed-MoE's kernels per MoE layer phase, forward and backward, by running its layer:
to check the counts `moeplan/cost_models/runtimes.py` charges for `--runtime deepspeed`
(`DEEPSPEED_OPS`, the experts' loop), whose backward figures were estimates.

    pip install deepspeed==0.16.4      # in an environment of its own: not a moeplan dependency
    python bench/count_deepspeed_moe_ops.py [--out bench/results/deepspeed-moe-ops.json]

DeepSpeed's `deepspeed.moe.layer.MoE` (DS_ACCELERATOR=cpu, one gloo rank, so every expert is
local and the all-to-alls move nothing) runs top-1 gating as the paper's models train it (random
token selection on, capacity factor 1, min capacity 4, dropping tokens) over bf16 tokens (its
gate computes in fp32, as on a GPU under fp16/bf16), experts of two linear layers with biases
and a GELU. The counting mode of bench/op_count.py counts the training forward and backward of
the layer (gradients flowing into its input, as inside a model; the output's gradient given, no
loss), and the inference forward. Phases: gate (the TopKGate module), dispatch (from the gate's
end to the experts: the einsum and the first all-to-all), experts (the Experts module), combine
(after it). Forward operations go to the phase running; backward ones to the phase whose
forward made the autograd node running them (by its sequence number, the node's prehook
moving the phase). Operations on host scalars (the capacity, computed from `torch.tensor`s that
stay on the CPU on a GPU too) are listed apart as host operations, and reading them back as host
reads, not device syncs (bench/op_count.py); `F.one_hot` runs as ATen runs it on CUDA (zeros and
a scatter: its class checks, a min/max read back on the host, are CPU-only — Onehot.cpp relies on
scatter's device asserts there). Counted for 2 and 4 local experts on one rank, and again
expert-parallel over 2 gloo ranks (`by_local_experts_ep2`: the all-to-alls run, and the copies
they make of non-contiguous inputs are counted); the experts' figure is given
as a + b·L for L local experts, also for the Experts module alone on the input an all-to-all
over 2 ranks leaves (each expert's chunk is then not contiguous: a copy before its first GEMM).
"""

from __future__ import annotations

import argparse
import os
import sys

from op_count import counter, rank_env, run_world, save_json, start_deepspeed

os.environ.setdefault("DS_ACCELERATOR", "cpu")

PHASES = ("gate", "dispatch", "experts", "combine")
TOKENS, HIDDEN = 64, 16
FFN = 2 * HIDDEN  # the experts' width, as `_count` builds them


def _cuda_one_hot(t, num_classes):
    """`F.one_hot` as ATen runs it on CUDA: zeros and a scatter, no class checks read back
    (DeepSpeed's gates always give `num_classes`)."""
    import torch

    out = torch.zeros(*t.shape, num_classes, dtype=t.dtype, device=t.device)
    return out.scatter_(-1, t.unsqueeze(-1), 1)


def _count(experts: int, ep: int = 1, k: int = 1, tokens: int = TOKENS, hidden: int = HIDDEN,
           capacity_factor: float = 1.0, dtype: str = "bfloat16", alone: bool = True,
           eval_rts: bool = True, ffn: int | None = None) -> dict:
    """The layer's counts with `experts` local experts, expert-parallel over `ep` ranks, top-k,
    for `tokens` tokens of width `hidden` in `dtype` (the experts' FFN `ffn`, by default twice
    the width); with
    the Experts module also counted `alone` (top-1, one rank); inference with random token
    selection if `eval_rts` (the training layer in eval mode) or without (as DeepSpeed's
    inference MoE builds its gate: moe_inference.py, use_rts=False)."""
    import deepspeed.moe.sharded_moe as sharded
    import torch
    import torch.nn.functional as F
    from deepspeed.moe.layer import MoE

    F.one_hot = _cuda_one_hot  # this process only counts
    if hasattr(sharded, "_one_hot_to_float"):  # up to 0.19.3: a TorchScript function around it
        sharded._one_hot_to_float = lambda x, num_classes: _cuda_one_hot(x, num_classes).float()

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    f = ffn or 2 * hidden
    expert = torch.nn.Sequential(torch.nn.Linear(hidden, f), torch.nn.GELU(),
                                 torch.nn.Linear(f, hidden))
    layer = MoE(hidden_size=hidden, expert=expert, num_experts=experts * ep, ep_size=ep, k=k,
                capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                min_capacity=4, use_rts=True, drop_tokens=True)
    layer.set_deepspeed_parallelism()
    inner = layer.deepspeed_moe
    inner.experts.to(dt)
    count = counter()
    marks: dict[str, int] = {}

    def mark(name: str):
        """The autograd sequence number now (a marker node, made while not counting)."""
        was, c.on = c.on, False
        marks[name] = (torch.ones(1, requires_grad=True) * 1).grad_fn._sequence_nr()
        c.on = was

    def enter(phase: str):
        def hook(*_):  # returns None: the module's inputs and outputs stay as they are
            mark(phase)
            _go(phase)
        return hook

    def phase_hooks():
        return [inner.gate.register_forward_pre_hook(enter("gate")),
                inner.gate.register_forward_hook(enter("dispatch")),
                inner.experts.register_forward_pre_hook(enter("experts")),
                inner.experts.register_forward_hook(enter("combine"))]

    def _go(phase: str):
        c.phase = phase

    out: dict = {}
    for training in (True, False):
        layer.train(training)
        inner.gate.use_rts = training or eval_rts
        x = torch.randn(2, tokens // 2, hidden, dtype=dt, requires_grad=training)
        layer(x)  # warm-up (lazy buffers)
        c = count("outside")
        hooks = phase_hooks()
        with c:
            y, l_aux, _ = layer(x)
            mark("end")
            if training:
                bounds = [(marks[p], p) for p in PHASES]

                def phase_of(seq: int) -> str:
                    name = "outside"
                    for start, p in bounds:
                        if seq >= start:
                            name = p
                    return name if seq < marks["end"] else "outside"

                seen, todo = set(), [y.grad_fn, l_aux.grad_fn]
                while todo:
                    node = todo.pop()
                    if node is None or node in seen:
                        continue
                    seen.add(node)
                    p = phase_of(node._sequence_nr())
                    node.register_prehook(lambda grads, p=p: _go("bwd " + p))
                    todo.extend(n for n, _ in node.next_functions)
                c.phase = "bwd outside"
                torch.autograd.backward([y, l_aux], [torch.ones_like(y), torch.ones_like(l_aux)])
        for h in hooks:
            h.remove()
        key = "train" if training else "infer"
        out[key] = {
            "forward": {p: c.launches[p] for p in PHASES},
            "backward": {p: c.launches["bwd " + p] for p in PHASES} if training else {},
            "syncs": {p: n for p, n in c.syncs.items() if n},
            "host_reads": {p: n for p, n in c.host_reads.items() if n},
            "collectives": {p: dict(v) for p, v in c.collectives.items() if v},
            "host_ops": {p: dict(ops) for p, ops in c.host_ops.items() if ops},
            "outside": {"forward": c.launches["outside"], "backward": c.launches["bwd outside"]},
            "ops": {p: dict(ops) for p, ops in c.ops.items() if ops},
            "bytes": {way: {p: {"bytes": c.bytes[pre + p], "gemm_bytes": c.gemm_bytes[pre + p],
                                "gemm_flops": c.flops[pre + p]} for p in PHASES}
                      for way, pre in (("forward", ""), ("backward", "bwd "))
                      if training or way == "forward"}}
    if ep == 1 and k == 1 and alone:
        out["experts_ep2"] = _count_experts(experts, TOKENS // experts)
    return out


def _rank(rank: int, world: int, port: int, queue) -> None:
    """One rank of an expert-parallel world: the layer counted with its all-to-alls."""
    rank_env(rank, world, port)
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    counts = {L: _count(L, ep=world) for L in (2, 4)}
    if rank == 0:
        queue.put(counts)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _count_experts(experts: int, rows: int, hidden: int = HIDDEN,
                   ffn: int = FFN, dtype: str = "bfloat16") -> dict:
    """DeepSpeed's Experts module alone on the [ep, local experts, rows, hidden] input an
    all-to-all over 2 ranks leaves (each expert's chunk then not contiguous where there are
    several), forward and backward; its bytes and GEMM FLOPs as `_count`'s."""
    import torch
    from deepspeed.moe.experts import Experts

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    expert = torch.nn.Sequential(torch.nn.Linear(hidden, ffn), torch.nn.GELU(),
                                 torch.nn.Linear(ffn, hidden)).to(dt)
    module = Experts(expert, experts)
    x = torch.randn(2, experts, rows, hidden, dtype=dt, requires_grad=True)
    grad = torch.ones(2, experts, rows, hidden, dtype=dt)
    c = counter()("forward")
    with c:
        y = module(x)
        c.phase = "backward"
        y.backward(grad)
    return {"forward": c.launches["forward"], "backward": c.launches["backward"],
            "ops": {p: dict(ops) for p, ops in c.ops.items() if ops},
            "bytes": {way: {"bytes": c.bytes[way], "gemm_bytes": c.gemm_bytes[way],
                            "gemm_flops": c.flops[way]} for way in ("forward", "backward")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    a = ap.parse_args(argv)
    started = start_deepspeed("count_deepspeed_moe_ops")
    if started is None:
        return 2
    deepspeed, torch = started
    counts = {L: _count(L) for L in (2, 4)}
    # top-2 (second expert sampled, DeepSpeed's default) and top-4 (its topkgating), 4 local
    # experts on one rank: the gate's counts per k
    top_k = {k: _count(4, k=k) for k in (2, 4)}
    ep2 = run_world(_rank, 2)
    record = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
              "tokens": TOKENS, "hidden": HIDDEN, "ffn": FFN, "by_local_experts": counts,
              "by_local_experts_ep2": ep2, "by_top_k": top_k}
    summary = {}
    for mode in ("train", "infer"):
        for way in ("forward", "backward"):
            two, four = (counts[L][mode][way] for L in (2, 4))
            if not two:
                continue
            for p in PHASES:
                per = (four[p] - two[p]) / 2
                summary[f"{mode} {way} {p}"] = {"fixed": two[p] - 2 * per, "per_local_expert": per}
                print(f"{mode:5s} {way:8s} {p:8s} {two[p] - 2 * per:4.0f} + {per:3.0f} per local "
                      f"expert")
    for way in ("forward", "backward"):
        for p in ("dispatch", "combine"):
            two, four = (ep2[L]["train"][way][p] for L in (2, 4))
            per = (four - two) / 2
            summary[f"ep 2 train {way} {p}"] = {"fixed": two - 2 * per, "per_local_expert": per}
            print(f"ep 2 {way:8s} {p:8s} {two - 2 * per:4.0f} + {per:3.0f} per local expert "
                  f"(all-to-alls: {ep2[2]['train'].get('collectives', {})})")
    for k, got in top_k.items():
        for mode, ways in (("train", ("forward", "backward")), ("infer", ("forward",))):
            for way in ways:
                for p in ("gate", "dispatch", "combine"):
                    summary[f"top-{k} {mode} {way} {p}"] = {"fixed": got[mode][way][p],
                                                            "per_local_expert": 0.0}
                print(f"top-{k} {mode:5s} {way:8s} gate {got[mode][way]['gate']:3d} dispatch "
                      f"{got[mode][way]['dispatch']:3d} combine {got[mode][way]['combine']:3d}")
    two, four = (counts[L]["experts_ep2"] for L in (2, 4))
    for way in ("forward", "backward"):
        per = (four[way] - two[way]) / 2
        summary[f"train {way} experts, ep 2"] = {"fixed": two[way] - 2 * per,
                                                 "per_local_expert": per}
        print(f"train {way:8s} experts with ep 2: {two[way] - 2 * per:4.0f} + {per:3.0f} per "
              f"local expert")
    record["summary"] = summary
    save_json(record, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
