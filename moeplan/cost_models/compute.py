"""Compute time: a roofline with a size-dependent GEMM efficiency.

gemm_s: 2·m·n·k FLOPs at peak · efficiency(2mnk), the efficiency curve of the device profile
(saturating: small GEMMs are launch- and tile-bound). memory_s: bytes over achievable HBM bandwidth.
A phase takes max(compute, memory) — decode is memory-bound because the weights it touches are
read once for a handful of tokens — plus a fixed per-operation overhead.
"""

from __future__ import annotations

from moeplan.profiles.cluster import Device, EfficiencyCurve


def gemm_efficiency(flops: float, curve: EfficiencyCurve) -> float:
    return curve.max_efficiency * flops / (flops + curve.half_flops)


def gemm_s(m: float, n: float, k: float, device: Device, dtype: str) -> float:
    """Time of an (m×k)·(k×n) matrix product."""
    flops = 2.0 * m * n * k
    if flops <= 0:
        return 0.0
    return flops / (device.peak_flops[dtype] * gemm_efficiency(flops, device.gemm_efficiency))


def memory_s(nbytes: float, device: Device) -> float:
    return nbytes / (device.hbm_Bps * device.hbm_efficiency)


def roofline_s(compute_s: float, nbytes: float, device: Device, fixed_s: float) -> float:
    """A phase bound by compute or by bytes moved, plus its fixed framework seconds."""
    return max(compute_s, memory_s(nbytes, device)) + fixed_s
