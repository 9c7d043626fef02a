"""Execute a plan on this rank: build groups and the sharded model, train or serve, measure.

Called by the worker that `moerun` launches (one per rank); returns the `RunRecord` on rank 0.
Measurement: a `PhaseTimer` attributes forward and backward time to (layer, phase); step time,
gradient sync and optimizer are timed around their calls after a barrier; every figure is gathered
to rank 0, which reports the mean over ranks (and the max, for the slowest rank). Phase times are
the median over measured steps (generations) of each step's total.
"""

from __future__ import annotations

import math
import os
import resource
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from statistics import median

import torch
import torch.distributed as dist

from moeplan.runtime import checkpoint
from moeplan.runtime.data import Batches, open_corpus
from moeplan.runtime.groups import Groups, build_groups
from moeplan.runtime.infer import generate
from moeplan.runtime.kernels import select, use_kernels
from moeplan.runtime.model import GPT, MoE
from moeplan.runtime.optim import LossScaler, MemoryBytes, is_expert, make_optimizer
from moeplan.runtime.parallel import (
    init_seeded,
    load_full_state,
    parallel_context,
    parallelize,
)
from moeplan.runtime.timers import NULL_TIMER, PhaseTimer, instrument
from moeplan.spec.phases import HEAD_PHASE, LayerPhase, Phase
from moeplan.spec.plan import Plan, digest
from moeplan.spec.record import LayerMeasure, Measured, RunRecord, compare, compare_memory

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the plan's dtype -> torch's
MIN_LR_FRACTION = 0.1  # cosine decay ends at a tenth of the peak learning rate


def lr_factor(step: int, total: int) -> float:
    """The learning rate of `step` over the peak: linear warm-up over the first tenth of the
    steps, then cosine decay to MIN_LR_FRACTION at the last."""
    warm = max(1, total // 10)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - 1 - warm))
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RunConfig:
    mode: str
    steps: int = 10
    warmup: int = 1
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0
    save: str | None = None
    load: str | None = None
    fault: tuple[int, int] | None = None  # (rank, step): that rank exits there (tests)
    timeout_s: float | None = None  # a collective's wait for a peer before the job fails
    schedule_steps: int | None = None  # the LR schedule's length [default: this run's end]
    data: str | None = None  # token ids or text (`data.open_corpus`); None: the stdlib corpus
    tokenizer: str | None = None
    teacher: str | None = None  # a MoS plan's teacher checkpoint
    kd_steps: int | None = None  # distil until this step [default: the spec's stop_step]


@dataclass(frozen=True)
class TrainResult:
    """One rank's training run: each (layer, phase)'s seconds per step and the step's parts,
    medians over the measured steps; dropped and routed choices per MoE layer over them; the loss
    of every step (warm-up included) and of the evaluation batch."""

    phases: dict[LayerPhase, float]
    step_s: float
    teacher_s: float  # the teacher's forward per step (0: no distillation)
    grad_sync_s: float
    optimizer_s: float
    dropped: dict[int, int]
    routed: dict[int, int]
    loads: list[dict[int, StepLoad]]  # every step's routing per MoE layer, warm-up included
    losses: list[float]
    eval_loss: float
    steps: int  # measured steps
    memory: MemoryBytes  # weights, whole gradients and optimizer states on this rank
    peak: tuple[float, str]  # the rank's peak memory over the steps (`_peak_memory`)


@dataclass(frozen=True)
class InferResult:
    """One rank's generations: each (layer, phase)'s seconds per decode token, the token latency
    and the prefill, medians over the measured generations; dropped and routed choices per MoE
    layer; the last generation's first sequence, as text; its weights and KV cache."""

    phases: dict[LayerPhase, float]
    latency_s: float
    prefill_s: float
    dropped: dict[int, int]
    routed: dict[int, int]
    sample: str
    memory: MemoryBytes
    peak: tuple[float, str]  # the rank's peak memory over the generations


@dataclass(frozen=True)
class Resume:
    """A checkpointed training run to continue: each parameter's full Adam moments, and where
    the run stood."""

    moments: dict[str, dict[str, torch.Tensor]]
    position: checkpoint.Position


def build_model(plan: Plan, groups: Groups, cfg: RunConfig) -> tuple[GPT, Resume | None]:
    """The sharded model: weights from a checkpoint (and, when it holds them, the optimizer
    states to resume with), or a seeded initialisation drawn per parameter
    (`parallel.init_seeded`), so that every plan holds pieces of the same model."""
    resume = None
    if cfg.load:
        manifest = checkpoint.read_manifest(cfg.load)
        checkpoint.check_model(manifest, plan.model, cfg.load)
        full, _ = checkpoint.load_full(cfg.load)
        full, moments = checkpoint.split(full)
        pos = checkpoint.position(manifest)
        if pos is not None:
            resume = Resume(moments, pos)
        return parallelize(full, plan, groups), resume
    torch.manual_seed(cfg.seed)
    model = GPT(plan.model, parallel_context(groups))
    init_seeded(model, cfg.seed)
    return model, None


def build_teacher(plan: Plan, groups: Groups, path: str) -> GPT:
    """A MoS plan's teacher from its checkpoint, sharded as the plan's teacher section says,
    in evaluation (inference capacity, no dropout, no aux loss) and without gradients."""
    manifest = checkpoint.read_manifest(path)
    checkpoint.check_model(manifest, plan.teacher.model, path)
    weights, _ = checkpoint.split(checkpoint.load_full(path)[0])
    teacher = GPT(plan.teacher.model, parallel_context(groups, teacher=True))
    load_full_state(teacher, weights)
    return teacher.eval().requires_grad_(False)


def kd_until(plan: Plan, cfg: RunConfig) -> int:
    """The step distillation stops at (staged KD): --kd-steps, else the spec's stop_step, else
    never; 0 without a teacher."""
    if plan.teacher is None or cfg.teacher is None:
        return 0
    if cfg.kd_steps is not None:
        return cfg.kd_steps
    stop = plan.model.distillation.stop_step
    return stop if stop is not None else 1 << 62


def _moe_layers(model: GPT) -> dict[int, MoE]:
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)}


