"""Dispatch-mode probes of one decode step: device-to-host syncs, and the ops with their shapes.

Used by tests/test_fastpath.py in-process and by dist_cases.py on every rank. Timers stay off
(NULL_TIMER): the CPU phase timers may synchronise by design.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeplan.runtime.infer import Decoder
from moeplan.runtime.model import GPT

SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}


def _shapes(tree) -> tuple:
    leaves = tree if isinstance(tree, (list, tuple)) else [tree]
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            out.append((tuple(x.shape), x.dtype))
        elif isinstance(x, (list, tuple)):
            out.append(_shapes(x))
    return tuple(out)


class OpRecorder(TorchDispatchMode):
    """Every aten op run under it: its name, input shapes and output shapes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, _shapes(list(args)), _shapes(out)))
        return out

    def syncs(self) -> int:
        return sum(1 for name, *_ in self.ops if name in SYNC_OPS)

    def counts(self) -> Counter:
        return Counter(name for name, *_ in self.ops)


@torch.no_grad()
def decode_probe(model: GPT, prompt_BS: torch.Tensor) -> dict:
    """Prefill `prompt_BS`, one eager decode step, then two recorded ones."""
    model.eval()
    B, S = prompt_BS.shape
    cache = model.new_cache(B, S + 4)
    logits, _ = model(prompt_BS, cache)
    step = Decoder(model, cache, logits[:, -1].argmax(-1), S)
    step.advance(step.eager())
    recorded = []
    for _ in range(2):
        with OpRecorder() as rec:
            step.advance(step.eager())
        recorded.append(rec)
    first, second = recorded
    return {"syncs": first.syncs() + second.syncs(), "ops": len(first.ops),
            "same_shapes": first.ops == second.ops, "counts": dict(first.counts())}
