"""Per-layer, per-phase timers for forward and backward.

The model calls `timer.to(x, phase)` where one phase ends and the next begins (a `Phase` of the
cost model's: attention, tp_comm, gate, dispatch, dispatch_a2a, es_comm, experts, combine_a2a,
combine, mlp; `head` for embedding, LM head and loss); seconds are kept per `LayerPhase`. In
forward that closes the running phase.
The call also threads `x` through an identity autograd function whose backward closes the running
backward phase and switches back to the phase that preceded the marker in forward — so backward
time is attributed at the same boundaries, measured, not scaled from forward.
On CUDA every boundary synchronises the device first (timing is then exact but slower); on CPU the
gloo collectives are synchronous, so wall-clock stamps are exact already.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from moeplan.spec.phases import HEAD_LAYER, HEAD_PHASE, LayerPhase, Phase


class NullTimer:
    """The default: no bookkeeping, no synchronisation."""

    layer: int | str = HEAD_LAYER

    def to(self, x: torch.Tensor, phase: Phase) -> torch.Tensor:
        return x


NULL_TIMER = NullTimer()


class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, timer, prev):
        ctx.timer, ctx.prev = timer, prev
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.timer._switch_backward(ctx.prev)
        return g, None, None


class PhaseTimer:
    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.layer: int | str = HEAD_LAYER
        self.forward_s: dict[LayerPhase, float] = defaultdict(float)
        self.backward_s: dict[LayerPhase, float] = defaultdict(float)
        self._cur, self._t0 = HEAD_PHASE, 0.0
        self._bcur, self._bt0 = HEAD_PHASE, 0.0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.forward_s.clear()
        self.backward_s.clear()

    # forward -----------------------------------------------------------------------------
    def begin(self) -> None:
        self.layer, self._cur, self._t0 = HEAD_LAYER, HEAD_PHASE, self.now()

    def to(self, x: torch.Tensor, phase: Phase) -> torch.Tensor:
        now = self.now()
        self.forward_s[self._cur] += now - self._t0
        prev, self._cur, self._t0 = self._cur, LayerPhase(self.layer, phase), now
        if torch.is_grad_enabled() and x.requires_grad:
            return _Mark.apply(x, self, prev)
        return x

    def end(self) -> None:
        self.forward_s[self._cur] += self.now() - self._t0
        self.layer, self._cur = HEAD_LAYER, HEAD_PHASE

    # backward ----------------------------------------------------------------------------
    def begin_backward(self) -> None:
        self._bcur, self._bt0 = HEAD_PHASE, self.now()

    def _switch_backward(self, prev: LayerPhase) -> None:
        now = self.now()
        self.backward_s[self._bcur] += now - self._bt0
        self._bcur, self._bt0 = prev, now

    def end_backward(self) -> None:
        self._switch_backward(HEAD_PHASE)

    def totals(self) -> dict[LayerPhase, float]:
        out: dict[LayerPhase, float] = defaultdict(float)
        for table in (self.forward_s, self.backward_s):
            for k, v in table.items():
                out[k] += v
        return dict(out)


def instrument(model: torch.nn.Module, timer) -> None:
    """Give every module that marks phases the same timer (NULL_TIMER to switch off)."""
    for m in model.modules():
        if hasattr(type(m), "timer"):
            m.timer = timer