def set_noise_keys(model: GPT, seed: int, step: int, first: int) -> None:
    """Seed each MoE layer's gate noise for the micro-batch whose first sequence is row `first`
    of step `step`'s global batch: the same numbers on every rank that routes those tokens,
    and again when a resumed run reaches the same step (no generator state to save)."""
    for i, moe in _moe_layers(model).items():
        key = 0
        for part in (seed, step, first, i):
            key = (key * 1_000_003 + part + 1) % (1 << 62)  # a polynomial hash of the four
        moe.noise_key = key


class _Drops:
    """Dropped and routed choices per MoE layer over the generations, summed on the device;
    `totals` reads them back (once, after the timed region: a read is a device-to-host sync)."""

    def __init__(self, model: GPT):
        self.moe = _moe_layers(model)
        self.reset()

    def reset(self) -> None:
        self.dropped: dict[int, torch.Tensor | int] = defaultdict(int)
        self.routed: dict[int, torch.Tensor | int] = defaultdict(int)

    def add(self) -> None:
        for i, m in self.moe.items():
            r = m.last
            self.dropped[i] = self.dropped[i] + r.dropped
            self.routed[i] = self.routed[i] + r.routed

    def totals(self) -> tuple[dict[int, int], dict[int, int]]:
        return ({i: int(v) for i, v in self.dropped.items()},
                {i: int(v) for i, v in self.routed.items()})


@dataclass(frozen=True)
class StepLoad:
    """One MoE layer's routing in one training step on this rank: choices per expert (before
    dropping for capacity), and choices dropped."""

    load: list[int]
    dropped: int


