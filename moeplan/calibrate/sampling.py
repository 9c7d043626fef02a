"""Timing with every rank at once and sampling over the profile's moments (torch).

`Bench` times a call on every rank (the slowest rank of each repeat), `Pool` gathers a figure's
samples from several moments of the profile and reduces them together: the host's speed swings
within seconds, so a figure timed in one stretch is one state of the host.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from moeplan.calibrate import fit


class Bench:
    def __init__(self, rank: int, world: int, device: torch.device, warmup: int, repeats: int):
        self.rank, self.world, self.device = rank, world, device
        self.warmup, self.repeats = warmup, repeats
        self.sample_s = 0.02

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, inner: int | None = None) -> float:
        """Seconds per call: slowest rank per repeat, robust median over repeats."""
        return fit.robust_median(self.samples(fn, inner))

    def samples(self, fn, inner: int | None = None) -> list[float]:
        """Seconds per call of each repeat, the slowest rank's.

        A repeat runs the call `inner` times back to back, by default enough of them to last
        about `sample_s`: long enough that ranks sharing cores contend for them as they do in a
        training step, instead of each finishing inside its own scheduler time slice."""
        for _ in range(self.warmup):
            fn()
        if inner is None:
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            one = self._slowest(time.perf_counter() - t0)  # the same count on every rank
            inner = max(1, min(1000, int(self.sample_s / max(one, 1e-7))))
        samples = []
        for _ in range(self.repeats):
            if self.world > 1:
                dist.barrier()
            self._sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            self._sync()
            samples.append(self._slowest((time.perf_counter() - t0) / inner))
        return samples

    def _slowest(self, seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def time_rested(self, fn, rest_s: float) -> float:
        """Seconds of one call made after every rank idled `rest_s`: slowest rank per repeat,
        robust median over repeats — the links as they are when a step's compute has left
        them alone (a rate limiter's token bucket refilled). Twice the repeats of `time`: one
        call per sample scatters more than a sample of many."""
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(2 * self.repeats):
            if self.world > 1:
                dist.barrier()
            time.sleep(rest_s)
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            samples.append(self._slowest(time.perf_counter() - t0))
        return fit.robust_median(samples)


class Pool:
    """Samples of every figure the profile calibrates, gathered at several moments of it and
    reduced at the end by `fit.robust_median` over all of them. This host's speed swings on a
    scale of seconds (on the 2-vCPU VM one rank's probe step, timed every ten seconds for three
    minutes, went between 6.3 and 15.2 ms, often from one sample to the next), so a figure timed
    in one stretch is one state of the host, not the host a run of many steps meets."""

    def __init__(self) -> None:
        self.samples: dict = {}
        self.by_moment: dict = {}  # key -> {moment: samples}: the spread between moments
        self.moment = 0  # set by the caller at each moment

    def add(self, key, values: list[float]) -> None:
        self.samples.setdefault(key, []).extend(values)
        self.by_moment.setdefault(key, {}).setdefault(self.moment, []).extend(values)

    def median(self, key) -> float:
        return fit.robust_median(self.samples[key])

    def moment_ratios(self, keys) -> list[float]:
        """Each moment's median over the pooled median, for every key of `keys` sampled at two
        moments or more: how far one stretch of the host strays from the profile's figure."""
        out = []
        for key in keys:
            moments_ = self.by_moment.get(key, {})
            pooled = self.median(key) if len(moments_) > 1 else 0.0
            if pooled > 0:
                out += [fit.robust_median(v) / pooled for v in moments_.values()]
        return out


def spread(ratios: list[float]) -> list[float] | None:
    """(p10, p90) of moment ratios, widened to contain 1; None with fewer than two."""
    if len(ratios) < 2:
        return None
    q = statistics.quantiles(ratios, n=10, method="inclusive")
    return [min(1.0, q[0]), max(1.0, q[-1])]


def moments(quick: bool) -> int:
    """How many moments of the profile sample its calibrations (and the in-step probe)."""
    return 3 if quick else 6


def per_moment(repeats: int, quick: bool) -> int:
    """Repeats of each calibration per moment: `repeats` spread over the moments, two at least."""
    return max(2, -(-repeats // moments(quick)))
