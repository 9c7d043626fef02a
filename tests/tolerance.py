"""Tolerances for two floating-point computations of one value, derived from the computation.

A sum of n products computed in floating point differs from the exact sum by at most
γ_n·Σ|terms|, γ_n = n·u / (1 − n·u), u the dtype's unit roundoff (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §3.1). Two implementations that sum in different
orders (another GEMM blocking, another vendor's BLAS, a distributed reduction) are each within
that of the exact value, so within twice it of each other. A chain of dependent reductions — a
forward and its backward through several GEMMs — adds its lengths. The magnitude stands for
Σ|terms|: the largest |value| of the compared tensor (random-signed terms sum to about √n of
their absolute sum while their rounding errors grow as √n·u, so n·u·max|value| covers them).

A real defect (a missing reduction, a wrong slice, a wrong scale) errs by a sizeable fraction of
the magnitude, orders of magnitude above these bounds for the chains the tests use.
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ε/2: the largest relative error of one rounding to nearest."""
    return torch.finfo(dtype).eps / 2


def rounding_atol(dtype: torch.dtype, chain: int, magnitude: float) -> float:
    """Largest difference of two evaluation orders of a reduction chain of total length `chain`."""
    nu = chain * unit_roundoff(dtype)
    assert nu < 0.5, f"a chain of {chain} reductions in {dtype} carries no significant digit"
    return 2 * nu / (1 - nu) * magnitude


def magnitude(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, chain: int,
                 scale: float | None = None) -> None:
    """`actual` == `expected` up to the rounding of a reduction chain of length `chain`;
    the magnitude is `scale` or else the largest |expected|."""
    size = magnitude(expected) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=0.0,
                               atol=rounding_atol(expected.dtype, chain, size))


def gpt_chain(spec, tokens: int, seq: int, ranks: int = 1) -> int:
    """Reduction chain of a loss and its gradients through the GPT of `spec` (longest path).

    Forward, per block: attention's q·k (head size), its softmax·v (sequence), the projections
    (hidden, three: qkv, out, the residual mix's router) and the MLP (hidden, then FFN size); the
    backward runs the same lengths back; the head adds the vocabulary's log-sum-exp and the
    hidden; weight gradients sum over the tokens; a distributed run adds its all-reduce over ranks.
    """
    per_block = spec.hidden // spec.heads + seq + 3 * spec.hidden + spec.hidden + spec.ffn_hidden
    return 2 * spec.num_layers * per_block + spec.vocab_size + spec.hidden + tokens + ranks


# The planner's float64 arithmetic (pure Python, IEEE binary64, sums of at most a few thousand
# terms in another order): n·u ≤ 4096 · 1.1e-16 < 1e-12.
F64_REL = 1e-12
