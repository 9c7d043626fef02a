"""Top-k gating with DeepSpeed TopKGate semantics — the torch reference.

Legend: T tokens, E experts, K choices per token (1 or 2), C capacity per expert.

  probs_TE      fp32 softmax of the router logits
  choice 1      argmax (with `Noise.rsample`: of the logits plus Gumbel noise — a sample of the
                softmax); choice 2 (top-2) argmax of the logits with choice 1 masked, plus
                Gumbel noise when `Noise.second` (DeepSpeed's second-expert sampling)
  slots         position of each choice in its expert's buffer by a prefix sum in token order;
                all first choices come before all second choices (DeepSpeed's locations2 offset)
  capacity      from the caller (`ModelSpec.capacity`); choices at or past it are
                dropped, earliest tokens first kept — or, top-1 with `Noise.rts` (random
                token selection), the `capacity` tokens of highest random score kept
  weights       the chosen expert's probability (top-2: the kept ones renormalised to sum to 1)
  aux loss      E · Σ_e mean_T(probs_e) · mean_T(first-choice mask_e), before dropping; in
                inference (`with_aux=False`) a zero constant, its statistics never computed
  counts        dropped and routed choices as device tensors: a decode step reads nothing back
The statistics of the aux loss are sums over tokens that may be completed over a tensor-slicing
group (`reduce_stats`), so that a TP-coordinated gate sees the same loss as an uncoordinated one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    expert_TK: torch.Tensor  # int64 expert id per choice
    slot_TK: torch.Tensor  # int64 position in the expert's buffer
    keep_TK: torch.Tensor  # bool: within capacity
    weight_TK: torch.Tensor  # combine weight (0 where dropped)
    capacity: int
    aux_loss: torch.Tensor  # a zero constant when the gate computed no statistics (inference)
    # 0-d int64 tensors on the logits' device, read by the caller after the timed region
    dropped: torch.Tensor  # choices dropped for capacity
    routed: torch.Tensor  # choices of real tokens (tokens × k)
    valid_T: torch.Tensor | None = None  # real tokens (None: every row is one)

    @property
    def tokens(self) -> int:
        return self.expert_TK.shape[0]


def one_hot(e_T: torch.Tensor, experts: int) -> torch.Tensor:
    """F.one_hot without its range check (a device-to-host read): [T, E] int64."""
    return e_T.new_zeros(e_T.shape[0], experts).scatter_(1, e_T[:, None], 1)


def aux_loss(probs_TE: torch.Tensor, first_mask_TE: torch.Tensor, valid_T: torch.Tensor | None,
             reduce_stats: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """E · Σ_e mean_T(probs_e) · mean_T(first-choice mask_e) over the real tokens, the sums
    completed by `reduce_stats`."""
    T, E = probs_TE.shape
    real_probs = probs_TE if valid_T is None else probs_TE * valid_T[:, None]
    n_valid = probs_TE.new_full((1,), T) if valid_T is None else valid_T.sum().to(
        probs_TE.dtype).reshape(1)
    stats = torch.cat([real_probs.sum(0), first_mask_TE.sum(0).to(probs_TE.dtype), n_valid])
    if reduce_stats is not None:
        stats = reduce_stats(stats)
    me, ce, count = stats[:E], stats[E:2 * E], stats[-1].clamp(min=1)
    return E * torch.sum((me / count) * (ce / count))


def counts(keep_TK: torch.Tensor, valid_T: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """(dropped, routed) choices as 0-d device tensors: no device-to-host read."""
    T, K = keep_TK.shape
    routed = (keep_TK.new_full((), T * K, dtype=torch.long) if valid_T is None
              else valid_T.sum() * K)
    return routed - keep_TK.sum(), routed


@dataclass
class Noise:
    """A training gate call's random numbers (drawn by the caller from a seeded generator, so a
    run is reproducible and the same under every plan): `gumbel_TE` for sampled choices,
    `uniform_T` for random token selection."""

    gumbel_TE: torch.Tensor | None = None
    uniform_T: torch.Tensor | None = None
    rsample: bool = False  # top-1's choice sampled
    second: bool = False  # top-2's second choice sampled

    @property
    def rts(self) -> bool:
        return self.uniform_T is not None


def draw_noise(generator: torch.Generator, T: int, E: int, top_k: int, rts: bool,
               rsample: bool, second: bool, device) -> Noise | None:
    """The random numbers a gate call needs under these options (None: none)."""
    rsample, second, rts = rsample, second and top_k == 2, rts and top_k == 1
    if not (rsample or second or rts):
        return None
    gumbel = None
    if rsample or second:
        u = torch.rand(T, E, generator=generator, device=device)
        exponential = -torch.log(u.clamp(min=1e-20))
        gumbel = -torch.log(exponential.clamp(min=1e-20))
    uniform = torch.rand(T, generator=generator, device=device) if rts else None
    return Noise(gumbel, uniform, rsample, second)


def _random_keep(mask_TE: torch.Tensor, uniform_T: torch.Tensor, cap: int) -> torch.Tensor:
    """[T, E] the chosen tokens each expert keeps under random token selection: the `cap` of
    highest random score (DeepSpeed's topk over mask · uniform)."""
    T = mask_TE.shape[0]
    score_TE = mask_TE.to(uniform_T.dtype) * (uniform_T[:, None] + 1.0)  # unchosen: 0
    order_TE = score_TE.argsort(dim=0, descending=True, stable=True)
    rank_TE = torch.empty_like(order_TE).scatter_(
        0, order_TE, torch.arange(T, device=mask_TE.device)[:, None].expand_as(order_TE))
    return mask_TE * (rank_TE < cap)


def gate(logits_TE: torch.Tensor, top_k: int, cap: int, valid_T: torch.Tensor | None = None,
         reduce_stats: Callable[[torch.Tensor], torch.Tensor] | None = None,
         with_aux: bool = True, noise: Noise | None = None,
         renormalize: bool = True) -> Routing:
    """Route tokens; `valid_T` marks real tokens (padding never takes a slot or counts).
    `with_aux=False` (inference) skips the aux loss's statistics and their reduction. Top-k
    above 2 takes each next choice with the earlier ones masked (DeepSpeed's topkgating);
    `renormalize=False` keeps the chosen experts' raw probabilities as weights."""
    T, E = logits_TE.shape
    logits_TE = logits_TE.float()
    probs_TE = F.softmax(logits_TE, dim=-1)
    noisy = logits_TE + noise.gumbel_TE if noise is not None and noise.gumbel_TE is not None \
        else None
    first_T = (noisy if noise is not None and noise.rsample else probs_TE).argmax(dim=-1)
    experts = [first_T]
    if top_k == 2:
        second_from = noisy if noise is not None and noise.second else logits_TE
        experts.append(second_from.masked_fill(one_hot(first_T, E).bool(), float("-inf"))
                       .argmax(-1))
    elif top_k > 2:
        taken_TE = one_hot(first_T, E).bool()
        for _ in range(top_k - 1):
            nxt = logits_TE.masked_fill(taken_TE, float("-inf")).argmax(-1)
            experts.append(nxt)
            taken_TE = taken_TE | one_hot(nxt, E).bool()
    # one-hot masks of real tokens (padding rows all zero; no mask work when there is none)
    masks = [one_hot(e, E) if valid_T is None else one_hot(e, E) * valid_T[:, None]
             for e in experts]
    aux = (aux_loss(probs_TE, masks[0], valid_T, reduce_stats) if with_aux
           else probs_TE.new_zeros(()))
    if noise is not None and noise.rts and top_k == 1:
        kept_TE = _random_keep(masks[0], noise.uniform_T, cap)
        # the kept tokens take slots in token order; a dropped one is past the capacity
        slot_T = (torch.cumsum(kept_TE, dim=0) - 1).gather(1, first_T[:, None])[:, 0]
        kept_T = kept_TE.gather(1, first_T[:, None])[:, 0].bool()
        slot_TK = torch.where(kept_T, slot_T, cap)[:, None]
    else:
        offset = torch.zeros(E, dtype=torch.long, device=logits_TE.device)
        slots = []
        for e, mask_TE in zip(experts, masks):
            loc_TE = torch.cumsum(mask_TE, dim=0) - 1 + offset  # position in token order
            offset = offset + mask_TE.sum(0)
            slots.append(loc_TE.gather(1, e[:, None])[:, 0])
        slot_TK = torch.stack(slots, dim=1)
    expert_TK = torch.stack(experts, dim=1)
    keep_TK = slot_TK < cap if valid_T is None else (slot_TK < cap) & valid_T[:, None]
    weight_TK = combine_weights(probs_TE.gather(1, expert_TK) * keep_TK, renormalize)
    return Routing(expert_TK, slot_TK, keep_TK, weight_TK, cap, aux, *counts(keep_TK, valid_T),
                   valid_T)


def combine_weights(weight_TK: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The kept choices' probabilities, renormalised over a token's choices where top-k > 1
    and `renormalize` (dropped choices weigh 0 and take no share)."""
    if weight_TK.shape[1] > 1 and renormalize:
        return weight_TK / weight_TK.sum(-1, keepdim=True).clamp(
            min=torch.finfo(weight_TK.dtype).eps)
    return weight_TK


def slot_positions(r: Routing) -> torch.Tensor:
    """[T, K] position of each choice in the flattened [E·C] buffer (dropped: clamped to 0)."""
    return torch.where(r.keep_TK, r.expert_TK * r.capacity + r.slot_TK, 0)


def dispatch(x_TH: torch.Tensor, r: Routing, experts: int) -> torch.Tensor:
    """Gather tokens into the expert-major buffer [E, C, H] (empty slots are zero).

    The routing table is inverted into a source token per slot (T, a zero row, for empty slots)
    so the buffer is one indexed gather of O(E·C·H) = O(k·cf·T·H); its backward is one
    index-add into the token gradients."""
    T, H = x_TH.shape
    rows = experts * r.capacity
    # dropped choices write to one extra slot past the buffer: static shapes, no host read
    src = torch.full((rows + 1,), T, dtype=torch.long, device=x_TH.device)
    tok = torch.arange(T, device=x_TH.device)[:, None].expand_as(r.keep_TK)
    dest = torch.where(r.keep_TK, r.expert_TK * r.capacity + r.slot_TK, rows)
    src.scatter_(0, dest.reshape(-1), tok.reshape(-1))
    padded = torch.cat([x_TH, x_TH.new_zeros(1, H)])
    return padded.index_select(0, src[:rows]).view(experts, r.capacity, H)


def combine(y_ECH: torch.Tensor, r: Routing) -> torch.Tensor:
    """Weighted sum of each token's expert outputs (top-2: of two), O(T·K·H): one gather of
    the rows the token's choices occupy; dropped choices carry weight 0."""
    E, C, H = y_ECH.shape
    pos = slot_positions(r)
    K = pos.shape[1]
    rows = y_ECH.reshape(E * C, H).index_select(0, pos.reshape(-1)).view(r.tokens, K, H)
    w = r.weight_TK.to(y_ECH.dtype)
    if rows.shape[1] == 1:
        return rows[:, 0] * w
    if rows.shape[1] == 2:
        return rows[:, 0] * w[:, :1] + rows[:, 1] * w[:, 1:]
    return (rows * w[:, :, None]).sum(1)
