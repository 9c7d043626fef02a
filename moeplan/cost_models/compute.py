"""Compute time: a roofline with a size-dependent GEMM efficiency.

gemm_s: 2·m·n·k FLOPs at peak · efficiency(2mnk), the efficiency curve of the device profile
(saturating: small GEMMs are launch- and tile-bound). memory_s: bytes over achievable HBM bandwidth.
A phase takes max(compute, memory) — decode is memory-bound because the weights it touches are
read once for a handful of tokens — plus a fixed per-operation overhead.
"""

from __future__ import annotations

from moeplan.spec.cluster import Device, EfficiencyCurve


def gemm_efficiency(flops: float, curve: EfficiencyCurve) -> float:
    return curve.max_efficiency * flops / (flops + curve.half_flops)


def gemm_floor_s(device: Device) -> float:
    """The efficiency curve's intercept as a time: half_flops at the device's fastest peak.
    A small GEMM's floor (tile and wave latency) is a time that does not depend on the dtype —
    an fp32 router GEMM is no more latency-bound than an fp16 one of the same shape."""
    curve = device.gemm_efficiency
    return curve.half_flops / (max(device.peak_flops.values()) * curve.max_efficiency)


def gemm_s(m: float, n: float, k: float, device: Device, dtype: str) -> float:
    """Time of an (m×k)·(k×n) matrix product: its FLOPs at the dtype's peak × the curve's
    largest efficiency, plus the curve's floor. For the device's fastest dtype this is exactly
    flops / (peak · efficiency(flops))."""
    flops = 2.0 * m * n * k
    if flops <= 0:
        return 0.0
    curve = device.gemm_efficiency
    return flops / (device.peak_flops[dtype] * curve.max_efficiency) + gemm_floor_s(device)


def memory_s(nbytes: float, device: Device) -> float:
    return nbytes / (device.hbm_Bps * device.hbm_efficiency)


def roofline_s(compute_s: float, nbytes: float, device: Device, fixed_s: float) -> float:
    """A phase bound by compute or by bytes moved, plus its fixed framework seconds."""
    return max(compute_s, memory_s(nbytes, device)) + fixed_s