class _Loads:
    """Per training step and MoE layer, this rank's choices per expert and dropped choices,
    counted on the device (no sync) and read once the step is over."""

    def __init__(self, model: GPT):
        self.moe = _moe_layers(model)
        self.steps: list[dict[int, StepLoad]] = []
        self.begin()

    def begin(self) -> None:
        self.load = {i: None for i in self.moe}
        self.dropped = {i: 0 for i in self.moe}

    def add(self) -> None:
        for i, m in self.moe.items():
            r = m.last
            choices = r.expert_TK
            weight = torch.ones_like(choices) if r.valid_T is None else (
                r.valid_T[:, None].expand_as(choices).long())
            counts = torch.zeros(m.E, dtype=torch.long, device=choices.device).scatter_add_(
                0, choices.reshape(-1), weight.reshape(-1))
            self.load[i] = counts if self.load[i] is None else self.load[i] + counts
            self.dropped[i] = self.dropped[i] + r.dropped

    def end(self) -> None:
        self.steps.append({i: StepLoad(self.load[i].tolist(), int(self.dropped[i]))
                           for i in self.moe if self.load[i] is not None})
        self.begin()


def _median_phases(per_step: list[dict[LayerPhase, float]]) -> dict[LayerPhase, float]:
    """Per (layer, phase): the median over measured steps (or generations) — one slow step
    (a scheduler hiccup on an oversubscribed host) does not move it, as it would a mean."""
    keys = {k for d in per_step for k in d}
    return {k: median(d.get(k, 0.0) for d in per_step) for k in keys}


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _peak_memory(cuda: bool) -> tuple[float, str]:
    if cuda:
        return float(torch.cuda.max_memory_allocated()), "cuda max allocated"
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), \
        "cpu peak rss (whole process)"


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train(plan: Plan, model: GPT, groups: Groups, cfg: RunConfig, log,
          resume: Resume | None = None, teacher: GPT | None = None) -> TrainResult:
    w = plan.workload
    cuda = next(model.parameters()).is_cuda
    dev = next(model.parameters()).device
    data = Batches(open_corpus(cfg.data, cfg.tokenizer, plan.model.vocab_size, w.seq_len),
                   w.seq_len, seed=cfg.seed)
    micro_steps = w.global_batch // (plan.parallel.dp * w.micro_batch)
    # the paper's Megatron-DeepSpeed recipe (`optim`), clipping at cfg.clip, linear warm-up then
    # cosine decay to a tenth; optimizer states partitioned as the plan's ZeRO stage says
    opt = make_optimizer(model, groups, cfg.lr, w.zero_stage)
    total_steps = cfg.warmup + cfg.steps
    start = resume.position.step if resume else 0
    schedule = cfg.schedule_steps or (resume.position.schedule_steps if resume
                                      else start + total_steps)
    if resume:
        opt.restore(resume.moments, resume.position.optimizer_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.torch, lambda s: lr_factor(start + s, schedule))
    timer = PhaseTimer(cuda)
    instrument(model, timer)
    loads = _Loads(model)
    # the plan's dtype: fp32 as is; bf16 and fp16 under autocast with fp32 weights, gradients
    # and Adam states (the master copy); fp16 with dynamic loss scaling
    low = LOW_PRECISION.get(w.dtype)
    autocast = (torch.autocast(dev.type, dtype=low) if low is not None else nullcontext())
    scaler = LossScaler(enabled=w.dtype == "fp16")
    if resume:
        scaler.load(resume.position.loss_scaler)
    losses, step_s, sync_s, opt_s, teacher_s = [], [], [], [], []
    memory = MemoryBytes()
    kd_stop = kd_until(plan, cfg) if teacher is not None else 0
    kd = plan.model.distillation
    step_phases: list[dict[LayerPhase, float]] = []
    model.train()
    for step in range(start, start + total_steps):
        if cfg.fault and cfg.fault == (groups.rank, step):
            os._exit(17)
        measured = step - start >= cfg.warmup
        timer.reset()
        _barrier(groups.world)
        t0 = timer.now()
        total, taught = torch.zeros((), dtype=torch.float64, device=dev), []
        for m in range(micro_steps):
            first = (groups.dp.rank_in_group * micro_steps + m) * w.micro_batch
            batch = data.batch(step, first, w.micro_batch, w.global_batch).to(dev)
            set_noise_keys(model, cfg.seed, step, first)
            soft = None
            if step < kd_stop:  # the teacher's soft labels, timed apart from the student
                t_start = timer.now()
                with torch.no_grad(), autocast:
                    soft = teacher(batch[:, :-1])[0]
                taught.append((t_start, timer.now()))
            timer.begin()
            with autocast:
                loss, _ = model.loss(batch[:, :-1], batch[:, 1:], soft,
                                     kd.alpha if kd else 0.0, kd.temperature if kd else 1.0)
            timer.end()
            timer.begin_backward()
            (loss * (scaler.scale / micro_steps)).backward()
            timer.end_backward()
            loads.add()
            total += loss.detach() / micro_steps  # read after the step: no sync inside it
        if step == start:
            memory = opt.memory()  # the whole gradients exist now, the moments not yet
        t1 = timer.now()
        opt.reduce()
        t2 = timer.now()
        if scaler.unscale(opt.grads(), groups.world):
            opt.clip(cfg.clip)
            opt.step()
        else:  # fp16 overflow: no update (the schedule still moves on, by step index)
            opt.skip()
            log(f"step {step + 1}: fp16 gradients overflowed; skipped, loss scale now "
                f"{scaler.scale:g}")
        sched.step()
        t3 = timer.now()
        total = float(total)
        losses.append(total)
        loads.end()  # read back after the step's timed region
        seconds = timer.elapsed(t0, t3)
        if measured:
            step_phases.append(timer.totals())
            step_s.append(seconds)
            teacher_s.append(sum(timer.elapsed(a, b) for a, b in taught))
            sync_s.append(timer.elapsed(t1, t2))
            opt_s.append(timer.elapsed(t2, t3))
        log(f"step {step + 1}/{start + total_steps}  loss {total:.4f}  {seconds:.3f} s"
            + ("" if measured else "  (warm-up)"))
    stepped = opt.memory()
    memory.optimizer_states = stepped.optimizer_states
    memory.expert_optimizer_states = stepped.expert_optimizer_states
    if teacher is not None:
        memory.teacher_weights = float(sum(p.numel() * p.element_size()
                                           for p in teacher.parameters()))
    peak = _peak_memory(cuda)  # before the save gathers whole moments
    if cfg.save:
        checkpoint.save(model, cfg.save, start + total_steps, digest(plan), groups.rank,
                        groups.world, moments=opt.moments(),
                        position=checkpoint.Position(step=start + total_steps,
                                                     optimizer_steps=opt.steps,
                                                     schedule_steps=schedule, seed=cfg.seed,
                                                     loss_scaler=scaler.state()
                                                     if scaler.enabled else None))
        log(f"saved checkpoint {cfg.save} at step {start + total_steps}")
    n = cfg.steps
    instrument(model, NULL_TIMER)  # the evaluation pass is not a training step
    with torch.no_grad():
        model.eval()
        batch = data.eval_batch(w.micro_batch).to(dev)
        eval_loss = float(model.loss(batch[:, :-1], batch[:, 1:])[0])
    measured_loads = loads.steps[cfg.warmup:]
    dropped = {i: sum(s[i].dropped for s in measured_loads) for i in loads.moe}
    routed = {i: sum(sum(s[i].load) for s in measured_loads) for i in loads.moe}
    return TrainResult(phases=_median_phases(step_phases),
                       step_s=median(step_s) if step_s else float("nan"),
                       teacher_s=median(teacher_s) if teacher_s else 0.0,
                       grad_sync_s=median(sync_s) if sync_s else 0.0,
                       optimizer_s=median(opt_s) if opt_s else 0.0,
                       dropped=dropped, routed=routed, loads=loads.steps,
                       losses=losses, eval_loss=eval_loss, steps=n, memory=memory, peak=peak)


