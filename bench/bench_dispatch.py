"""Dispatch + combine time as the number of experts grows, at a fixed number of tokens.

Compares moeplan's index-based dispatch/combine (gating.dispatch / gating.combine: O(S·k·M) data
movement plus zero-filling the [E, C, M] buffer the experts need anyway) with the one-hot einsum
formulation of GShard and of the gating DeepSpeed-MoE's kernels replaced (a dense [S, E, C] combine
tensor: O(S·E·C·M); recent DeepSpeed releases gather sparsely instead — bench_moe_layer.py
compares with the installed DeepSpeed itself),
forward and forward+backward, on this machine's CPU, in two sweeps:
  capacity factor   C = k·cf·S/E shrinks as E grows, so E·C is constant (training)
  fixed capacity    C held (min_capacity / small decode batches), so E·C grows with E
Prints JSON; no assertions.

    python bench/bench_dispatch.py [--tokens 4096] [--hidden 256] [--experts 8 16 32 64 128]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from statistics import median

import torch
import torch.nn.functional as F

from moeplan.runtime import gating


def einsum_dispatch_combine(x_SM: torch.Tensor, r: gating.Routing, E: int) -> torch.Tensor:
    """The one-hot formulation: build combine_weights[S, E, C], dispatch and combine by einsum."""
    S, C = x_SM.shape[0], r.capacity
    cw_SEC = x_SM.new_zeros(S, E, C)
    for k in range(r.expert_TK.shape[1]):
        e, c, keep = r.expert_TK[:, k], r.slot_TK[:, k], r.keep_TK[:, k]
        onehot = F.one_hot(e, E)[:, :, None] * F.one_hot(c.clamp(max=C - 1), C)[:, None, :]
        cw_SEC = cw_SEC + onehot * (r.weight_TK[:, k] * keep)[:, None, None]
    mask_SEC = (cw_SEC > 0).to(x_SM.dtype)
    buf_ECM = torch.einsum("sec,sm->ecm", mask_SEC, x_SM)
    return torch.einsum("sec,ecm->sm", cw_SEC, buf_ECM)


def ours(x_SM: torch.Tensor, r: gating.Routing, E: int) -> torch.Tensor:
    return gating.combine(gating.dispatch(x_SM, r, E), r)


def timed(fn, x, r, E, backward: bool, reps: int) -> float:
    times = []
    for i in range(reps + 2):
        xi = x.detach().requires_grad_(backward)
        t0 = time.perf_counter()
        y = fn(xi, r, E)
        if backward:
            y.sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--top-k", type=int, default=1, choices=[1, 2])
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--fixed-capacity", type=int, default=32,
                   help="capacity per expert of the second sweep (0: skip it)")
    p.add_argument("--fixed-tokens", type=int, default=2048, help="tokens of the second sweep")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sweeps = {"capacity_factor": sweep(a, a.tokens, None)}
    if a.fixed_capacity:
        sweeps["fixed_capacity"] = sweep(a, a.fixed_tokens, a.fixed_capacity)
    print(json.dumps({"bench": "dispatch_combine", "hidden": a.hidden, "top_k": a.top_k,
                      "capacity_factor": a.capacity_factor, "threads": a.threads,
                      "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                      "sweeps": sweeps}, indent=2))


def sweep(a, tokens: int, fixed_capacity: int | None) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, a.hidden)
    rows = []
    for E in a.experts:
        logits = torch.randn(tokens, E)
        cap = fixed_capacity or max(math.ceil(a.top_k * a.capacity_factor * tokens / E), 4)
        r = gating.gate(logits, a.top_k, cap)
        want = einsum_dispatch_combine(x, r, E)
        # the einsums sum over S·C (dispatch) and E·C (combine) one-hot products: fp32 rounding of
        # that chain (two orders: 2·n·u), times the values' magnitude
        n = tokens * cap + E * cap
        atol = 2 * n * torch.finfo(x.dtype).eps / 2 * float(want.abs().max())
        same = torch.allclose(ours(x, r, E), want, rtol=0.0, atol=atol)
        row = {"experts": E, "capacity": cap, "results_equal": same}
        for name, fn in (("ours", ours), ("einsum", einsum_dispatch_combine)):
            row[f"{name}_fwd_ms"] = round(timed(fn, x, r, E, False, a.reps) * 1e3, 3)
            row[f"{name}_fwd_bwd_ms"] = round(timed(fn, x, r, E, True, a.reps) * 1e3, 3)
        row["einsum_over_ours_fwd_bwd"] = round(row["einsum_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"], 1)
        rows.append(row)
    first, last = rows[0], rows[-1]
    out = {"tokens": tokens, "rows": rows}
    for name in ("ours", "einsum"):
        out[f"{name}_growth_E{first['experts']}_to_E{last['experts']}"] = round(
            last[f"{name}_fwd_bwd_ms"] / first[f"{name}_fwd_bwd_ms"], 2)
    return out


if __name__ == "__main__":
    main()
