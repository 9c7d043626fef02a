"""Count the bytes and GEMM FLOPs of DeepSpeed-MoE's gate, dispatch, experts and combine by
running its layer at many sizes, and fit them as a sum of size terms: to check what
`moeplan/cost_models/traffic.py` charges `--runtime deepspeed` / `deepspeed-sparse` for them.

    pip install deepspeed==0.16.4      # in an environment of its own: not a moeplan dependency
    python bench/count_deepspeed_moe_bytes.py [--out bench/results/deepspeed-moe-bytes.json] \
        [--table moeplan/cost_models/data/deepspeed_traffic.json]

The layer is the one bench/count_deepspeed_moe_ops.py counts (one gloo rank, DS_ACCELERATOR=cpu,
random token selection, min capacity 4, dropping tokens; `F.one_hot` as CUDA runs it; experts of
two linear layers with biases and a GELU), counted by bench/op_count.py's mode: an operation's
bytes are its tensor inputs and outputs (a kernel reads and writes each once), GEMMs' apart with
their FLOPs. It runs top-1, top-2 and top-4 over bf16 and fp32 tokens at S tokens (64/128/256),
E experts (4/8/16), width h (16/32), expert FFN f (2h/3h) and capacity factor 1 and 2, so the
capacity C = max(4, ceil(k'·cf·S/E)) (k' = 1, 2, k as `_capacity` is called) moves apart from
S/E; a size DeepSpeed cannot run (top-k capacity above S) is left out. Its Experts module is
also counted alone on the input an all-to-all over 2 ranks leaves (2-8 local experts, 4-16
rows from each rank: "ep2" fits, C = the rows an expert gets). Each phase's forward and
backward figures (and the inference forward's, without random token selection, as DeepSpeed's
inference MoE builds its gate) are fitted by least squares to the terms of `TERMS` (s = S,
e = E, c = C, h, f; sech, seh and echf are GEMM FLOPs): every fit is exact (the largest
residual is printed and recorded; a term outside that basis would show there). `--table` puts
the fits into the cost model's table, under the runtime this DeepSpeed's version is (`deepspeed`
up to 0.19.3, `deepspeed-sparse` from 0.19.4), beside the other runtime's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

from count_deepspeed_moe_ops import _count, _count_experts
from op_count import save_json, start_deepspeed

from moeplan.cost_models.traffic import term

TERMS = ("sech", "seh", "echf", "sec", "se", "sc", "sh", "ech", "ecf", "ehf", "eh", "ef", "s",
         "ec", "e", "h", "f", "1")
SIZES = dict(tokens=(64, 128, 256), experts=(4, 8, 16), hidden=(16, 32), capacity_factor=(1, 2),
             ffn_per_hidden=(2, 3))
MIN_CAPACITY = 4
# the Experts module alone over 2 ranks' rows: local experts, rows from each rank, width, FFN/width
EP2_SIZES = dict(local_experts=(2, 4, 8), rows_per_rank=(4, 8, 16), hidden=(16, 32),
                 ffn_per_hidden=(2, 3))


def capacity(k: int, tokens: int, experts: int, factor: float) -> int:
    """DeepSpeed's `_capacity` as its gates call it (top-2 at twice the factor, top-k at k)."""
    return max(MIN_CAPACITY, math.ceil(tokens / experts * factor * k))


def terms(S: int, E: int, C: int, h: int, f: int) -> list[float]:
    """A point's row of the fit: each of TERMS as the cost model evaluates it."""
    return [term(t, S, E, C, h, f) for t in TERMS]


def fit(rows: list[list[float]], values: list[float]) -> tuple[dict[str, float], float]:
    """Least-squares coefficients of TERMS (rounded to quarters: counts of whole elements
    of whole bytes) and the largest residual of the rounded fit, in bytes."""
    import numpy as np

    A, y = np.array(rows, dtype=float), np.array(values, dtype=float)
    coef = np.round(np.linalg.lstsq(A, y, rcond=None)[0] * 4) / 4
    residual = float(np.max(np.abs(A @ coef - y))) if len(y) else 0.0
    return {t: float(c) for t, c in zip(TERMS, coef) if c}, residual


