"""The training step's optimizer under the plan's ZeRO stage: gradient reduction, global-norm
clipping, AdamW, and the per-parameter Adam moments a checkpoint holds.

  ZeRO 0  `Replicated`  every rank reduces the whole gradients (`GradSync`) and keeps whole
                        Adam moments of its parameters
  ZeRO 1  `Sharded`     allreduce, then each rank steps its 1/n of each bucket (n: the bucket's
                        data-parallel group: dp for non-expert parameters, the layer's edp for
                        experts) and the updated pieces are allgathered
  ZeRO 2  `Sharded`     reduce-scatter instead of the allreduce: each rank keeps only its
                        piece of the reduced gradients

Sharded buckets hold their parameters as views of one flat buffer, so the piece a rank steps is
a view too: Adam's moments exist only for that piece, nothing is copied. The gradients of a step
exist whole until its backward ends (they are reduced once per step, after the last
micro-batch), then only as pieces under ZeRO 2 — what the planner charges moerun.
The recipe (the paper's Megatron-DeepSpeed scripts): AdamW β (0.9, 0.95), weight decay 0.1 on
weight matrices and embeddings, none on biases and norms.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeplan.runtime.comm import Comm, all_gather_tensor, allreduce_, reduce_scatter_tensor
from moeplan.runtime.groups import Groups
from moeplan.runtime.model import GPT
from moeplan.runtime.parallel import GradSync, cut, sync_key, whole_shapes

WEIGHT_DECAY = 0.1  # the DeepSpeed-MoE training scripts' (Megatron-DeepSpeed examples MoE/)
BETAS = (0.9, 0.95)
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter, beside its step count


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay on weight matrices and embeddings, not on biases and norm scales (the
    experts' stacked biases b1, b2 are matrices by shape only)."""
    return p.dim() > 1 and not name.endswith(("experts.b1", "experts.b2"))


def is_expert(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 3 and parts[0] == "blocks" and parts[3] == "experts"


def replicas(model: GPT, world: int) -> dict[str, float]:
    """Per parameter, how many ranks hold the same piece of it (world × piece / whole)."""
    whole = whole_shapes(model.spec)
    return {n: world * p.numel() / whole[n].numel() for n, p in model.named_parameters()}


def _adamw(decay: list, no_decay: list, lr: float) -> torch.optim.AdamW:
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=BETAS)


def _scale_grads(grads: list[torch.Tensor], sq: torch.Tensor, world: int,
                 max_norm: float) -> float:
    """Clip `grads` by the global norm, √(Σ over ranks of `sq`)."""
    if world > 1:
        dist.all_reduce(sq)
    norm = math.sqrt(float(sq))
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def _square_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ g², summed in the gradient's fp32 (torch's cascaded / tree sum: about 1e-7 relative)
    and added up in fp64 across tensors: one fp32 temporary, where a `.double()` copy made two
    fp64 ones — four times an expert stack's gradient on the device at once."""
    return g.square().sum().double()


def clip_grads(model: GPT, replicas: dict[str, float], world: int, max_norm: float) -> float:
    """Clip whole gradients by the global norm; a piece held by n ranks counts 1/n on each.
    The sum stays on the gradients' device: one read back, in `_scale_grads`."""
    sq = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq += _square_sum(p.grad) / replicas[name]
            grads.append(p.grad)
    return _scale_grads(grads, sq, world, max_norm)


@dataclass
class MemoryBytes:
    """This rank's weights, gradients (whole, as the backward leaves them) and optimizer states,
    non-expert and expert apart, a teacher's weights, and in inference the KV cache — the plan's
    memory terms of the same names."""

    weights: float = 0.0
    expert_weights: float = 0.0
    gradients: float = 0.0
    expert_gradients: float = 0.0
    optimizer_states: float = 0.0
    expert_optimizer_states: float = 0.0
    teacher_weights: float = 0.0  # a MoS plan's teacher
    kv_cache: float = 0.0  # inference: one generation's static cache

    def add(self, term: str, expert: bool, nbytes: float) -> None:
        key = f"expert_{term}" if expert else term
        setattr(self, key, getattr(self, key) + nbytes)


