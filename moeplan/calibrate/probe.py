"""`moeplan profile`'s probe: the runtime's own model (`shapes.PROBE_SIZES`), timed by the
runtime's phase timer on one rank and on every rank at once (`Framework`: fixed cost and work
scale per layer phase, contention, skew, optimizer), and run by `moerun`'s own training and
decoding loops expert-parallel over every rank (`InSitu`: compute, all-to-alls and gradient sync
inside a running step). Both are sampled at every moment of the profile (`sampling`).
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from moeplan.calibrate import fit
from moeplan.calibrate.in_situ import in_situ_medians
from moeplan.calibrate.sampling import Bench, Pool, per_moment, spread
from moeplan.calibrate.shapes import (
    PROBE_SIZES,
    WORK_SIZES,
    decode_shape,
    in_situ_plans,
    probe_spec,
)
from moeplan.calibrate.tables import Direction, Table, Timed, from_timer, to_raw
from moeplan.runtime.groups import build_groups
from moeplan.runtime.infer import generate
from moeplan.runtime.kernels import select, use_kernels
from moeplan.runtime.model import GPT
from moeplan.runtime.optim import clip_grads
from moeplan.runtime.run import RunConfig, build_model, infer, train
from moeplan.runtime.timers import PhaseTimer, instrument
from moeplan.spec.phases import EXCHANGE, Phase
from moeplan.spec.zoo import load_cluster


def _probe_model(device: torch.device, size: str, serve: bool = False):
    """The runtime's own GPT (one dense and two MoE layers) at one of `shapes.PROBE_SIZES`,
    with the kernels `moerun` selects on this device; to `serve`, on CUDA in bf16, as `moerun`
    serves a bf16 plan (trainers run under `_autocast`, as it trains)."""
    torch.manual_seed(0)
    model = GPT(probe_spec(size, _kind(device))).to(device=device,
                                                    dtype=_low(device) if serve else None)
    use_kernels(model, select(device))
    return model


def _kind(device: torch.device) -> str:
    """The device kind whose `shapes.PROBE_SIZES` the probe runs at."""
    return "gpu" if device.type == "cuda" else "cpu"


def _low(device: torch.device) -> torch.dtype | None:
    """A GPU's profile is measured in bf16 (`measure.py`); CPU ranks in fp32."""
    return torch.bfloat16 if device.type == "cuda" else None


def _autocast(device: torch.device):
    low = _low(device)
    return torch.autocast(device.type, dtype=low) if low is not None else nullcontext()


def _slowest(b: Bench, values: dict) -> dict:
    """The table of the rank whose total is largest (every rank holds the same keys). One
    rank's whole table, not each key's maximum over ranks: ranks taking turns on shared cores
    are each descheduled in different phases, and the per-key maxima would add up every rank's
    waits (4 ranks on 2 cores: 3.55× one rank alone, where the slowest rank's own table
    took 2.0-2.2×)."""
    if b.world == 1:
        return values
    keys = sorted(values, key=str)
    t = torch.zeros(b.world, len(keys), dtype=torch.float64)
    t[b.rank] = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)  # every rank's row
    return dict(zip(keys, t[int(t.sum(dim=1).argmax())].tolist()))


def _phase_samples(b: Bench, cases: dict[str, tuple], repeats: int, warmup: int,
                   pool: Pool) -> None:
    """Per case, per (layer, phase) forward and backward: seconds per call of `run_once(timer)`
    in each of `repeats` repeats of `inner` calls, added to `pool` under (case, `Timed`) — on all
    ranks at once (slowest rank per repeat), or `solo` on rank 0 while the others wait at a
    barrier. `cases` maps a name to (run_once, inner, solo); every repeat runs each case in
    turn, so a slow spell of the host touches all of them alike (the fits take differences and
    ratios of cases)."""

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
            tables = from_timer(timer.forward_s, timer.backward_s, inner)
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

    model = _probe_model(b.device, size)
    _, _, _, B, S = PROBE_SIZES[_kind(b.device)][size]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (B, S + 1), generator=g).to(b.device)

    def train_once(timer) -> None:
        instrument(model, timer)
        timer.begin()
        with _autocast(b.device):
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

    model = _probe_model(b.device, size, serve=True)
    B = PROBE_SIZES[_kind(b.device)][size][3]
    prompt, new_tokens = decode_shape(size, _kind(b.device))
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

        generate(model, prompts, new_tokens, on_token, graph=False)  # timed: every boundary
        for k, v in prefill.items():
            timer.forward_s[k] -= v

    return infer_once


