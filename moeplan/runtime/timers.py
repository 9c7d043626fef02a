"""Per-layer, per-phase timers for forward and backward.

The model calls `timer.to(x, phase)` where one phase ends and the next begins (a `Phase` of the
cost model's: attention, tp_comm, gate, dispatch, dispatch_a2a, es_comm, experts, combine_a2a,
combine, mlp; `head` for embedding, LM head and loss); seconds are kept per `LayerPhase`. In
forward that closes the running phase.
The call also threads `x` through an identity autograd function whose backward closes the running
backward phase and switches back to the phase that preceded the marker in forward — so backward
time is attributed at the same boundaries, measured, not scaled from forward.
On CPU a stamp is the wall clock (gloo's collectives are synchronous, so stamps are exact). On
CUDA a stamp is an event recorded on the stream: a boundary does not synchronise, so the host
keeps launching ahead as in an untimed step, and the seconds between two stamps are read once,
when the tables are read (`settle`) — the device's time from one boundary to the next, idle gaps
included where the host could not keep it busy.
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


class HostClock:
    """Wall-clock stamps: a stamp is a time, read at once."""

    deferred = False

    def stamp(self) -> float:
        return time.perf_counter()

    def seconds(self, a: float, b: float) -> float:
        return b - a


class DeviceClock:
    """CUDA events recorded on the current stream; the seconds between two wait for the later."""

    deferred = True

    def stamp(self) -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a: torch.cuda.Event, b: torch.cuda.Event) -> float:
        b.synchronize()
        return a.elapsed_time(b) / 1e3


class PhaseTimer:
    def __init__(self, cuda: bool = False, clock=None):
        self.clock = clock or (DeviceClock() if cuda else HostClock())
        self.layer: int | str = HEAD_LAYER
        self._forward: dict[LayerPhase, float] = defaultdict(float)
        self._backward: dict[LayerPhase, float] = defaultdict(float)
        self._pending: list[tuple[dict, LayerPhase, object, object]] = []
        self._cur, self._t0 = HEAD_PHASE, self.now()
        self._bcur, self._bt0 = HEAD_PHASE, self._t0

    def now(self):
        """A stamp: pass two to `elapsed`."""
        return self.clock.stamp()

    def elapsed(self, a, b) -> float:
        return self.clock.seconds(a, b)

    def _add(self, table: dict, key: LayerPhase, a, b) -> None:
        if self.clock.deferred:
            self._pending.append((table, key, a, b))
        else:
            table[key] += self.clock.seconds(a, b)

    def settle(self) -> None:
        """Read the deferred intervals into the tables (on CUDA: waits for the last stamp)."""
        for table, key, a, b in self._pending:
            table[key] += self.clock.seconds(a, b)
        self._pending.clear()

    @property
    def forward_s(self) -> dict[LayerPhase, float]:
        self.settle()
        return self._forward

    @property
    def backward_s(self) -> dict[LayerPhase, float]:
        self.settle()
        return self._backward

    def reset(self) -> None:
        self._pending.clear()
        self._forward.clear()
        self._backward.clear()

    # forward -----------------------------------------------------------------------------
    def begin(self) -> None:
        self.layer, self._cur, self._t0 = HEAD_LAYER, HEAD_PHASE, self.now()

    def to(self, x: torch.Tensor, phase: Phase) -> torch.Tensor:
        now = self.now()
        self._add(self._forward, self._cur, self._t0, now)
        prev, self._cur, self._t0 = self._cur, LayerPhase(self.layer, phase), now
        if torch.is_grad_enabled() and x.requires_grad:
            return _Mark.apply(x, self, prev)
        return x

    def end(self) -> None:
        self._add(self._forward, self._cur, self._t0, self.now())
        self.layer, self._cur = HEAD_LAYER, HEAD_PHASE

    # backward ----------------------------------------------------------------------------
    def begin_backward(self) -> None:
        self._bcur, self._bt0 = HEAD_PHASE, self.now()

    def _switch_backward(self, prev: LayerPhase) -> None:
        now = self.now()
        self._add(self._backward, self._bcur, self._bt0, now)
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
