"""The probe: the runtime's own small model at a few sizes (`PROBE_SIZES`), and the plans it runs
with on every rank inside `moerun`'s loop (`in_situ_plans`)."""

from __future__ import annotations

from moeplan.cost_models.env import LayerChoice
from moeplan.planner.planning import Request, fixed_plan
from moeplan.spec.cluster import (
    ClusterProfile,
)
from moeplan.spec.model import ModelSpec
from moeplan.spec.zoo import load_model

PROBE_EXPERTS = (0, 2, 4)  # a dense layer, then MoE layers with 2 and 4 local experts
# (hidden, heads, ffn, batch, sequence) per device kind: at "fixed" all is framework; at the
# working sizes the arithmetic shows how far each phase's kernels run from the GEMM/bandwidth
# roofline. A phase's scale moves with its rows as well as its width (CPU ranks: the experts at
# 2.0-3.2x the roofline with 256 tokens a rank, 1.4x with 2,048), and beyond the largest size
# the largest one's is carried unchanged, so the largest reaches the tokens a step holds: 2,048
# a rank on CPU ranks; on a GPU 8,192 at hidden 2,048 (a 1.3B base's width; its kernels need
# thousands of rows before they leave the launch-bound regime)
PROBE_SIZES = {
    "cpu": {"fixed": (8, 2, 16, 1, 8), "work": (64, 4, 256, 4, 64),
            "work2": (128, 4, 512, 4, 64), "work3": (256, 8, 1024, 4, 64),
            "work4": (256, 8, 1024, 8, 256)},
    "gpu": {"fixed": (8, 2, 16, 1, 8), "work": (256, 4, 1024, 4, 256),
            "work2": (512, 8, 2048, 4, 512), "work3": (1024, 8, 4096, 8, 512),
            "work4": (2048, 16, 8192, 8, 1024)}}
WORK_SIZES = ("work", "work2", "work3", "work4")


def decode_shape(size: str, kind: str) -> tuple[int, int]:
    """(prompt tokens, new tokens) the probe decodes at one of `PROBE_SIZES[kind]`."""
    S = PROBE_SIZES[kind][size][4]
    return max(4, S // 4), max(8, S // 4)


def probe_spec(size: str, kind: str) -> ModelSpec:
    """The model `moeplan profile` runs through the runtime to measure framework overhead."""
    h, heads, f, _, S = PROBE_SIZES[kind][size]
    return load_model("tiny-pr-moe").model_copy(update={
        "name": f"probe-{size}", "num_layers": len(PROBE_EXPERTS), "hidden": h, "heads": heads,
        "ffn_hidden": f, "vocab_size": 16 if size == "fixed" else 256,
        "max_seq_len": max(16, S + 1),
        "experts": list(PROBE_EXPERTS)})


IN_SITU_SIZE = "work"


def in_situ_plans(cluster: ClusterProfile, world: int) -> dict:
    """The plans `moeplan profile` runs the "work" probe with on every rank, as `moerun` would
    (train and infer): each MoE layer expert-parallel over as many ranks as it has experts
    (at most the world), flat all-to-all, no tensor slicing; costed on `cluster`."""

    kind = cluster.device.kind
    spec = probe_spec(IN_SITU_SIZE, kind)
    _, _, _, B, S = PROBE_SIZES[kind][IN_SITU_SIZE]
    prompt, new = decode_shape(IN_SITU_SIZE, kind)
    choices = {}
    for i, E in enumerate(spec.experts):
        ep = min(E, world)
        if E and E % ep == 0 and world % ep == 0:
            choices[i] = LayerChoice(ep=ep, es=1, a2a="flat", coordinated=False)
    requests = {"train": Request(gpus=world, mode="train", global_batch=B * world,
                                 micro_batch=B, seq_len=S, zero_stage=0, simulate_top=0),
                "infer": Request(gpus=world, mode="infer", global_batch=B * world,
                                 prompt_len=prompt, gen_len=new, simulate_top=0)}
    return {mode: fixed_plan(spec, cluster, r, 1, choices) for mode, r in requests.items()}
