"""`moeplan profile`'s rank-side microbenchmarks (torch), started by torchrun on every rank.

    torchrun --nproc-per-node N -m moeplan.profiles.measure --out profile.json --gpus-per-node G

The device's own speed is measured on rank 0 alone (the others wait at a barrier): GEMM sizes
(efficiency curve), copy sizes (memory bandwidth), one small operation (per-operation overhead),
and the runtime's own model at two sizes (framework cost per layer phase, and how far each phase
runs from the roofline). What ranks cost each other is measured with all of them at once: the
same model on every rank (contention: ranks sharing CPU cores or memory bandwidth), the spread
of their step times (skew), allreduce / allgather / reduce-scatter / all-to-all over message
sizes on the intra-node groups (the G ranks of one node) and the inter-node groups (one rank per
node; GPUs of a node share its NICs), both all-to-all algorithms over the whole world where
it spans nodes, and the probe run by the runtime's own loops with its experts spread over every
rank (what exchanges and gradient sync take inside a running step). Each all-rank figure is the
slowest rank of a repeat; repeats are reduced by `fit.robust_median`.

The host's speed swings within seconds, so the calibrations (device sweeps, the model's tables,
skew, optimizer, the in-step probe) are sampled at several moments spread over the whole
profile, the collectives' and exchanges' sizes run between them, and each figure is reduced
over all its moments' samples (`Pool`). Rank 0 fits them (`fit.py`) and writes a
`ClusterProfile`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moeplan.files import write_atomic
from moeplan.profiles import fit
from moeplan.profiles.build import PROBE_SIZES, decode_shape, probe_spec
from moeplan.runtime.comm import all_gather_tensor, reduce_scatter_tensor

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "all_to_all")


def _sizes(lo: int, hi: int, per_octave: int = 1) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(int(s))
        s *= 2 ** (1 / per_octave)
    return sorted(set(out))


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

    def add(self, key, values: list[float]) -> None:
        self.samples.setdefault(key, []).extend(values)

    def median(self, key) -> float:
        return fit.robust_median(self.samples[key])


def moments(quick: bool) -> int:
    """How many moments of the profile sample its calibrations (and the in-step probe)."""
    return 3 if quick else 6


def per_moment(repeats: int, quick: bool) -> int:
    """Repeats of each calibration per moment: `repeats` spread over the moments, two at least."""
    return max(2, -(-repeats // moments(quick)))


class DeviceSweeps:
    """The device's own speed on rank 0 alone: GEMM sizes (efficiency curve), copy sizes (memory
    bandwidth) and one small autograd operation (the floor under every phase of a tiny model),
    a pass over all of them per moment, pooled."""

    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool, warmup: int,
                 repeats: int):
        self.bench = Bench(0, 1, device, warmup, repeats)
        self.pool = Pool()
        self.gemm: dict[tuple, callable] = {}
        for m in _sizes(16, 1024 if quick else 4096):
            for n, k in ((256, 64), (64, 256), (256, 256)):
                x = torch.randn(m, k, device=device, dtype=dtype)
                w = torch.randn(k, n, device=device, dtype=dtype)
                self.gemm[(m, n, k)] = lambda x=x, w=w: x @ w
        self.copy: dict[int, callable] = {}
        for n in _sizes(1 << 12, (1 << 22) if quick else (1 << 24)):
            src = torch.empty(n // 4, device=device)
            dst = torch.empty_like(src)
            self.copy[n] = lambda src=src, dst=dst: dst.copy_(src)
        x = torch.ones(8, device=device, requires_grad=True)
        self.small_op = lambda: (x * 2).sum().backward()

    def sample(self, warmup: int) -> None:
        self.bench.warmup = warmup
        for key, fn in self.gemm.items():
            self.pool.add(("gemm", key), self.bench.samples(fn))
        for n, fn in self.copy.items():
            self.pool.add(("copy", n), self.bench.samples(fn))
        self.pool.add("op", self.bench.samples(self.small_op))

    def result(self) -> tuple[list[dict], list[dict], float]:
        gemm = [{"m": m, "n": n, "k": k, "flops": 2.0 * m * n * k,
                 "time_s": self.pool.median(("gemm", (m, n, k))),
                 "samples": len(self.pool.samples[("gemm", (m, n, k))])}
                for m, n, k in self.gemm]
        copy = [{"bytes": 2.0 * n, "time_s": self.pool.median(("copy", n))} for n in self.copy]
        return gemm, copy, self.pool.median("op") / 4  # mul, sum, and their two backward ops


def _collective(name: str, group, size: int, nbytes: int, device) -> callable:
    n = max(size, nbytes // 4 // size * size)  # elements, divisible by the group size
    if name == "allreduce":
        x = torch.ones(n, device=device)
        return lambda: dist.all_reduce(x, group=group)
    if name == "allgather":  # nbytes is the gathered size
        x, out = torch.ones(n // size, device=device), torch.empty(n, device=device)
        return lambda: all_gather_tensor(out, x, group=group)
    if name == "reduce_scatter":
        x, out = torch.ones(n, device=device), torch.empty(n // size, device=device)
        return lambda: reduce_scatter_tensor(out, x, group=group)
    x, out = torch.ones(n, device=device), torch.empty(n, device=device)
    return lambda: dist.all_to_all_single(out, x, group=group)


def tier_groups(world: int, gpus_per_node: int) -> dict[str, list[list[int]]]:
    """The intra-node groups (the G ranks of each node) and the inter-node groups (one rank of
    each node, same local index), where there are more than one rank to a group."""
    G, nodes = gpus_per_node, world // gpus_per_node
    tiers = {}
    if G > 1:
        tiers["intra"] = [[n * G + l for l in range(G)] for n in range(nodes)]
    if nodes > 1:
        tiers["inter"] = [[n * G + l for n in range(nodes)] for l in range(G)]
    return tiers


# Idle before a rested exchange: longer than a rate limiter's bucket takes to refill (tc tbf's
# 256 KB at 200 Mbit/s: 10 ms; cloud NICs' bandwidth allowances are larger, but are refilled by
# the seconds a step's compute lasts, and a few tens of ms show what one exchange gets back).
REST_S = 0.05


def collective_jobs(b: Bench, gpus_per_node: int, quick: bool) -> list:
    """allreduce / allgather / reduce-scatter / all-to-all over message sizes on each tier's
    groups: one job (a call returning its rows) per collective, tier and size, so the profile
    can spread them between its moments."""
    jobs = []
    sizes = _sizes(1 << 12, (1 << 20) if quick else (1 << 23))
    for tier, groups in tier_groups(b.world, gpus_per_node).items():
        made = [dist.new_group(g) for g in groups]  # every rank creates every group, in order
        group = made[next(i for i, g in enumerate(groups) if b.rank in g)]
        size = len(groups[0])
        for name in COLLECTIVES:
            for nbytes in sizes:
                def job(name=name, tier=tier, nbytes=nbytes, group=group, size=size) -> list:
                    fn = _collective(name, group, size, nbytes, b.device)
                    return [{"collective": name, "tier": tier, "group_size": size,
                             "bytes": float(nbytes), "time_s": b.time(fn)}]
                jobs.append(job)
    return jobs


def exchange_jobs(b: Bench, gpus_per_node: int, quick: bool) -> list:
    """Both all-to-all algorithms of the runtime (`runtime.a2a`) over the whole world, where it
    spans nodes with several ranks on each: the flat exchange (one message per peer) and the
    hierarchical one (intra-node exchange, regrouping, inter-node exchange), over message sizes,
    back to back and after the ranks idled (`rested`); one job per algorithm and size. The
    per-tier fits say what one message and one byte cost; these say how the algorithms combine
    them (overlapping messages, a second call, the regrouping copies) and what idle links give
    back."""
    from moeplan.runtime.a2a import FlatExchange, HierarchicalExchange
    from moeplan.runtime.comm import Comm

    G, world = gpus_per_node, b.world
    nodes = world // G
    if nodes <= 1 or G <= 1:
        return []
    made = {}
    for tier, groups in tier_groups(world, G).items():
        handles = [dist.new_group(g) for g in groups]  # every rank creates every group, in order
        mine = next(i for i, g in enumerate(groups) if b.rank in g)
        made[tier] = Comm(group=handles[mine], ranks=tuple(groups[mine]),
                          rank_in_group=groups[mine].index(b.rank))
    algorithms = {"flat": FlatExchange(Comm(group=dist.group.WORLD, ranks=tuple(range(world)),
                                            rank_in_group=b.rank)),
                  "hierarchical": HierarchicalExchange(made["intra"], made["inter"])}
    jobs = []
    for name, exchange in algorithms.items():
        for nbytes in _sizes(1 << 12, (1 << 20) if quick else (1 << 23)):
            def job(name=name, exchange=exchange, nbytes=nbytes) -> list:
                x = torch.ones(world, max(1, nbytes // 4 // world), device=b.device)
                row = {"algorithm": name, "group_size": world, "per_node": G,
                       "bytes": float(x.numel() * 4)}
                return [{**row, "time_s": b.time(lambda: exchange(x))},
                        {**row, "rested": True,
                         "time_s": b.time_rested(lambda: exchange(x), REST_S)}]
            jobs.append(job)
    return jobs


def exchanges(b: Bench, gpus_per_node: int, quick: bool, progress) -> list[dict]:
    """Every job of `exchange_jobs` in turn."""
    rows = []
    for job in exchange_jobs(b, gpus_per_node, quick):
        rows += job()
        progress()
    return rows


def _probe_model(device: torch.device, size: str):
    """The runtime's own GPT (one dense and two MoE layers) at one of `build.PROBE_SIZES`."""
    from moeplan.runtime.model import GPT

    torch.manual_seed(0)
    return GPT(probe_spec(size)).to(device)


