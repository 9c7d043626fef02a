"""On a CUDA machine: Triton gating/dispatch/combine vs the torch reference vs one-hot einsum, and
the whole MoE layer (Triton kernels + grouped expert GEMM) vs the reference kernels.

    python bench/bench_kernels_gpu.py [--tokens 8192] [--hidden 1024] [--experts 8 16 32 64 128]

Times are CUDA-event medians of forward+backward after warm-up. Prints JSON; without CUDA (or
without triton) it prints why and exits 0 — it never reports a figure it did not measure. The MoE
layer against DeepSpeed's is `bench/bench_moe_layer.py` (CPU/gloo) — on GPUs run it with
DS_ACCELERATOR=cuda and NCCL instead.
"""

from __future__ import annotations

import argparse
import json
from statistics import median

import torch


def cuda_time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    from moeplan.runtime.kernels import REFERENCE, triton_available, triton_kernels

    if not torch.cuda.is_available() or not triton_available():
        print(json.dumps({"bench": "kernels_gpu", "skipped": True,
                          "reason": "needs CUDA and triton; this machine has "
                                    f"cuda={torch.cuda.is_available()}, "
                                    f"triton={triton_available()}"}))
        return
    from bench_dispatch import einsum_dispatch_combine  # the same one-hot baseline as on CPU

    dev = torch.device("cuda")
    TRITON = triton_kernels()
    rows = []
    for E in a.experts:
        cap = max(4, a.top_k * a.tokens // E)
        x = torch.randn(a.tokens, a.hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
        logits = torch.randn(a.tokens, E, device=dev, requires_grad=True)
        row = {"experts": E, "capacity": cap}
        for impl in (REFERENCE, TRITON):
            def step(impl=impl):
                r = impl.gate(logits, a.top_k, cap)
                out = impl.combine(impl.dispatch(x, r, E), r)
                (out.float().sum() + r.aux_loss).backward()
            row[f"{impl.name}_ms"] = cuda_time(step, a.reps) * 1e3

        def einsum_step():
            r = REFERENCE.gate(logits, a.top_k, cap)
            einsum_dispatch_combine(x.float(), r, E).sum().backward()
        row["einsum_ms"] = cuda_time(einsum_step, a.reps) * 1e3
        row["reference_over_triton"] = row["torch_ms"] / row["triton_ms"]
        row["einsum_over_triton"] = row["einsum_ms"] / row["triton_ms"]
        rows.append(row)
    print(json.dumps({"bench": "kernels_gpu", "device": torch.cuda.get_device_name(),
                      "tokens": a.tokens, "hidden": a.hidden, "top_k": a.top_k, "rows": rows},
                     indent=2))


if __name__ == "__main__":
    main()