def fit_into(fits: dict, prefix: str, rows: list[list[float]], values: dict) -> None:
    """Fit each counted series and file it under "PREFIX MODE WAY PHASE WHAT" (printed)."""
    for (mode, way, phase, what), ys in values.items():
        coef, residual = fit(rows, ys)
        key = f"{prefix} {mode} {way} {phase} {what}"
        fits[key] = {"per": coef, "largest_residual": residual}
        shown = " + ".join(f"{c:g}·{t}" for t, c in coef.items()) or "0"
        print(f"{key:45s} {shown}   (residual {residual:g})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the counts and fits as JSON here")
    ap.add_argument("--table", default=None,
                    help="put the fits into this cost-model table (JSON, updated in place)")
    a = ap.parse_args(argv)
    started = start_deepspeed("count_deepspeed_moe_bytes")
    if started is None:
        return 2
    deepspeed, torch = started
    points, fits = [], {}
    for k, dtype in itertools.product((1, 2, 4), ("bfloat16", "float32")):
        rows, values = [], {}
        for S, E, h, cf, m in itertools.product(*SIZES.values()):
            C = capacity(k, S, E, cf)
            if C > S:  # its gates pick each expert's C tokens out of S (torch.topk)
                continue
            got = _count(E, k=k, tokens=S, hidden=h, capacity_factor=cf, dtype=dtype,
                         alone=False, eval_rts=False, ffn=m * h)
            point = {"k": k, "dtype": dtype, "tokens": S, "experts": E, "hidden": h,
                     "ffn": m * h, "capacity_factor": cf, "capacity": C,
                     "train": got["train"]["bytes"], "infer": got["infer"]["bytes"]}
            points.append(point)
            rows.append(terms(S, E, C, h, m * h))
            for mode, ways in (("train", ("forward", "backward")), ("infer", ("forward",))):
                for way in ways:
                    for phase, counted in point[mode][way].items():
                        for what, n in counted.items():
                            values.setdefault((mode, way, phase, what), []).append(n)
        b = torch.finfo(getattr(torch, dtype)).bits // 8
        fit_into(fits, f"top-{k} {b}B", rows, values)
    # the Experts module on the input an all-to-all over 2 ranks leaves: with several local
    # experts each one's chunk is not contiguous (a copy before its first GEMM)
    for dtype in ("bfloat16", "float32"):
        rows, values = [], {}
        for L, r, h, m in itertools.product(*EP2_SIZES.values()):
            got = _count_experts(L, r, h, m * h, dtype)
            points.append({"ep2_experts": L, "rows_per_rank": r, "hidden": h, "ffn": m * h,
                           "dtype": dtype, "train": got["bytes"]})
            rows.append(terms(0, L, 2 * r, h, m * h))
            for way, counted in got["bytes"].items():
                for what, n in counted.items():
                    values.setdefault(("train", way, "experts", what), []).append(n)
        fit_into(fits, f"ep2 {torch.finfo(getattr(torch, dtype)).bits // 8}B", rows, values)
    record = {"deepspeed": deepspeed.__version__, "torch": torch.__version__, "terms": TERMS,
              "sizes": SIZES, "ep2_sizes": EP2_SIZES, "min_capacity": MIN_CAPACITY, "fits": fits,
              "points": points}
    save_json(record, a.out)
    if a.table:
        version = tuple(int(x) for x in deepspeed.__version__.split("+")[0].split(".")[:3])
        runtime = "deepspeed" if version < (0, 19, 4) else "deepspeed-sparse"
        table = {}
        if os.path.exists(a.table):
            with open(a.table) as f:
                table = json.load(f)
        table[runtime] = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                          "terms": list(TERMS), "fits": {k: v["per"] for k, v in fits.items()}}
        save_json(table, a.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