def _slowest(b: Bench, values: dict) -> dict:
    """Each value's maximum over ranks (every rank holds the same keys, in the same order)."""
    keys = sorted(values, key=str)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if b.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def _phase_samples(b: Bench, cases: dict[str, tuple], repeats: int, warmup: int,
                   pool: Pool) -> None:
    """Per case, per (layer, phase): seconds per call of `run_once(timer)` in each of `repeats`
    repeats of `inner` calls, added to `pool` under (case, "f|b:<layer>:<phase>") — on all
    ranks at once (slowest rank per repeat), or `solo` on rank 0 while the others wait at a
    barrier. `cases` maps a name to (run_once, inner, solo); every repeat runs each case in
    turn, so a slow spell of the host touches all of them alike (the fits take differences and
    ratios of cases)."""
    from moeplan.runtime.timers import PhaseTimer

    for rep in range(warmup + repeats):
        for name, (run_once, inner, solo) in cases.items():
            if b.world > 1:
                dist.barrier()
            timer = PhaseTimer(b.device.type == "cuda")
            if not solo or b.rank == 0:
                for _ in range(inner):
                    run_once(timer)
            if rep < warmup:
                continue
            tables = {f"{d}:{k[0]}:{k[1]}": v / inner
                      for d, table in (("f", timer.forward_s), ("b", timer.backward_s))
                      for k, v in table.items()}
            if not solo:
                tables = _slowest(b, tables)
            elif b.world > 1:
                box = [tables]
                dist.broadcast_object_list(box, src=0)
                tables = box[0]
            for k, v in tables.items():
                pool.add((name, k), [v])