def infer(plan: Plan, model: GPT, groups: Groups, cfg: RunConfig, log) -> InferResult:
    w = plan.workload
    low = LOW_PRECISION.get(w.dtype)
    if low is not None:  # served in the plan's dtype, as it is costed: weights, activations, cache
        model.to(low)
    cuda = next(model.parameters()).is_cuda
    dev = next(model.parameters()).device
    data = Batches(open_corpus(cfg.data, cfg.tokenizer, plan.model.vocab_size, w.seq_len),
                   w.seq_len, seed=cfg.seed)
    prompts = data.prompts(w.micro_batch, w.prompt_len, groups.dp.rank_in_group).to(dev)
    timer = PhaseTimer(cuda)
    instrument(model, timer)
    drops = _Drops(model)
    stamps: list = []

    def on_token(i: int) -> None:
        stamps.append(timer.now())
        if i == 0:  # decode phases only from here on
            timer.reset()
            timer.begin()
            drops.reset()
        else:
            drops.add()

    latencies, prefills, token_phases = [], [], []
    per_token = max(1, w.gen_len - 1)  # decode tokens between the first and the last stamp
    for rep in range(cfg.warmup + cfg.steps):
        if cfg.fault and cfg.fault == (groups.rank, rep):
            os._exit(17)
        _barrier(groups.world)
        stamps.clear()
        timer.begin()
        t0 = timer.now()
        # eager steps: the phase timers stamp every boundary, which a CUDA graph cannot hold
        out = generate(model, prompts, w.gen_len, on_token, graph=False)
        prefill = timer.elapsed(t0, stamps[0])
        if rep >= cfg.warmup:
            prefills.append(prefill)
            latencies.append(timer.elapsed(stamps[0], stamps[-1]) / per_token)
            token_phases.append({k: v / per_token for k, v in timer.totals().items()})
        log(f"generation {rep + 1}: {out.shape[0]} x {out.shape[1]} tokens, prefill "
            f"{prefill * 1e3:.1f} ms, {latencies[-1] * 1e3 if latencies else 0:.2f} "
            f"ms/token" + ("  (warm-up)" if rep < cfg.warmup else ""))
    instrument(model, NULL_TIMER)
    peak = _peak_memory(cuda)
    dropped, routed = drops.totals()
    # the cache as `generate` allocates it: every prompt and new-token position
    memory = MemoryBytes(kv_cache=model.new_cache(prompts.shape[0],
                                                  prompts.shape[1] + w.gen_len).nbytes)
    for name, p in model.named_parameters():
        memory.add("weights", is_expert(name), p.numel() * p.element_size())
    return InferResult(phases=_median_phases(token_phases),
                       latency_s=median(latencies), prefill_s=median(prefills),
                       dropped=dropped, routed=routed, memory=memory, peak=peak,
                       sample=bytes(out[0].clamp(0, 255).tolist()).decode("utf-8", "replace"))


