"""Count the aten ops of one decode step of tiny-pr-moe, per MoE layer and phase (forward, eval).

The model's phase markers (`timer.to(x, phase)`, the cost model's phase names) attribute every
op to (layer, phase); a `TorchDispatchMode` counts the ops between the second and the third
token of a greedy generation (one new token attending to a filled cache). MoE layers are
reported per phase: gate (router + gating), dispatch, experts, combine, and mlp (the PR-MoE
residual branch and the mix). `syncs` counts device-to-host reads (`aten._local_scalar_dense`,
`aten.nonzero`, `aten.item`).

With `--kernels triton` the MoE layers run moerun's Triton kernels (the GPU path) under
Triton's interpreter on CPU: each phase then also counts its Triton launches (`launches`), and
its aten ops are those around the kernels (the interpreter's own tensor work is not counted).

Run:  python bench/count_decode_ops.py [--batch 4] [--prompt 10] [--kernels torch|triton]
      (prints one JSON object)
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeplan.runtime.infer import generate
from moeplan.runtime.model import GPT, MoE
from moeplan.runtime.timers import NULL_TIMER, instrument
from moeplan.spec import load_model

SYNC_OPS = ("_local_scalar_dense", "nonzero", "item")


class PhaseMarks:
    """A timer that only remembers the current (layer, phase)."""

    def __init__(self):
        self.layer: object = "head"
        self.key: tuple = ("head", "head")

    def to(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        self.key = (self.layer, phase)
        return x


class OpCounter(TorchDispatchMode):
    """Counts ops per phase key while `on` is set."""

    def __init__(self, marks: PhaseMarks):
        super().__init__()
        self.marks, self.on = marks, False
        self.ops: dict[tuple, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops[self.marks.key][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(batch: int, prompt: int, kernels: str = "torch") -> dict:
    spec = load_model("tiny-pr-moe")
    torch.manual_seed(0)
    model = GPT(spec).eval()
    marks = PhaseMarks()
    instrument(model, marks)
    counter = OpCounter(marks)
    launches: dict[tuple, int] = defaultdict(int)
    if kernels == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        from triton.runtime.interpreter import InterpretedFunction

        from moeplan.runtime.kernels import triton_kernels, use_kernels

        use_kernels(model, triton_kernels())
        run = InterpretedFunction.run

        def counted(self, *args, **kwargs):
            if counter.on:
                launches[marks.key] += 1
            with torch.utils._python_dispatch._disable_current_modes():  # the interpreter's
                return run(self, *args, **kwargs)

        InterpretedFunction.run = counted

    def on_token(i: int) -> None:  # count the step that produces token 2 only
        counter.on = i == 1
        marks.layer, marks.key = "head", ("head", "head")

    idx = torch.randint(0, spec.vocab_size, (batch, prompt),
                        generator=torch.Generator().manual_seed(1))
    with counter:
        generate(model, idx, 3, on_token)
    instrument(model, NULL_TIMER)
    moe = {i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)}
    layers = {}
    for i in sorted(moe):
        phases = {ph: sum(c.values()) for (layer, ph), c in counter.ops.items() if layer == i}
        every = sum((c for (layer, _), c in counter.ops.items() if layer == i), Counter())
        layers[str(i)] = {"total": sum(every.values()), "phases": dict(sorted(phases.items())),
                          "syncs": sum(every[s] for s in SYNC_OPS),
                          "ops": dict(sorted(every.items()))}
        if kernels == "triton":
            layers[str(i)]["launches"] = {ph: n for (layer, ph), n in sorted(launches.items())
                                          if layer == i}
    everything = sum(counter.ops.values(), Counter())
    return {"model": spec.name, "batch": batch, "prompt": prompt, "kernels": kernels,
            "step_total": sum(everything.values()),
            "step_syncs": sum(everything[s] for s in SYNC_OPS), "moe_layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=10)
    ap.add_argument("--kernels", choices=["torch", "triton"], default="torch")
    a = ap.parse_args()
    print(json.dumps(count(a.batch, a.prompt, a.kernels), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