def _trainer(b: Bench, size: str):
    """One training step of the probe (forward + backward with autograd, as `moerun` trains),
    timed by the runtime's phase timer it is handed."""
    from moeplan.runtime.timers import instrument

    model = _probe_model(b.device, size)
    _, _, _, B, S = PROBE_SIZES[size]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (B, S + 1), generator=g).to(b.device)

    def train_once(timer) -> None:
        instrument(model, timer)
        timer.begin()
        loss, _ = model.loss(idx[:, :-1], idx[:, 1:])
        timer.end()
        timer.begin_backward()
        loss.backward()
        timer.end_backward()
        model.zero_grad(set_to_none=True)

    return train_once


def _decoder(b: Bench, size: str):
    """Greedy decoding of the probe with the KV cache, as `moerun --mode infer` serves: a batch
    of prompts, then new tokens one at a time; decode tokens only in the timer it is handed."""
    from moeplan.runtime.infer import generate
    from moeplan.runtime.timers import instrument

    model = _probe_model(b.device, size)
    B = PROBE_SIZES[size][3]
    prompt, new_tokens = decode_shape(size)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 16, (B, prompt), generator=g).to(b.device)

    def infer_once(timer) -> None:
        instrument(model, timer)
        before = dict(timer.forward_s)
        prefill: dict = {}

        def on_token(i: int) -> None:
            if i == 0:  # decode tokens only, as `moerun --mode infer` reports them
                prefill.update({k: v - before.get(k, 0.0) for k, v in timer.forward_s.items()})
                timer.begin()

        generate(model, prompts, new_tokens, on_token)
        for k, v in prefill.items():
            timer.forward_s[k] -= v

    return infer_once