def execute(plan: Plan, cfg: RunConfig, rank: int, world: int, log=print) -> RunRecord | None:
    cuda = torch.cuda.is_available()
    groups = build_groups(plan, rank, world, None if cfg.timeout_s is None
                          else timedelta(seconds=cfg.timeout_s))
    model, resume = build_model(plan, groups, cfg)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    low = LOW_PRECISION.get(plan.workload.dtype)
    say = log if rank == 0 else (lambda *_: None)
    teacher = None
    if cfg.mode == "train":
        model.to(device)
        if kd_until(plan, cfg) > 0:  # a MoS plan, its teacher given, distilling
            # forward only: held in the plan's dtype, as it is costed (cast before it moves)
            teacher = build_teacher(plan, groups, cfg.teacher).to(device=device, dtype=low)
            use_kernels(teacher, select(device))
    else:
        if cfg.save:  # the weights as loaded, before they are cast to the plan's dtype
            checkpoint.save(model, cfg.save, 0, digest(plan), rank, world)
            say(f"saved checkpoint {cfg.save}")
        model.to(device=device, dtype=low)  # served in the plan's dtype, cast before it moves
    use_kernels(model, select(device))
    if cuda:  # the run's own peak, not the set-up's
        torch.cuda.reset_peak_memory_stats()
    if cfg.mode == "train":
        result = train(plan, model, groups, cfg, say, resume, teacher)  # saves its optimizer
    else:
        result = infer(plan, model, groups, cfg, say)
    everyone = _gather(result, world)
    if rank != 0:
        return None
    peak, kind = max(r.peak for r in everyone)
    return _record(plan, cfg, everyone, peak, kind,
                   "nccl" if cuda else "gloo", torch.cuda.get_device_name() if cuda else "cpu")


