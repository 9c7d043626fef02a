"""Phase timers: every forward and backward interval lands in a (layer, phase) of the cost model,
and the intervals tile the measured span (nothing counted twice)."""

from __future__ import annotations

import time

import torch

from moeplan.runtime.model import GPT
from moeplan.runtime.timers import NULL_TIMER, PhaseTimer, instrument
from moeplan.spec import load_model
from moeplan.spec.phases import HEAD_PHASE


def _step(model: GPT, timer: PhaseTimer, x: torch.Tensor) -> None:
    """One timed forward and backward of the loss on `x`."""
    timer.begin()
    loss, _ = model.loss(x[:, :-1], x[:, 1:])
    timer.end()
    timer.begin_backward()
    loss.backward()
    timer.end_backward()


def test_forward_and_backward_are_attributed_to_the_cost_model_phases():
    torch.manual_seed(0)
    spec = load_model("tiny-pr-moe")
    model, timer = GPT(spec), PhaseTimer()
    instrument(model, timer)
    x = torch.randint(0, 256, (2, 33))
    t0 = time.perf_counter()
    _step(model, timer, x)
    wall = time.perf_counter() - t0
    for table in (timer.forward_s, timer.backward_s):
        for i, E in enumerate(spec.experts):
            phases = {ph for (layer, ph) in table if layer == i}
            want = ({"attention", "gate", "dispatch", "dispatch_a2a", "experts", "combine_a2a",
                     "combine", "mlp"} if E else {"attention", "mlp"})
            assert want <= phases, (i, phases)
        assert HEAD_PHASE in table
    total = sum(timer.totals().values())
    assert 0 < total <= wall  # contiguous intervals inside the span, none counted twice
    assert all(v >= 0 for v in timer.totals().values())


def test_null_timer_adds_no_graph_nodes():
    x = torch.ones(3, requires_grad=True)
    assert NULL_TIMER.to(x, "gate") is x
    timer = PhaseTimer()
    timer.begin()
    y = timer.to(x, "gate")
    assert y is not x and y.grad_fn is not None  # the backward marker
    with torch.no_grad():
        assert timer.to(x, "mlp") is x


def test_phase_figures_are_medians_over_steps():
    from moeplan.runtime.run import _median_phases

    steps = [{(0, "attention"): 1.0, (0, "mlp"): 2.0}, {(0, "attention"): 9.0},
             {(0, "attention"): 2.0, (0, "mlp"): 4.0}]
    # one slow step does not move the figure; a phase missing from a step counts as nothing
    assert _median_phases(steps) == {(0, "attention"): 2.0, (0, "mlp"): 2.0}


class _DeferredClock:
    """A device-like clock: stamps are opaque; their seconds are only read when asked, and the
    test records when that happens (a CUDA event pair would synchronise there)."""

    deferred = True

    def __init__(self):
        self.reads = 0

    def stamp(self):
        return [time.perf_counter()]

    def seconds(self, a, b) -> float:
        self.reads += 1
        return b[0] - a[0]


def test_device_stamps_are_read_once_after_the_step():
    """On CUDA a boundary records an event and reads nothing (the host launches ahead, as in an
    untimed step); the intervals are read when the tables are, and give what reading them at
    once gives: the same keys, every interval inside the span."""
    torch.manual_seed(0)
    spec = load_model("tiny-pr-moe")
    model, clock = GPT(spec), _DeferredClock()
    timer = PhaseTimer(clock=clock)
    instrument(model, timer)
    x = torch.randint(0, 256, (2, 33))
    t0 = timer.now()
    _step(model, timer, x)
    t1 = timer.now()
    assert clock.reads == 0  # no boundary read a stamp
    totals = timer.totals()
    assert clock.reads > 20
    wall = timer.elapsed(t0, t1)
    assert 0 < sum(totals.values()) <= wall and all(v >= 0 for v in totals.values())
    host = PhaseTimer()
    instrument(model, host)
    _step(model, host, x)
    assert set(host.totals()) == set(totals)
    timer.reset()
    assert timer.totals() == {}