class Replicated:
    """ZeRO 0: whole gradients reduced, whole Adam moments on every rank."""

    stage = 0

    def __init__(self, model: GPT, groups: Groups, lr: float):
        self.model, self.world = model, groups.world
        self.sync = GradSync(model, groups)
        self.replicas = replicas(model, groups.world)
        named = list(model.named_parameters())
        self.torch = _adamw([p for n, p in named if decays(n, p)],
                            [p for n, p in named if not decays(n, p)], lr)

    def reduce(self) -> None:
        self.sync()

    def clip(self, max_norm: float) -> float:
        return clip_grads(self.model, self.replicas, self.world, max_norm)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def skip(self) -> None:
        self.torch.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.torch.step()
        self.torch.zero_grad(set_to_none=True)

    @property
    def steps(self) -> int:
        first = next(self.model.parameters())
        state = self.torch.state.get(first)
        return int(state["step"]) if state else 0

    def moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name, its Adam moments on this rank (the parameter's piece)."""
        return {name: {m: self.torch.state[p][m] for m in MOMENTS}
                for name, p in self.model.named_parameters() if p in self.torch.state}

    def restore(self, moments: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        """Continue from whole moments (a checkpoint's), cut as this rank's weights are."""
        slices = self.model.slices()
        for name, p in self.model.named_parameters():
            state = {m: cut(moments[name][m], slices.get(name, ())).clone().to(p.device)
                     for m in MOMENTS}
            state["step"] = torch.tensor(float(steps))
            self.torch.state[p] = state

    def memory(self) -> MemoryBytes:
        out = MemoryBytes()
        for name, p in self.model.named_parameters():
            nbytes = p.numel() * p.element_size()
            out.add("weights", is_expert(name), nbytes)
            out.add("gradients", is_expert(name), nbytes)
        for name, state in self.moments().items():
            out.add("optimizer_states", is_expert(name),
                    sum(t.numel() * t.element_size() for t in state.values()))
        return out


@dataclass
class _Bucket:
    """Parameters that share a reduction, as views of one flat buffer padded to a multiple of the
    group's size; this rank steps [lo, hi) of it."""

    pre: Comm | None
    comm: Comm
    scale: float
    names: list[str]
    params: list[torch.nn.Parameter]
    offsets: list[int]
    flat: torch.Tensor
    lo: int
    hi: int
    split: int  # parameters before `split` (in buffer order) decay, those after do not
    pieces: list[torch.Tensor]  # [lo, hi) cut at `split`: the tensors AdamW steps
    grad: torch.Tensor | None = None  # this step's reduced gradient of [lo, hi)

    def segments(self):
        """(name, this rank's part of the parameter as a slice of [lo, hi))."""
        for name, p, off in zip(self.names, self.params, self.offsets):
            a, b = max(off, self.lo), min(off + p.numel(), self.hi)
            if a < b:
                yield name, slice(a - self.lo, b - self.lo)


class Sharded:
    """ZeRO 1 and 2: each bucket's optimizer states (and, for 2, its reduced gradients) split
    over the bucket's data-parallel group."""

    def __init__(self, model: GPT, groups: Groups, lr: float, stage: int):
        assert stage in (1, 2)
        self.model, self.world, self.stage = model, groups.world, stage
        self.replicas = replicas(model, groups.world)
        keyed: OrderedDict[tuple, list] = OrderedDict()
        for name, p in model.named_parameters():
            # experts apart from the rest even where they share a group (ep = 1), as DeepSpeed's
            # MoE parameter groups: each kind is split evenly over the ranks
            keyed.setdefault(sync_key(name, groups) + (is_expert(name),), []).append((name, p))
        self.buckets: list[_Bucket] = []
        decay, no_decay = [], []
        for (pre, comm, scale, _), named in keyed.items():
            named.sort(key=lambda np_: not decays(*np_))  # decaying first: one cut point
            bucket = self._bucket(pre, comm, scale, named)
            self.buckets.append(bucket)
            first, second = bucket.pieces
            if first.numel():
                decay.append(first)
            if second.numel():
                no_decay.append(second)
        self.torch = _adamw(decay, no_decay, lr)

    @staticmethod
    def _bucket(pre, comm: Comm, scale: float, named: list) -> _Bucket:
        total = sum(p.numel() for _, p in named)
        per = -(-total // comm.size)
        p0 = named[0][1]
        flat = torch.zeros(per * comm.size, dtype=p0.dtype, device=p0.device)
        offsets, off, split = [], 0, 0
        for name, p in named:
            n = p.numel()
            flat[off:off + n].copy_(p.detach().reshape(-1))
            p.data = flat[off:off + n].view_as(p)  # the parameter lives in the buffer
            offsets.append(off)
            off += n
            if decays(name, p):
                split = off
        lo = comm.rank_in_group * per
        hi = lo + per
        cut_at = min(max(split, lo), hi)
        pieces = [flat[lo:cut_at], flat[cut_at:hi]]
        return _Bucket(pre, comm, scale, [n for n, _ in named], [p for _, p in named], offsets,
                       flat, lo, hi, cut_at - lo, pieces)

    def reduce(self) -> None:
        """Each bucket's reduced gradient, this rank's [lo, hi) of it, set on its pieces; the
        whole gradients are released."""
        for b in self.buckets:
            grads = torch.zeros_like(b.flat)
            for p, off in zip(b.params, b.offsets):
                if p.grad is not None:
                    grads[off:off + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = None
            if b.pre is not None:
                allreduce_(grads, b.pre)
            if self.stage == 1 or b.comm.size == 1:
                allreduce_(grads, b.comm)
                mine = grads[b.lo:b.hi].clone()
            else:
                mine = torch.empty(b.hi - b.lo, dtype=grads.dtype, device=grads.device)
                reduce_scatter_tensor(mine, grads, group=b.comm.group)
            mine.mul_(b.scale)
            b.grad = mine  # the pieces' gradients are views of it
            b.pieces[0].grad = mine[:b.split]
            b.pieces[1].grad = mine[b.split:]

    def grads(self) -> list[torch.Tensor]:
        return [x.grad for b in self.buckets for x in b.pieces if x.grad is not None]

    def skip(self) -> None:
        self.torch.zero_grad(set_to_none=True)

    def clip(self, max_norm: float) -> float:
        sq = torch.zeros(1, dtype=torch.float64, device=self.buckets[0].flat.device)
        grads = []
        for b in self.buckets:
            for name, part in b.segments():
                # this piece is on 1/comm of the ranks that hold the parameter
                sq += _square_sum(b.grad[part]) * b.comm.size / self.replicas[name]
            grads += [x.grad for x in b.pieces]
        return _scale_grads(grads, sq, self.world, max_norm)

    def step(self) -> None:
        self.torch.step()
        self.torch.zero_grad(set_to_none=True)
        for b in self.buckets:
            if b.comm.size > 1:
                whole = torch.empty_like(b.flat)
                all_gather_tensor(whole, b.flat[b.lo:b.hi].clone(), group=b.comm.group)
                b.flat.copy_(whole)

    @property
    def steps(self) -> int:
        for b in self.buckets:
            for x in b.pieces:
                if x in self.torch.state:
                    return int(self.torch.state[x]["step"])
        return 0

    def _flat_moment(self, b: _Bucket, moment: str) -> torch.Tensor:
        """The whole bucket's moment: every rank's piece, gathered over the group."""
        mine = torch.cat([self.torch.state[x][moment] if x in self.torch.state
                          else torch.zeros_like(x) for x in b.pieces])
        if b.comm.size == 1:
            return mine
        whole = torch.empty_like(b.flat)
        all_gather_tensor(whole, mine, group=b.comm.group)
        return whole

    def moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name, its Adam moments (the parameter's piece on this rank, whole):
        a collective — every rank of each bucket's group calls it."""
        if not self.torch.state:
            return {}
        out: dict[str, dict[str, torch.Tensor]] = {}
        for b in self.buckets:
            flat = {m: self._flat_moment(b, m) for m in MOMENTS}
            for name, p, off in zip(b.names, b.params, b.offsets):
                out[name] = {m: flat[m][off:off + p.numel()].view_as(p) for m in MOMENTS}
        return out

    def restore(self, moments: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        slices = self.model.slices()
        for b in self.buckets:
            flat = {m: torch.zeros_like(b.flat) for m in MOMENTS}
            for name, p, off in zip(b.names, b.params, b.offsets):
                for m in MOMENTS:
                    flat[m][off:off + p.numel()].copy_(
                        cut(moments[name][m], slices.get(name, ())).reshape(-1))
            at = b.lo + b.split
            for x, (a, z) in zip(b.pieces, ((b.lo, at), (at, b.hi))):
                if x.numel():
                    state = {m: flat[m][a:z].clone() for m in MOMENTS}
                    state["step"] = torch.tensor(float(steps))
                    self.torch.state[x] = state

    def memory(self) -> MemoryBytes:
        out = MemoryBytes()
        for b in self.buckets:
            for name, p in zip(b.names, b.params):
                nbytes = p.numel() * p.element_size()
                out.add("weights", is_expert(name), nbytes)
                out.add("gradients", is_expert(name), nbytes)
            if any(x in self.torch.state for x in b.pieces):  # moments of this rank's piece
                for name, part in b.segments():
                    out.add("optimizer_states", is_expert(name), len(MOMENTS)
                            * (part.stop - part.start) * b.flat.element_size())
        return out


class LossScaler:
    """fp16's dynamic loss scaling, as DeepSpeed's (loss_scale 0): the loss is multiplied by
    the scale before the backward; a step whose gradients hold an inf or NaN on any rank is
    skipped, and after `hysteresis` such steps the scale halves (not below `min_scale`); after
    `window` clean steps in a row it doubles. Constants: the Megatron-DeepSpeed examples'
    DeepSpeed configs (fp16: initial_scale_power 11, loss_scale_window 500, hysteresis 2,
    min_loss_scale 1). Disabled (scale 1, never skips) for fp32 and bf16."""

    def __init__(self, enabled: bool, initial: float = 2.0 ** 11, window: int = 500,
                 hysteresis: int = 2, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = initial if enabled else 1.0
        self.window, self.hysteresis, self.min_scale = window, hysteresis, min_scale
        self.left = hysteresis  # overflows still tolerated before the scale halves
        self.clean = 0  # clean steps since the last overflow or doubling
        self.skipped = 0

    def state(self) -> dict:
        return {"scale": self.scale, "clean": self.clean, "left": self.left,
                "skipped": self.skipped}

    def load(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scale, self.clean = float(state["scale"]), int(state["clean"])
            self.left, self.skipped = int(state["left"]), int(state["skipped"])

    def unscale(self, grads: list[torch.Tensor], world: int) -> bool:
        """Divide the reduced gradients by the scale; False (on every rank alike) when some
        rank's hold an inf or NaN — the step is then to be skipped."""
        if not self.enabled:
            return True
        if not grads:
            return True
        bad = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float().reshape(1)
        if world > 1:
            dist.all_reduce(bad)
        if float(bad) > 0:  # the step's one read back
            self._overflow()
            return False
        for g in grads:
            g.mul_(1.0 / self.scale)
        self.clean += 1
        if self.clean >= self.window:
            self.scale *= 2.0
            self.clean, self.left = 0, self.hysteresis
        return True

    def _overflow(self) -> None:
        self.skipped += 1
        self.clean = 0
        self.left -= 1
        if self.left <= 0:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.left = self.hysteresis


def make_optimizer(model: GPT, groups: Groups, lr: float, stage: int) -> Replicated | Sharded:
    return Replicated(model, groups, lr) if stage == 0 else Sharded(model, groups, lr, stage)