def _routing(i: int, ranks: list[TrainResult]) -> dict[str, list[float]]:
    """Layer i's routing per training step over every rank: the busiest expert's load over the
    mean, the load's entropy over log E (1: uniform), and the share of choices dropped."""
    out: dict[str, list[float]] = {"load_max_over_mean": [], "load_entropy": [],
                                   "dropped_share": []}
    for step in range(min(len(r.loads) for r in ranks)):
        load = [sum(x) for x in zip(*(r.loads[step][i].load for r in ranks))]
        total, E = sum(load), len(load)
        dropped = sum(r.loads[step][i].dropped for r in ranks)
        shares = [x / total for x in load if x] if total else []
        out["load_max_over_mean"].append(max(load) * E / total if total else 0.0)
        out["load_entropy"].append(max(0.0, -sum(q * math.log(q) for q in shares) / math.log(E))
                                   if E > 1 and total else 1.0)
        out["dropped_share"].append(dropped / total if total else 0.0)
    return out


def _record(plan: Plan, cfg: RunConfig, ranks: list[TrainResult] | list[InferResult],
            peak_bytes: float, memory_kind: str, backend: str, device: str) -> RunRecord:
    """The run record from every rank's result (`peak_bytes`: the largest rank's peak memory)."""
    world = len(ranks)
    layers = []
    for lp in plan.layers:
        i = lp.index - 1
        keys = {key.phase for r in ranks for key in r.phases if key.layer == i}
        mean = {ph: sum(r.phases.get(LayerPhase(i, ph), 0.0) for r in ranks) / world
                for ph in keys}
        worst = {ph: max(r.phases.get(LayerPhase(i, ph), 0.0) for r in ranks) for ph in keys}
        layers.append(LayerMeasure(
            index=lp.index, kind=lp.kind, phases_s=dict(sorted(mean.items())),
            phases_max_s=dict(sorted(worst.items())),
            dropped=sum(r.dropped.get(i, 0) for r in ranks),
            routed=sum(r.routed.get(i, 0) for r in ranks),
            **(_routing(i, ranks) if cfg.mode == "train" and lp.kind == "moe" else {})))
    head = sum(r.phases.get(HEAD_PHASE, 0.0) for r in ranks) / world
    w = plan.workload
    r0 = ranks[0]
    if cfg.mode == "train":
        step = max(r.step_s for r in ranks)
        measured = Measured(step_time_s=step, tokens_per_s=w.global_batch * w.seq_len / step,
                            grad_sync_s=sum(r.grad_sync_s for r in ranks) / world,
                            optimizer_s=sum(r.optimizer_s for r in ranks) / world,
                            peak_memory_bytes=peak_bytes, memory_kind=memory_kind,
                            head_phases_s={Phase.HEAD: head, **({Phase.TEACHER: max(
                                r.teacher_s for r in ranks)} if r0.teacher_s else {})},
                            memory_bytes={k: max(getattr(r.memory, k) for r in ranks)
                                          for k in asdict(r0.memory)})
        extra = {"losses": r0.losses, "eval_loss": r0.eval_loss, "measured_steps": r0.steps}
    else:
        latency = max(r.latency_s for r in ranks)
        measured = Measured(latency_s=latency, prefill_s=max(r.prefill_s for r in ranks),
                            tokens_per_s=w.global_batch / latency,
                            peak_memory_bytes=peak_bytes,
                            memory_kind=memory_kind, head_phases_s={Phase.HEAD: head},
                            memory_bytes={k: max(getattr(r.memory, k) for r in ranks)
                                          for k in ("weights", "expert_weights", "kv_cache")})
        extra = {"measured_steps": cfg.steps}
    record = RunRecord(plan_digest=digest(plan), mode=cfg.mode, world=world, backend=backend,
                       device=device, warmup_steps=cfg.warmup, measured=measured, layers=layers,
                       **extra)
    record.comparison = compare(plan, record)
    record.memory_comparison = compare_memory(plan, record)
    return record
