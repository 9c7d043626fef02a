"""Triton kernels for top-k gating, dispatch and combine, with the semantics of `gating.py`.

Legend: T tokens, E experts, K choices per token, C capacity, H hidden.

  _softmax_topk   one program per block of tokens: fp32 softmax of the router logits, the first
                  choice (argmax of the probabilities) and each next one up to K = 8 (argmax of
                  the logits with the earlier choices masked) — ties to the lowest index, as
                  torch.argmax
  _slots          one program per expert: a prefix scan over the tokens in order (every first
                  choice, then every second choice, ...), giving each choice its slot in the
                  expert's buffer and the expert's first-choice count for the aux loss — O(K·T)
                  per expert, no one-hot
  _gate_infer     inference, one launch for the whole routing table: one program per expert
                  recomputes the softmax and top-k of every token block (O(K²·T·E) each — small
                  for a decode step) and scans its own expert's choices, writing each choice's
                  slot, keep flag and weight (every choice is its expert's, so no two programs
                  write one entry); no probabilities kept, no aux loss, nothing read back
  _expert_linear  inference's grouped expert GEMM, [L, R, K]·[L, K, N] (+ bias, GELU optional;
                  gated experts take three: silu(x·w1)·(x·w3), then ·w2),
                  one program per (expert, row block, column block); an expert whose rows are
                  all empty (a device flag, no host read) writes zeros without reading its
                  weights — a decode step reads only the experts its tokens chose
  _scatter_rows   row (t, k) -> buffer row expert·C + slot, scaled: dispatch (scale 1) and the
                  backward of combine (scale = combine weight)
  _gather_rows    token row t <- Σ_k scale_tk · buffer row of (t, k): combine (scale = weight)
                  and the backward of dispatch (scale = keep)
Every token row is read or written K times and no buffer row twice: O(T·K·H), no atomics. The
dense table (expert, slot, keep, weight per choice) is `gating.Routing`, as in the reference.
Backward: softmax by its Jacobian-vector product; the weights and aux loss are torch expressions
of the probabilities, so autograd differentiates them exactly as in the reference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeplan.runtime import gating
from moeplan.runtime.gating import Routing


@triton.jit
def _first(p, cols, cmask):
    """Each row's first choice, by the probabilities, and the mask of the columns taken."""
    choice = tl.argmax(tl.where(cmask[None, :], p, -1.0), 1)
    return choice, cols[None, :] == choice[:, None]


@triton.jit
def _next(x, taken, cols):
    """Each row's next choice, by the logits with the earlier choices masked (`gating.gate`)."""
    choice = tl.argmax(tl.where(taken, float("-inf"), x), 1)
    return choice, taken | (cols[None, :] == choice[:, None])


@triton.jit
def _choose(x, p, cols, cmask, UPTO: tl.constexpr):
    """Choice number UPTO (0-based) of each row."""
    choice, taken = _first(p, cols, cmask)
    for _ in tl.static_range(UPTO):
        choice, taken = _next(x, taken, cols)
    return choice


@triton.jit
def _probs(logits_ptr, rows, cols, T, E):
    """Router logits of a block of tokens (finite on rows past T) and their fp32 softmax."""
    rmask, cmask = rows < T, cols < E
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=m2, other=float("-inf"))
    x = tl.where(rmask[:, None], x, 0.0)  # rows past T: finite, never stored
    ex = tl.where(m2, tl.exp(x - tl.max(x, 1)[:, None]), 0.0)
    return x, ex / tl.maximum(tl.sum(ex, 1), 1e-30)[:, None]


@triton.jit
def _softmax_topk(logits_ptr, probs_ptr, choice_ptr, T, E,
                  K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask, cmask = rows < T, cols < E
    x, p = _probs(logits_ptr, rows, cols, T, E)
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p,
             mask=rmask[:, None] & cmask[None, :])
    choice, taken = _first(p, cols, cmask)
    tl.store(choice_ptr + rows * K, choice, mask=rmask)
    for k in tl.static_range(1, K):
        choice, taken = _next(x, taken, cols)
        tl.store(choice_ptr + rows * K + k, choice, mask=rmask)


