"""MoE gating, dispatch and combine: one interface, two implementations, one selection point.

`REFERENCE` is the torch code in `runtime/gating.py` (what runs on CPU, and the semantics).
`TRITON` (`triton_moe.py`) fuses the same steps into Triton kernels for CUDA; it is also run on CPU
by the tests under `TRITON_INTERPRET=1`. `select(device)` is the only place that chooses;
`use_kernels(model, kernels)` hands the choice to every MoE layer — `forward` has no flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moeplan.runtime import gating


def ffn_loop(x_PLCH: torch.Tensor, w1, b1, w2, b2, add_b2: bool, w3=None,
             b3=None) -> torch.Tensor:
    """The experts' FFNs, one GEMM pair per local expert with the biases folded in, written
    straight into the [P, L, C, H] result. Fastest on CPU: each expert's [P·C, F] intermediate
    stays in cache (one batched GEMM over all experts measured slower). `unbind`, not indexing:
    its backward stacks the pieces instead of zero-filling a whole gradient per expert. Gated
    (`w3`) or bias-free experts: `ffn_grouped`."""
    if w3 is not None or b1 is None:
        return ffn_grouped(x_PLCH, w1, b1, w2, b2, add_b2, w3, b3)
    P, _, C, H = x_PLCH.shape
    out = []
    for x, w1_, b1_, w2_, b2_ in zip(x_PLCH.unbind(1), w1.unbind(0), b1.unbind(0), w2.unbind(0),
                                     b2.unbind(0)):
        h = F.gelu(torch.addmm(b1_, x.reshape(P * C, H), w1_))
        y = torch.addmm(b2_, h, w2_) if add_b2 else h.mm(w2_)
        out.append(y.view(P, C, H))
    return torch.stack(out, dim=1)


def ffn_grouped(x_PLCH: torch.Tensor, w1, b1, w2, b2, add_b2: bool, w3=None,
                b3=None) -> torch.Tensor:
    """The same as one grouped GEMM per matrix: every local expert has the same number of rows
    (the capacity buffer), so a batched matmul is the grouped GEMM — one launch on CUDA. `w3`:
    gated (SwiGLU) experts, silu(x·w1) · (x·w3); a bias of None is none."""
    P, L, C, H = x_PLCH.shape
    x = x_PLCH.transpose(0, 1).reshape(L, P * C, H)

    def linear(w, b):
        return torch.bmm(x, w) if b is None else torch.baddbmm(b[:, None], x, w)

    inner = F.silu(linear(w1, b1)) * linear(w3, b3) if w3 is not None else F.gelu(linear(w1, b1))
    y = (torch.baddbmm(b2[:, None], inner, w2) if add_b2 and b2 is not None
         else torch.bmm(inner, w2))
    return y.view(L, P, C, H).transpose(0, 1)


@dataclass(frozen=True)
class Kernels:
    name: str
    gate: Callable  # (logits_TE, top_k, capacity, valid_T, reduce_stats, with_aux, noise,
    #               renormalize) -> Routing
    dispatch: Callable  # (x_TH, routing, experts) -> buf [E, C, H]
    combine: Callable  # (y_ECH, routing) -> out [T, H]
    ffn: Callable = ffn_loop  # (x_PLCH, w1, b1, w2, b2, add_b2, w3, b3) -> y_PLCH


REFERENCE = Kernels("torch", gating.gate, gating.dispatch, gating.combine)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ffn_triton(x_PLCH: torch.Tensor, w1, b1, w2, b2, add_b2: bool, w3=None,
               b3=None) -> torch.Tensor:
    """Training: the batched GEMMs (`ffn_grouped`, autograd through cuBLAS); inference: the
    Triton grouped GEMM that skips experts without a token (`triton_moe.ffn_grouped_skip`)."""
    if torch.is_grad_enabled() and (x_PLCH.requires_grad or w1.requires_grad):
        return ffn_grouped(x_PLCH, w1, b1, w2, b2, add_b2, w3, b3)
    from moeplan.runtime.kernels import triton_moe

    return triton_moe.ffn_grouped_skip(x_PLCH, w1, b1, w2, b2, add_b2, w3, b3)


def triton_kernels() -> Kernels:
    from moeplan.runtime.kernels import triton_moe

    return Kernels("triton", triton_moe.gate, triton_moe.dispatch, triton_moe.combine,
                   ffn_triton)


def select(device: torch.device) -> Kernels:
    """Triton on CUDA when it is installed; the torch reference everywhere else."""
    if device.type == "cuda" and triton_available():
        return triton_kernels()
    return REFERENCE


def use_kernels(model: torch.nn.Module, kernels: Kernels) -> None:
    for m in model.modules():
        if hasattr(type(m), "kernels"):
            m.kernels = kernels