def _skew_samples(b: Bench, train_once, repeats: int, warmup: int) -> list[float]:
    """How far the slowest rank trails the mean when every rank runs the same training step
    (`train_once`) at once — the wait at the collective that follows: (max − mean) / mean of
    the ranks' step times, per repeat."""
    if b.world == 1:
        return [0.0]

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


def _sized(b: Bench, size: str):
    """The probe's trainer and decoder at a working size, each run once on every rank — or None
    where a rank's device runs out of memory (a GPU too small for the largest sizes): every rank
    then leaves the size out, and the profile has no point there (`framework_overhead`)."""
    cuda = b.device.type == "cuda"
    try:
        run = _trainer(b, size), _decoder(b, size)
        for once in run:
            once(PhaseTimer(cuda))
        ok = 1
    except torch.OutOfMemoryError:
        run, ok = None, 0
        if cuda:
            torch.cuda.empty_cache()
    if b.world > 1:
        t = torch.tensor([ok], device=b.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        ok = int(t.item())
    return run if ok else None


class Framework:
    """The runtime's fixed cost per layer phase and how its kernels compare with the roofline:
    the probe model trained and served (greedy decoding with the KV cache, as `moerun --mode
    infer` serves, decode tokens only) at every `shapes.PROBE_SIZES` (one rank alone, and the
    "work" size also on every rank at once: the contention), timed by the runtime's own phase
    timer; the skew of the ranks' steps; plus the optimizer (AdamW step, gradient clipping,
    zero_grad) at both sizes, for its cost per tensor and per parameter. Sampled at every
    moment of the profile (`sample`), pooled (`result`): the per-phase work scales and the
    contention are differences and ratios of these tables, so a stretch of one speed of the
    host must not set them. A working size some rank's device cannot hold is left out
    (`_sized`)."""

    def __init__(self, b: Bench, quick: bool):
        self.b, self.quick = b, quick
        self.pool, self.skew = Pool(), []
        inner = 10 if quick else 30
        fixed_step, self.work_step = _trainer(b, "fixed"), _trainer(b, "work")
        # the larger sizes this device holds (every rank agrees); each runs half as many calls a
        # repeat as the one before (at least two)
        larger = {size: run for size in WORK_SIZES[1:] if (run := _sized(b, size)) is not None}
        calls = {size: max(2, inner // (5 << i)) for i, size in enumerate(WORK_SIZES)}
        self.train_cases = {"train": (fixed_step, inner, True),
                            "work": (self.work_step, calls["work"], True),
                            **{size: (train, calls[size], True)
                               for size, (train, _) in larger.items()},
                            "work_all_ranks": (self.work_step, calls["work"], False)}
        # decoding at every probe size: the fixed part and how decode kernels compare with the
        # roofline (the "work" size also on every rank at once: decode contention)
        n = 2 if quick else 4
        work_decode = _decoder(b, "work")
        self.decode_cases = {"infer_fixed": (_decoder(b, "fixed"), n, True),
                             "infer": (work_decode, n, True),
                             **{f"infer_{size}": (decode, n, True)
                                for size, (_, decode) in larger.items()},
                             "infer_all_ranks": (work_decode, n, False)}
        self.sizes = ["fixed", "work", *larger]
        self.steps = []  # (step function, parameters) of one optimizer step at both probe sizes
        idx = torch.zeros(1, 9, dtype=torch.long, device=b.device)
        for size in ("fixed", "work"):
            m = _probe_model(b.device, size)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            numel = {name: p.numel() for name, p in m.named_parameters()}
            loss, _ = m.loss(idx[:, :-1], idx[:, 1:])
            loss.backward()

            def step(m=m, opt=opt, numel=numel) -> None:
                clip_grads(m, dict.fromkeys(numel, 1.0), 1, 1.0)
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

    def spread(self, device_ratios: list[float], in_situ: list[dict]) -> dict[str, list]:
        """(p10, p90) of each group's moment ratios (`Pool.moment_ratios`): compute — the device
        sweeps, the probe's work sizes and the in-step samples' step time; framework — its fixed
        size and the optimizer; communication — the in-step samples' all-to-all and gradient
        sync (one sample a moment)."""
        keys = self.pool.samples
        work = [k for k in keys if k[0] in (*WORK_SIZES, "infer",
                                             *(f"infer_{size}" for size in WORK_SIZES[1:]))]
        fixed = [k for k in keys if k[0] in ("train", "infer_fixed", "optimizer")]

        def in_step_samples(figures) -> list[float]:
            out = []
            for mode, figure in figures:
                values = [s[mode][figure] for s in in_situ if s and s.get(mode)]
                pooled = fit.robust_median(values) if values else 0.0
                out += [v / pooled for v in values] if pooled > 0 else []
            return out

        # a step's compute in a running step (the in-step factor) moves with the whole step
        groups = {"compute": device_ratios + self.pool.moment_ratios(work)
                  + in_step_samples((("train", "step_s"), ("infer", "step_s"))),
                  "framework": self.pool.moment_ratios(fixed),
                  "communication": in_step_samples((("train", "a2a_s"), ("train", "grad_sync_s"),
                                         ("infer", "a2a_s")))}
        return {name: {"p10_p90": spread(r), "figures": len(r)} for name, r in groups.items()
                if spread(r) is not None}

    def result(self) -> dict:
        """The raw measurements `calibrate.framework.framework_overhead` reads: each case's
        table in its stored form (`tables.to_raw`), skew, optimizer, host, and the probe's
        sizes (a record: the fit reads the sizes of the device kind)."""
        kind = _kind(self.b.device)
        tables: dict[str, Table] = {name: {} for name in (*self.train_cases, *self.decode_cases)}
        for key, values in self.pool.samples.items():
            if key[0] in tables:
                tables[key[0]][key[1]] = fit.robust_median(values)
        counted = ("work", Timed(Direction.FORWARD, 0, Phase.ATTENTION))
        return {**{name: to_raw(table) for name, table in tables.items()},
                "skew": fit.robust_median(self.skew),
                "decode_tokens": {size: decode_shape(size, kind)[1] - 1 for size in self.sizes},
                "probe_sizes": {size: PROBE_SIZES[kind][size] for size in self.sizes},
                "optimizer": [(self.pool.median(("optimizer", i)), n)
                              for i, (_, n) in enumerate(self.steps)],
                "tensors": self.tensors, "samples": {name: len(v) for name, v in (
                    ("tables", self.pool.samples.get(counted, [])),
                    ("skew", self.skew))},
                "host_ranks": _ranks_on_this_host(self.b), "cores": _cores(self.b)}


class InSitu:
    """The "work" probe run by the runtime's own training and decoding loops (`runtime.run`, as
    `moerun` runs a plan) on every rank, its MoE layers expert-parallel over the world
    (`shapes.in_situ_plans`): the all-to-all phases and the gradient sync as they come out inside
    a running step, mean over ranks as `moerun` reports them, and the step (token) time against
    its timed phases. The profile keeps what they take beyond the model's prediction for the
    same plans, and the share of the step no phase timer sees. One sample is a short run of
    each mode, one at each moment of the profile; the profile keeps the median one
    (`in_situ.median_sample`)."""

    def __init__(self, b: Bench, base: str, gpus_per_node: int, quick: bool):
        self.b, self.runs = b, []
        if b.world == 1:
            return
        cluster = load_cluster(base).model_copy(update={"gpus_per_node": gpus_per_node})
        for mode, plan in in_situ_plans(cluster, b.world).items():
            groups = build_groups(plan, b.rank, b.world)  # every rank, in the same order
            # warm-up beyond the first step: the first calls on fresh groups and buffers are slow
            cfg = RunConfig(mode=mode, steps=4 if quick else 8, warmup=2)
            model = build_model(plan, groups, cfg)[0].to(b.device)
            use_kernels(model, select(b.device))
            self.runs.append((mode, plan, groups, cfg, model))

    def sample(self) -> dict:
        out = {}
        for mode, plan, groups, cfg, model in self.runs:
            if mode == "train":
                got = train(plan, model, groups, cfg, lambda *_: None)
                sync, opt, whole = got.grad_sync_s, got.optimizer_s, got.step_s
            else:
                got = infer(plan, model, groups, cfg, lambda *_: None)
                sync, opt, whole = 0.0, 0.0, got.latency_s
            a2a = sum(v for key, v in got.phases.items() if key.phase in EXCHANGE)
            timed = sum(got.phases.values()) + sync + opt
            t = torch.tensor([a2a, sync, whole, timed], dtype=torch.float64)
            dist.all_reduce(t)
            t /= self.b.world
            out[mode] = {"a2a_s": float(t[0]), "grad_sync_s": float(t[1]),
                         "step_s": float(t[2]), "timed_s": float(t[3])}
        return out

    def result(self, samples: list[dict]) -> dict:
        """Per mode, the median sample (the samples as well): see `in_situ.median_sample`."""

        return in_situ_medians({"world": self.b.world, "samples": samples}) if self.runs else {}


def _cores(b: Bench) -> int | None:
    """CPU cores the ranks of this host share — None on GPUs, where each rank has its own."""
    if b.device.type == "cuda":
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
