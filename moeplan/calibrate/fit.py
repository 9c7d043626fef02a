"""Fits of microbenchmark measurements to the cost model's parameters (scipy; no torch).

Every model here is linear in its parameters once written as the time of one operation:
  alpha-beta (a link tier)   t = steps · latency + volume / bandwidth
  GEMM efficiency curve      t = flops / (peak · e_max) + half / (peak · e_max)
                             (gemm_s with efficiency e_max · flops / (flops + half))
  memory bandwidth           t = overhead + bytes / bandwidth
so each is a non-negative least-squares problem (scipy.optimize.nnls) on the per-size medians.
Repeats are reduced to a median after dropping outliers (beyond 3 scaled MADs), and the fit's
coefficient of determination r² is returned with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

import numpy as np
from scipy.optimize import nnls


def robust_median(samples: list[float]) -> float:
    """Median after dropping samples more than 3 scaled MADs from the median."""
    if not samples:
        raise ValueError("no samples")
    m = median(samples)
    mad = 1.4826 * median(abs(s - m) for s in samples)
    kept = [s for s in samples if mad == 0 or abs(s - m) <= 3 * mad]
    return median(kept)


UNRESOLVED_BPS = 1e15


@dataclass(frozen=True)
class LinearFit:
    coef: tuple[float, ...]  # non-negative, one per regressor
    r2: float


def fit_nonneg(columns: list[list[float]], times: list[float]) -> LinearFit:
    """times ≈ Σ coef_j · columns_j with coef >= 0, weighted relative to each time (so small
    messages count as much as large ones)."""
    A = np.array(columns, dtype=float).T
    y = np.array(times, dtype=float)
    if len(y) < A.shape[1]:
        raise ValueError(f"{len(y)} measurements cannot fit {A.shape[1]} parameters")
    w = 1.0 / np.maximum(y, 1e-12)
    coef, _ = nnls(A * w[:, None], y * w)
    pred = A @ coef
    ss_res = float(np.sum(((y - pred) * w) ** 2))
    ss_tot = float(np.sum(((y - np.average(y, weights=w ** 2)) * w) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LinearFit(coef=tuple(float(c) for c in coef), r2=r2)


def fit_alpha_beta(steps: list[float], volumes: list[float], times: list[float]
                   ) -> tuple[float, float, float]:
    """(latency_s per step, bandwidth_Bps, r²) from t = steps·latency + volume/bandwidth."""
    f = fit_nonneg([steps, volumes], times)
    latency, inv_bw = f.coef
    # no measurable bandwidth term (latency-bound at every size): a bandwidth far above any link
    bandwidth = 1.0 / inv_bw if inv_bw > 0 else UNRESOLVED_BPS
    return latency, bandwidth, f.r2


# assumed: a sweep whose largest size spends under 5% of its time in the size-dependent part
# (launch- or overhead-bound throughout) resolves no rate; NNLS would return a vanishing slope
RESOLVED_SHARE = 0.05


def _grows(slope: float, sizes: list[float], times: list[float]) -> bool:
    i = max(range(len(sizes)), key=lambda j: sizes[j])
    return slope * sizes[i] >= RESOLVED_SHARE * times[i]


def fit_gemm(flops: list[float], times: list[float]) -> tuple[float, float, float]:
    """(achieved peak FLOP/s, half_flops, r²) for an efficiency curve with e_max = 1:
    t = flops / peak + half / peak."""
    f = fit_nonneg([flops, [1.0] * len(flops)], times)
    inv_peak, fixed = f.coef
    if not _grows(inv_peak, flops, times):
        raise ValueError("GEMM times do not grow with size; cannot fit a throughput")
    return 1.0 / inv_peak, fixed / inv_peak, f.r2


def fit_per_item(items: list[float], times: list[float], what: str
                 ) -> tuple[float, float, float]:
    """(seconds per item, per-operation overhead_s, r²) from t = overhead + items·s."""
    f = fit_nonneg([items, [1.0] * len(items)], times)
    per_item, overhead = f.coef
    if not _grows(per_item, items, times):
        raise ValueError(f"{what} times do not grow with size; cannot fit a rate")
    return per_item, overhead, f.r2


def fit_memory(nbytes: list[float], times: list[float]) -> tuple[float, float, float]:
    """(bandwidth_Bps, per-operation overhead_s, r²) from t = overhead + bytes/bandwidth."""
    per_byte, overhead, r2 = fit_per_item(nbytes, times, "copy")
    return 1.0 / per_byte, overhead, r2