@triton.jit
def _slots(choice_ptr, valid_ptr, slot_ptr, counts_ptr, T,
           K: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    running = tl.zeros((), dtype=tl.int32)
    for k in tl.static_range(K):  # every first choice before every second choice, ...
        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < T
            ids = tl.load(choice_ptr + offs * K + k, mask=m, other=-1)
            ok = tl.load(valid_ptr + offs, mask=m, other=0)
            hit = ((ids == e) & (ok != 0)).to(tl.int32)
            c = tl.cumsum(hit, 0)
            tl.store(slot_ptr + offs * K + k, running + c - 1, mask=m & (hit != 0))
            running += tl.sum(hit, 0)
        if k == 0:
            tl.store(counts_ptr + e, running)


@triton.jit
def _gate_infer(logits_ptr, valid_ptr, expert_ptr, slot_ptr, keep_ptr, weight_ptr, T, E, cap,
                K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    e = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    running = tl.zeros((), dtype=tl.int32)
    for k in tl.static_range(K):  # every first choice before every second choice, ...
        for start in range(0, T, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            rmask = rows < T
            x, p = _probs(logits_ptr, rows, cols, T, E)
            choice = _choose(x, p, cols, cols < E, k)
            ok = (tl.load(valid_ptr + rows, mask=rmask, other=0) != 0) & rmask
            if e == 0:
                tl.store(expert_ptr + rows * K + k, choice, mask=rmask)
            hit = (choice == e) & ok
            slot = running + tl.cumsum(hit.to(tl.int32), 0) - 1
            keep = hit & (slot < cap)
            w = tl.sum(tl.where(cols[None, :] == e, p, 0.0), 1)
            out = rows * K + k
            tl.store(slot_ptr + out, slot, mask=hit)
            tl.store(keep_ptr + out, keep.to(tl.int8), mask=(choice == e) & rmask)
            tl.store(weight_ptr + out, tl.where(keep, w, 0.0), mask=(choice == e) & rmask)
            running += tl.sum(hit.to(tl.int32), 0)


@triton.jit
def _expert_linear(x_ptr, w_ptr, b_ptr, flag_ptr, out_ptr, R, K, N,
                   GELU: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)  # e·R·K passes 2^31 elements at large sizes
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    if tl.load(flag_ptr + e) != 0:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + e * R * K + rows[:, None] * K + ks[None, :],
                        mask=(rows < R)[:, None] & (ks < K)[None, :], other=0.0)
            w = tl.load(w_ptr + e * K * N + ks[:, None] * N + cols[None, :],
                        mask=(ks < K)[:, None] & (cols < N)[None, :], other=0.0)
            acc += tl.dot(a.to(w.dtype), w, input_precision=PRECISION)
        if HAS_B:
            acc += tl.load(b_ptr + e * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GELU:  # exact (erf) GELU, as F.gelu
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    tl.store(out_ptr + e * R * N + rows[:, None] * N + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(rows < R)[:, None] & (cols < N)[None, :])


def _grouped_linear(x_LRK, w_LKN, b_LN, flag_L, gelu: bool = False) -> torch.Tensor:
    """[L, R, K]·[L, K, N] (+ bias unless None, GELU optional), skipping unflagged experts."""
    L, R, K = x_LRK.shape
    N = w_LKN.shape[2]
    out = x_LRK.new_empty(L, R, N)
    if L and R:
        br, bn, bk = (max(16, _block(n, 64)) for n in (R, N, K))
        w = w_LKN.contiguous()
        _expert_linear[(L, triton.cdiv(R, br), triton.cdiv(N, bn))](
            x_LRK.contiguous(), w, w if b_LN is None else b_LN.contiguous(), flag_L, out, R, K,
            N, GELU=gelu, HAS_B=b_LN is not None, BLOCK_R=br, BLOCK_N=bn, BLOCK_K=bk,
            # fp32 experts in full fp32, as torch's matmuls (Triton's default would be TF32)
            PRECISION="ieee" if w.dtype == torch.float32 else None)
    return out


def ffn_grouped_skip(x_PLCH: torch.Tensor, w1, b1, w2, b2, add_b2: bool, w3=None,
                     b3=None) -> torch.Tensor:
    """`ffn_grouped` for inference: an expert that received no token (all its rows zero, as
    dispatch leaves empty slots) reads no weight and outputs zeros — rows no combine reads.
    Gated experts (`w3`): silu(x·w1)·(x·w3), zero where skipped."""
    P, L, C, H = x_PLCH.shape
    x = x_PLCH.transpose(0, 1).reshape(L, P * C, H)
    flag_L = x.ne(0).flatten(1).any(1).to(torch.int8)  # on the device: no host read
    if w3 is None:
        inner = _grouped_linear(x, w1, b1, flag_L, gelu=True)
    else:
        inner = F.silu(_grouped_linear(x, w1, b1, flag_L)) * _grouped_linear(x, w3, b3, flag_L)
    y = _grouped_linear(inner, w2, b2 if add_b2 else None, flag_L)
    return y.view(L, P, C, H).transpose(0, 1)


@triton.jit
def _scatter_rows(src_ptr, pos_ptr, keep_ptr, scale_ptr, out_ptr, H,
                  K: tl.constexpr, BLOCK_H: tl.constexpr):
    tk = tl.program_id(0).to(tl.int64)  # (tk // K)·H passes 2^31 in a long prefill
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if tl.load(keep_ptr + tk) != 0:
        pos = tl.load(pos_ptr + tk)
        w = tl.load(scale_ptr + tk)
        v = tl.load(src_ptr + (tk // K) * H + cols, mask=cols < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + pos * H + cols, (v * w).to(out_ptr.dtype.element_ty), mask=cols < H)


@triton.jit
def _gather_rows(src_ptr, pos_ptr, keep_ptr, scale_ptr, out_ptr, H,
                 K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K):
        if tl.load(keep_ptr + t * K + k) != 0:
            pos = tl.load(pos_ptr + t * K + k)
            w = tl.load(scale_ptr + t * K + k)
            acc += w * tl.load(src_ptr + pos * H + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


def _block(n: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor, top_k: int):
        T, E = logits_TE.shape
        logits_TE = logits_TE.contiguous()
        probs = torch.empty_like(logits_TE)
        choice = torch.zeros(T, top_k, dtype=torch.int64, device=logits_TE.device)
        if T:
            bt = 16
            _softmax_topk[(triton.cdiv(T, bt),)](logits_TE, probs, choice, T, E, K=top_k,
                                                  BLOCK_T=bt, BLOCK_E=_block(E, 1 << 16))
        ctx.save_for_backward(probs)
        ctx.mark_non_differentiable(choice)
        return probs, choice

    @staticmethod
    def backward(ctx, g_probs, _g_choice):
        (p,) = ctx.saved_tensors
        return p * (g_probs - (g_probs * p).sum(-1, keepdim=True)), None


def gate_infer(logits_TE: torch.Tensor, top_k: int, cap: int,
               valid_T: torch.Tensor | None = None, renormalize: bool = True) -> Routing:
    """`gating.gate` for inference (no gradients, no aux loss) in one kernel launch."""
    T, E = logits_TE.shape
    dev = logits_TE.device
    valid = torch.ones(T, dtype=torch.bool, device=dev) if valid_T is None else valid_T
    expert = torch.zeros(T, top_k, dtype=torch.int64, device=dev)
    slot = torch.zeros(T, top_k, dtype=torch.int64, device=dev)
    keep = torch.zeros(T, top_k, dtype=torch.int8, device=dev)
    weight = torch.zeros(T, top_k, dtype=torch.float32, device=dev)
    if T:
        _gate_infer[(E,)](logits_TE.float().contiguous(), valid.to(torch.int8), expert, slot,
                          keep, weight, T, E, cap, K=top_k, BLOCK_T=_block(T, 64),
                          BLOCK_E=_block(E, 1 << 16))
    keep_TK = keep.bool()
    return Routing(expert, slot, keep_TK, gating.combine_weights(weight, renormalize), cap,
                   weight.new_zeros(()), *gating.counts(keep_TK, valid_T), valid_T)


def gate(logits_TE: torch.Tensor, top_k: int, cap: int, valid_T: torch.Tensor | None = None,
         reduce_stats: Callable[[torch.Tensor], torch.Tensor] | None = None,
         with_aux: bool = True, noise: gating.Noise | None = None,
         renormalize: bool = True) -> Routing:
    """`gating.gate` with the softmax, top-k (k <= 8) and capacity scan in Triton; without
    gradients or aux loss (inference), the whole table in one launch (`gate_infer`). A training
    call with random token selection or sampled choices (`noise`) runs the torch reference: the
    scan keeps tokens in order and picks by argmax only."""
    if noise is not None:
        return gating.gate(logits_TE, top_k, cap, valid_T, reduce_stats, with_aux, noise,
                           renormalize)
    if not with_aux and not (torch.is_grad_enabled() and logits_TE.requires_grad):
        return gate_infer(logits_TE, top_k, cap, valid_T, renormalize)
    T, E = logits_TE.shape
    dev = logits_TE.device
    probs_TE, expert_TK = _SoftmaxTopK.apply(logits_TE.float(), top_k)
    valid = torch.ones(T, dtype=torch.bool, device=dev) if valid_T is None else valid_T
    slot_TK = torch.zeros(T, top_k, dtype=torch.int32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    _slots[(E,)](expert_TK, valid.to(torch.int8), slot_TK, counts, T, K=top_k,
                 BLOCK=_block(T))
    aux = (_aux_loss(probs_TE, counts, valid, reduce_stats) if with_aux
           else probs_TE.new_zeros(()))
    slot_TK = slot_TK.long()
    keep_TK = (slot_TK < cap) & valid[:, None]
    weight_TK = gating.combine_weights(probs_TE.gather(1, expert_TK) * keep_TK, renormalize)
    return Routing(expert_TK, slot_TK, keep_TK, weight_TK, cap, aux,
                   *gating.counts(keep_TK, valid_T), valid_T)


def _aux_loss(probs_TE, counts_E, valid_T, reduce_stats) -> torch.Tensor:
    """`gating.aux_loss` from the scan's first-choice counts instead of a one-hot mask."""
    E = probs_TE.shape[1]
    n_valid = valid_T.sum().to(probs_TE.dtype)
    stats = torch.cat([(probs_TE * valid_T[:, None]).sum(0), counts_E.to(probs_TE.dtype),
                       n_valid.reshape(1)])
    if reduce_stats is not None:
        stats = reduce_stats(stats)
    me, ce, count = stats[:E], stats[E:2 * E], stats[-1].clamp(min=1)
    return E * torch.sum((me / count) * (ce / count))


def _positions(r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    pos = (r.expert_TK * r.capacity + r.slot_TK).reshape(-1).contiguous()
    return pos, r.keep_TK.reshape(-1).to(torch.int8).contiguous()


def _scatter(src_TH, pos, keep, scale, rows: int, K: int) -> torch.Tensor:
    H = src_TH.shape[1]
    out = src_TH.new_zeros(rows, H)
    if pos.numel():
        bh = _block(H, 256)
        _scatter_rows[(pos.numel(), triton.cdiv(H, bh))](src_TH.contiguous(), pos, keep,
                                                         scale.contiguous(), out, H, K=K,
                                                         BLOCK_H=bh)
    return out


def _gather(src_RH, pos, keep, scale, tokens: int, K: int) -> torch.Tensor:
    H = src_RH.shape[1]
    out = src_RH.new_empty(tokens, H)
    if tokens:
        bh = _block(H, 256)
        _gather_rows[(tokens, triton.cdiv(H, bh))](src_RH.contiguous(), pos, keep,
                                                  scale.contiguous(), out, H, K=K, BLOCK_H=bh)
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, pos, keep, rows: int, K: int):
        ones = torch.ones(pos.numel(), dtype=torch.float32, device=x_TH.device)
        ctx.save_for_backward(pos, keep, ones)
        ctx.K, ctx.T = K, x_TH.shape[0]
        return _scatter(x_TH, pos, keep, ones, rows, K)

    @staticmethod
    def backward(ctx, g_RH):
        pos, keep, ones = ctx.saved_tensors
        return _gather(g_RH, pos, keep, ones, ctx.T, ctx.K), None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RH, weight, pos, keep, tokens: int, K: int):
        w = weight.reshape(-1).float().contiguous()
        ctx.save_for_backward(y_RH, w, pos, keep)
        ctx.K, ctx.tokens = K, tokens
        return _gather(y_RH, pos, keep, w, tokens, K)

    @staticmethod
    def backward(ctx, g_TH):
        y_RH, w, pos, keep = ctx.saved_tensors
        g_y = _scatter(g_TH, pos, keep, w, y_RH.shape[0], ctx.K)
        rows = y_RH.index_select(0, torch.where(keep.bool(), pos, 0)).float()
        g_TH_k = g_TH.float().repeat_interleave(ctx.K, dim=0)
        g_w = ((rows * g_TH_k).sum(-1) * keep).view(ctx.tokens, ctx.K)
        return g_y, g_w, None, None, None, None


def dispatch(x_TH: torch.Tensor, r: Routing, experts: int) -> torch.Tensor:
    pos, keep = _positions(r)
    buf = _Dispatch.apply(x_TH, pos, keep, experts * r.capacity, r.expert_TK.shape[1])
    return buf.view(experts, r.capacity, x_TH.shape[1])


def combine(y_ECH: torch.Tensor, r: Routing) -> torch.Tensor:
    E, C, H = y_ECH.shape
    pos, keep = _positions(r)
    return _Combine.apply(y_ECH.reshape(E * C, H), r.weight_TK, pos, keep, r.tokens,
                          r.expert_TK.shape[1])