def _skew_samples(b: Bench, train_once, repeats: int, warmup: int) -> list[float]:
    """How far the slowest rank trails the mean when every rank runs the same training step
    (`train_once`) at once — the wait at the collective that follows: (max − mean) / mean of
    the ranks' step times, per repeat."""
    if b.world == 1:
        return [0.0]
    from moeplan.runtime.timers import PhaseTimer

    timer = PhaseTimer(b.device.type == "cuda")
    samples = []
    for rep in range(warmup + repeats):
        dist.barrier()
        b._sync()
        t0 = time.perf_counter()
        train_once(timer)
        b._sync()
        t = torch.tensor([time.perf_counter() - t0] * 2, dtype=torch.float64)
        dist.all_reduce(t[:1], op=dist.ReduceOp.MAX)
        dist.all_reduce(t[1:], op=dist.ReduceOp.SUM)
        if rep >= warmup:
            mean = float(t[1]) / b.world
            samples.append((float(t[0]) - mean) / mean)
    return samples


def _ranks_on_this_host(b: Bench) -> int:
    """Ranks sharing rank 0's machine — by host name, so namespaces emulating nodes on one host
    (bench/emulated_cluster.py) count as the one machine whose cores they share."""
    if b.world == 1:
        return 1
    names: list = [None] * b.world
    dist.all_gather_object(names, platform.node())
    return sum(n == names[0] for n in names)


def _solo_time(b: Bench, fn, warmup: int, repeats: int) -> float:
    """Seconds per call of `fn` on rank 0 alone (the others wait at a barrier)."""
    t = torch.zeros(1, dtype=torch.float64)
    if b.rank == 0:
        t[0] = Bench(0, 1, b.device, warmup, repeats).time(fn)
    if b.world > 1:
        dist.broadcast(t, src=0)
    return float(t)


class Framework:
    """The runtime's fixed cost per layer phase and how its kernels compare with the roofline:
    the probe model trained and served (greedy decoding with the KV cache, as `moerun --mode
    infer` serves, decode tokens only) at every `build.PROBE_SIZES` (one rank alone, and the
    "work" size also on every rank at once: the contention), timed by the runtime's own phase
    timer; the skew of the ranks' steps; plus the optimizer (AdamW step, gradient clipping,
    zero_grad) at both sizes, for its cost per tensor and per parameter. Sampled at every
    moment of the profile (`sample`), pooled (`result`): the per-phase work scales and the
    contention are differences and ratios of these tables, so a stretch of one speed of the
    host must not set them."""

    def __init__(self, b: Bench, quick: bool):
        from moeplan.runtime.run import clip_grads

        self.b, self.quick = b, quick
        self.pool, self.skew = Pool(), []
        inner = 10 if quick else 30
        fixed_step, self.work_step = _trainer(b, "fixed"), _trainer(b, "work")
        self.train_cases = {"train": (fixed_step, inner, True),
                            "work": (self.work_step, max(2, inner // 5), True),
                            "work2": (_trainer(b, "work2"), max(2, inner // 10), True),
                            "work_all_ranks": (self.work_step, max(2, inner // 5), False)}
        # decoding at every probe size: the fixed part and how decode kernels compare with the
        # roofline (the "work" size also on every rank at once: decode contention)
        n = 2 if quick else 4
        work_decode = _decoder(b, "work")
        self.decode_cases = {"infer_fixed": (_decoder(b, "fixed"), n, True),
                             "infer": (work_decode, n, True),
                             "infer_work2": (_decoder(b, "work2"), n, True),
                             "infer_all_ranks": (work_decode, n, False)}
        self.steps = []  # (step function, parameters) of one optimizer step at both probe sizes
        idx = torch.zeros(1, 9, dtype=torch.long, device=b.device)
        for size in ("fixed", "work"):
            m = _probe_model(b.device, size)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            numel = {name: p.numel() for name, p in m.named_parameters()}
            loss, _ = m.loss(idx[:, :-1], idx[:, 1:])
            loss.backward()

            def step(m=m, opt=opt, numel=numel) -> None:
                clip_grads(m, numel, 1, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=False)

            self.steps.append((step, sum(numel.values())))
        self.tensors = len(numel)

    def sample(self, warmup: int) -> None:
        """One moment: its share of every table's repeats, the skew, and both optimizer sizes in
        turn (the per-parameter cost is their difference)."""
        b, reps = self.b, per_moment(self.b.repeats, self.quick)
        _phase_samples(b, self.train_cases, 2 * reps, warmup, self.pool)
        self.skew += _skew_samples(b, self.work_step, (3 if self.quick else 5) * reps, warmup)
        _phase_samples(b, self.decode_cases, reps, warmup, self.pool)
        for i, (step, _) in enumerate(self.steps):
            self.pool.add(("optimizer", i), [_solo_time(b, step, warmup, reps)])

    def result(self) -> dict:
        tables: dict[str, dict] = {name: {} for name in (*self.train_cases, *self.decode_cases)}
        for key, values in self.pool.samples.items():
            if key[0] in tables:
                tables[key[0]][key[1]] = fit.robust_median(values)
        return {**tables, "skew": fit.robust_median(self.skew),
                "decode_tokens": {size: decode_shape(size)[1] - 1 for size in PROBE_SIZES},
                "optimizer": [(self.pool.median(("optimizer", i)), n)
                              for i, (_, n) in enumerate(self.steps)],
                "tensors": self.tensors, "samples": {name: len(v) for name, v in (
                    ("tables", self.pool.samples.get(("work", "f:0:attention"), [])),
                    ("skew", self.skew))},
                "host_ranks": _ranks_on_this_host(self.b), "cores": _cores(self.b)}


class InSitu:
    """The "work" probe run by the runtime's own training and decoding loops (`runtime.run`, as
    `moerun` runs a plan) on every rank, its MoE layers expert-parallel over the world
    (`build.in_situ_plans`): the all-to-all phases and the gradient sync as they come out inside
    a running step, mean over ranks as `moerun` reports them, and the step (token) time against
    its timed phases. The profile keeps what they take beyond the model's prediction for the
    same plans, and the share of the step no phase timer sees. One sample is a short run of
    each mode, one at each moment of the profile; the profile keeps the median one
    (`build.median_sample`)."""

    def __init__(self, b: Bench, base: str, gpus_per_node: int, quick: bool):
        from moeplan.profiles.build import in_situ_plans
        from moeplan.profiles.zoo import load_cluster
        from moeplan.runtime.groups import build_groups
        from moeplan.runtime.kernels import select, use_kernels
        from moeplan.runtime.run import RunConfig, build_model

        self.b, self.runs = b, []
        if b.world == 1:
            return
        cluster = load_cluster(base).model_copy(update={"gpus_per_node": gpus_per_node})
        for mode, plan in in_situ_plans(cluster, b.world).items():
            groups = build_groups(plan, b.rank, b.world)  # every rank, in the same order
            # warm-up beyond the first step: the first calls on fresh groups and buffers are slow
            cfg = RunConfig(mode=mode, steps=4 if quick else 8, warmup=2)
            model = build_model(plan, groups, cfg).to(b.device)
            use_kernels(model, select(b.device))
            self.runs.append((mode, plan, groups, cfg, model))

    def sample(self) -> dict:
        from moeplan.runtime.run import infer, train

        out = {}
        for mode, plan, groups, cfg, model in self.runs:
            got = (train if mode == "train" else infer)(plan, model, groups, cfg,
                                                        lambda *_: None)
            a2a = sum(v for (_, ph), v in got["phases"].items()
                      if ph in ("dispatch_a2a", "combine_a2a"))
            sync, opt = got.get("grad_sync_s", 0.0), got.get("optimizer_s", 0.0)
            timed = sum(got["phases"].values()) + sync + opt
            whole = got["step_s"] if mode == "train" else got["latency_s"]
            t = torch.tensor([a2a, sync, whole, timed], dtype=torch.float64)
            dist.all_reduce(t)
            t /= self.b.world
            out[mode] = {"a2a_s": float(t[0]), "grad_sync_s": float(t[1]),
                         "step_s": float(t[2]), "timed_s": float(t[3])}
        return out

    def result(self, samples: list[dict]) -> dict:
        """Per mode, the median sample (the samples as well): see `build.median_sample`."""
        from moeplan.profiles.build import in_situ_medians

        return in_situ_medians({"world": self.b.world, "samples": samples}) if self.runs else {}


def _cores(b: Bench) -> int | None:
    """CPU cores the ranks of this host share — None on GPUs, where each rank has its own."""
    if b.device.type == "cuda":
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moeplan.profiles.measure")
    p.add_argument("--out", required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", default="auto")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--topology", help="NVML topology (JSON) recorded by `moeplan profile`")
    a = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and a.backend != "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    backend = "nccl" if cuda else "gloo"
    if world > 1:
        dist.init_process_group(backend, timeout=timedelta(seconds=a.timeout))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    quick = a.quick
    b = Bench(rank, world, device, warmup=2 if quick else 3, repeats=5 if quick else 9)
    from moeplan.profiles.progress import Progress

    dtype = torch.bfloat16 if cuda else torch.float32
    # every rank creates every group, in the same order, before any job runs
    jobs = (collective_jobs(b, a.gpus_per_node, quick)
            + exchange_jobs(b, a.gpus_per_node, quick))
    situ = InSitu(b, a.base, a.gpus_per_node, quick)
    fw = Framework(b, quick)
    # one rank alone (the others wait): the device's own speed; what ranks cost each other
    # when they share cores is measured apart, as the framework's `contention`
    sweeps = (DeviceSweeps(device, dtype, quick, b.warmup, per_moment(b.repeats, quick))
              if rank == 0 else None)
    M = moments(quick)
    coll, samples = [], []
    with Progress(rank == 0, total=3 * M + len(jobs)) as bar:
        # every calibration a share at each of M moments, the collectives' and exchanges' jobs
        # between them: the host's speed swings within seconds, so each figure is pooled over
        # the whole profile (`Pool`), not one stretch of it
        for moment in range(M):
            warmup = b.warmup if moment == 0 else 1
            if sweeps is not None:
                sweeps.sample(warmup)
            if world > 1:
                dist.barrier()
            bar.step("device sweeps")
            fw.sample(warmup)
            bar.step("framework overhead")
            samples.append(situ.sample())
            bar.step("exchanges in a step")
            for job in jobs[moment * len(jobs) // M:(moment + 1) * len(jobs) // M]:
                coll += job()
                bar.step("collectives")
    fw = fw.result()
    if rank == 0:
        from moeplan.profiles.build import build_profile

        info = {"host": platform.node(), "ranks": world, "backend": backend,
                "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "dtype": "bf16" if cuda else "fp32"}
        if a.topology:
            import json

            info["topology"] = json.loads(Path(a.topology).read_text())
        if cuda:
            info["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        g, c, ov = sweeps.result()
        raw = {"gemm": g, "copy": c, "op_overhead_s": ov, "framework": fw,
               "collectives": [r for r in coll if "collective" in r],
               "exchanges": [r for r in coll if "algorithm" in r],
               "in_situ": situ.result(samples)}
        out = Path(a.out)
        import json

        out.with_suffix(".raw.json").write_text(json.dumps({"info": info, **raw}, indent=1))
        profile = build_profile(a.base, a.name, a.gpus_per_node, info, raw)
        write_atomic(out, profile.model_dump_json(indent=2) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
