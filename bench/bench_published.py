"""Predicted vs published: DeepSpeed-MoE's own GPU measurements, costed with `--runtime deepspeed`.

    python bench/bench_published.py [--out bench/results/published.json]

The only real GPU figures at hand are the paper's (Rajbhandari et al., "DeepSpeed-MoE", ICML
2022; A100-40GB, Azure NDv4 = the `ndv4-a100-40gb` profile):
  Table 3    training on 128 GPUs: 6.7B dense 70 samples/s, 1.3B+MoE-128 372 samples/s (5.3×);
             set up as the authors' scripts do (Megatron-DeepSpeed examples_deepspeed/MoE/
             ds_pretrain_gpt_6.7B_dense.sh, ds_pretrain_gpt_1.3B_MoE128.sh): fp16, ZeRO stage 0,
             activation checkpointing, dense tp=8 micro-batch 4 global batch 1024, MoE tp=1
             ep=128 global batch 512 (4 sequences per GPU on 128 GPUs: micro-batch 4), seq 2048
  Figure 10  52B (1.3B+MoE-128) per-token latency at 8 / 16 / 32 / 64 GPUs, about 8 sequences
             in flight per GPU (the chart's throughput × latency), read off the chart:
             27.3 / 19.0 / 14.6 / 12.7 ms; experts spread over the GPUs (ep = GPUs), tp = 1
  §5.5.2     "a staggering trillion parameter MoE model can be inferenced under 25ms" on 256
             GPUs (Figure 11's caption), with Table 6's degrees for 24B+MoE-128 (MP 8, EP 128;
             128 experts on 256 GPUs: expert slicing 2, §5.2); its batch is not stated. An upper
             bound, not a point: costed at one sequence per data-parallel rank (the fastest), it
             meets the ±25% target for some latency under 25 ms only below 1.25 × 25 ms
  Megatron  the same cost model against a second, independent set of real GPU measurements:
             Megatron-LM's weak-scaling runs (Narayanan et al., "Efficient Large-Scale Language
             Model Training on GPU Clusters Using Megatron-LM", SC 2021, Table 1), the rows
             without pipeline parallelism: 1.7B / 3.6B / 7.5B / 18.4B GPTs at tp 1 / 2 / 4 / 8
             on 32 / 64 / 128 / 256 A100-80GB of NVIDIA's Selene (DGX A100 with 8 HDR NICs per
             node = the `dgx-a100-80gb` profile), sequence 2048, vocabulary 51,200, mixed
             precision; reported as TFLOP/s per GPU by the paper's Eq. 3,
             F = 96·B·s·l·h²·(1 + s/6h + V/16lh) per step, which counts activation recomputation's
             extra forward pass — so the runs are costed with recomputation on — and which the
             script applies to the predicted step time. The micro-batch is not stated: the row
             is costed at the fastest one that fits (as the authors tuned theirs) and the
             slowest is printed beside it. Costed with `--runtime deepspeed`, whose dense layers
             are Megatron's
Each configuration is fixed (`--fix`) and costed by the same model as the search. One constant
of the profile is fitted to one of these points: the per-operation framework overhead
(`op_overhead_s`, the eager PyTorch + DeepSpeed Python cost of launching one kernel) to the
52B latency at 8 GPUs — `--fit` solves for it and prints it. That row is marked fitted and is
not a check; every other constant is a datasheet value or an assumption stated in the profile,
so the other rows are validation (no constant is fitted to Megatron-LM's runs either).
Targets: each validation point within ±25%, the 8→64 GPU
latency ratio within 1.6–2.8× (paper 2.15×), the training ratio MoE/dense within 4.2–6.5×
(paper 5.3×). It also prints the planner's own best moerun plans for the 52B inference cases
(their latency must fall from 8 to 64 GPUs) and Table 3's training cases, Table 3 costed at
ZeRO stage 2 (which the paper does not state; a sensitivity, not a check), and the training and
inference configurations
costed for today's DeepSpeed (`--runtime deepspeed-sparse`), which nothing published checks.
"""

from __future__ import annotations

import argparse
import json
import sys

from scipy.optimize import brentq

from moeplan.planner.planning import Request, plan
from moeplan.planner.space import Fix
from moeplan.spec import load_cluster, load_model
from moeplan.spec.cluster import ClusterProfile
from moeplan.spec.errors import InfeasibleError
from moeplan.spec.model import ModelSpec

CLUSTER = "ndv4-a100-40gb"
# (label, model, GPUs, global batch, fixed degrees, published samples/s) — Table 3
TRAINING = [("6.7B dense", "6.7b", 128, 1024, Fix(tp=8, micro_batch=4, recompute=True), 70.0),
            ("1.3B+MoE-128", "1.3b-moe-128", 128, 512,
             Fix(tp=1, ep=128, es=1, micro_batch=4, recompute=True), 372.0)]
# (GPUs, published ms per token) — Figure 10, 52B, 8 sequences per GPU
INFERENCE = [(8, 27.3), (16, 19.0), (32, 14.6), (64, 12.7)]
SEQUENCES_PER_GPU = 8
# (label, model, GPUs, fixed degrees, published upper bound in ms per token) — §5.5.2
TRILLION = ("1T (24B+MoE-128), 256 GPUs", "24b-moe-128", 256, Fix(tp=8, ep=128, es=2), 25.0)
# (label, heads, hidden, layers, tp, GPUs, global batch, published TFLOP/s per GPU) —
# Narayanan et al., SC 2021, Table 1, the rows with pipeline-parallel size 1
MEGATRON = [("1.7B", 24, 2304, 24, 1, 32, 512, 137.0), ("3.6B", 32, 3072, 30, 2, 64, 512, 138.0),
            ("7.5B", 32, 4096, 36, 4, 128, 512, 142.0),
            ("18.4B", 48, 6144, 40, 8, 256, 1024, 135.0)]
MEGATRON_CLUSTER, MEGATRON_SEQ, MEGATRON_VOCAB = "dgx-a100-80gb", 2048, 51200
FITTED = "infer 52B 8 GPUs"  # the point `op_overhead_s` of the profile is fitted to


def costed(model: str | ModelSpec, gpus: int, mode: str, batch: int, fix: Fix, runtime: str,
           cluster: ClusterProfile | None = None, zero_stage: int = 0):
    req = Request(gpus=gpus, mode=mode, global_batch=batch, zero_stage=zero_stage, dtype="fp16",
                  fix=fix, runtime=runtime, simulate_top=0)
    spec = load_model(model) if isinstance(model, str) else model
    return plan(spec, cluster or load_cluster(CLUSTER), req)[0]


def latency_ms(gpus: int, cluster: ClusterProfile | None = None,
               runtime: str = "deepspeed") -> float:
    """DeepSpeed's per-token latency for the 52B model on `gpus` GPUs (Figure 10's setup)."""
    p = costed("1.3b-moe-128", gpus, "infer", SEQUENCES_PER_GPU * gpus,
               Fix(tp=1, ep=gpus, es=1), runtime, cluster)
    return p.predicted.latency_s * 1e3


def megatron_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """FLOPs of one training step with activation recomputation, as Megatron-LM counts them
    (Narayanan et al., SC 2021, Eq. 3)."""
    return (96.0 * batch * seq * layers * hidden ** 2
            * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden)))


def megatron_tflops(heads: int, hidden: int, layers: int, tp: int, gpus: int,
                    batch: int) -> tuple[float, float]:
    """Predicted TFLOP/s per GPU of a Megatron-LM GPT run (4h FFN, learned positions, tied
    embeddings): at the fastest micro-batch that fits, and at the slowest."""
    base = load_model("6.7b").model_dump()
    base.update(name=f"megatron-gpt-{hidden}x{layers}", num_layers=layers, hidden=hidden,
                heads=heads, ffn_hidden=4 * hidden, vocab_size=MEGATRON_VOCAB,
                max_seq_len=MEGATRON_SEQ, experts=[0] * layers,
                source="Narayanan et al., SC 2021, Table 1")
    spec = ModelSpec.model_validate(base)
    cluster = load_cluster(MEGATRON_CLUSTER)
    flops = megatron_flops(batch, MEGATRON_SEQ, layers, hidden, MEGATRON_VOCAB)
    per_rank = batch * tp // gpus
    rates = []
    for mb in (m for m in range(1, per_rank + 1) if per_rank % m == 0):
        try:
            p = costed(spec, gpus, "train", batch, Fix(tp=tp, micro_batch=mb, recompute=True),
                       "deepspeed", cluster)
        except InfeasibleError:  # this micro-batch does not fit
            continue
        rates.append(flops / (p.predicted.step_time_s * gpus) / 1e12)
    return max(rates), min(rates)


def fit_op_overhead() -> float:
    """The per-operation overhead at which the 52B latency at 8 GPUs equals the published one."""
    base = load_cluster(CLUSTER)
    published = dict(INFERENCE)[8]

    def miss(overhead: float) -> float:
        device = base.device.model_copy(update={"op_overhead_s": overhead})
        return latency_ms(8, base.model_copy(update={"device": device})) - published

    return brentq(miss, 0.0, 1e-4, xtol=1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("--fit", action="store_true",
                    help=f"solve for the profile's op_overhead_s at the point '{FITTED}' and "
                         "print it (then edit the profile); nothing else")
    a = ap.parse_args(argv)
    if a.fit:
        print(f"op_overhead_s = {fit_op_overhead():.3e} s fits {FITTED} "
              f"({dict(INFERENCE)[8]} ms); the profile has "
              f"{load_cluster(CLUSTER).device.op_overhead_s:.3e} s")
        return 0
    rows: list[dict] = []

    def point(case: str, label: str, predicted: float, published: float, unit: str) -> float:
        ratio = predicted / published
        fitted = case == FITTED
        hit = abs(ratio - 1) <= 0.25
        rows.append({"case": case, "predicted": predicted, "published": published, "unit": unit,
                     "ratio": ratio, "within_25pct": hit, "fitted": fitted})
        verdict = "fitted, not a check" if fitted else ("ok" if hit else "MISS")
        print(f"  {label:14s} predicted {predicted:7.2f}  published {published:6.1f}  "
              f"ratio {ratio:.2f} {verdict}")
        return predicted

    def within(name: str, value: float, lo: float, hi: float, paper: float) -> bool:
        hit = lo <= value <= hi
        print(f"  {name} {value:.2f}x (paper {paper}x, target {lo}-{hi}) {'ok' if hit else 'MISS'}")
        return hit

    print("Table 3, training on 128 x A100-40GB (samples/s), --runtime deepspeed")
    train = {}
    for label, model, gpus, batch, fix, published in TRAINING:
        p = costed(model, gpus, "train", batch, fix, "deepspeed")
        train[label] = point(f"train {label}", label, batch / p.predicted.step_time_s, published,
                             unit="samples/s")
    speedup = train["1.3B+MoE-128"] / train["6.7B dense"]
    ok = within("MoE / dense throughput", speedup, 4.2, 6.5, 5.3)
    # the paper does not state the ZeRO stage (the scripts above: 0); ZeRO 2 reduces the
    # gradients after every micro-batch's backward, not once a step — a sensitivity, not a check
    zero2 = {}
    for label, model, gpus, batch, fix, published in TRAINING:
        p = costed(model, gpus, "train", batch, fix, "deepspeed", zero_stage=2)
        zero2[label] = batch / p.predicted.step_time_s
    print(f"  at ZeRO stage 2 instead (not stated in the paper; not a check): "
          + ", ".join(f"{k} {v:.2f} ({v / dict((t[0], t[5]) for t in TRAINING)[k]:.2f})"
                      for k, v in zero2.items())
          + f", ratio {zero2['1.3B+MoE-128'] / zero2['6.7B dense']:.2f}x")

    print("Figure 10, 52B inference, 8 sequences per GPU (ms per token), --runtime deepspeed, "
          "ep = GPUs, tp = 1")
    latency = {}
    for gpus, published in INFERENCE:
        latency[gpus] = point(f"infer 52B {gpus} GPUs", f"{gpus} GPUs", latency_ms(gpus),
                              published, unit="ms per token")
    fall = latency[8] / latency[64]
    ok &= within("8 -> 64 GPU latency ratio", fall, 1.6, 2.8, 2.15)

    print(f"Megatron-LM, SC 2021 Table 1, rows without pipeline parallelism, on "
          f"{MEGATRON_CLUSTER} (TFLOP/s per GPU by the paper's Eq. 3), --runtime deepspeed")
    for label, heads, hidden, layers, tp, gpus, batch, published in MEGATRON:
        best, worst = megatron_tflops(heads, hidden, layers, tp, gpus, batch)
        point(f"train Megatron-LM {label} tp={tp} {gpus} GPUs", f"{label} tp={tp}", best,
              published, unit="TFLOP/s per GPU")
        rows[-1]["slowest_micro_batch"] = worst
        print(f"  {'':14s} (slowest micro-batch that fits: {worst:.1f}, ratio "
              f"{worst / published:.2f})")

    label, model, gpus, fix, bound = TRILLION
    print(f"Section 5.5.2, {label}: published under {bound:g} ms per token, --runtime deepspeed, "
          f"tp={fix.tp} ep={fix.ep} es={fix.es}, one sequence per data-parallel rank")
    p = costed(model, gpus, "infer", gpus // fix.tp, fix, "deepspeed")
    ms = p.predicted.latency_s * 1e3
    below = ms <= 1.25 * bound
    print(f"  predicted {ms:.2f} ms = {ms / bound:.2f} x the bound "
          f"({'ok' if below else 'MISS'}: within 25% of some latency under it needs "
          f"<= {1.25 * bound:g} ms)")
    ok &= below
    bounds = [{"case": f"infer {label}", "predicted": ms, "published_under": bound,
               "ratio_to_bound": ms / bound, "within_25pct_possible": below}]
    ok &= all(r["within_25pct"] for r in rows if not r["fitted"])

    print("The planner's own best moerun plans, 52B inference, 8 sequences per GPU")
    own = {}
    for gpus, _ in INFERENCE:
        p = costed("1.3b-moe-128", gpus, "infer", SEQUENCES_PER_GPU * gpus, Fix(), "moerun")
        own[gpus] = p.predicted.latency_s * 1e3
        moe = next(layer for layer in p.layers if layer.kind == "moe")
        print(f"  {gpus:3d} GPUs  {own[gpus]:6.2f} ms per token (tp={p.parallel.tp}, "
              f"ep={moe.ep} es={moe.es} edp={moe.edp} {moe.a2a})")
    falls = all(own[a] > own[b] for a, b in zip(sorted(own), sorted(own)[1:]))
    ok &= falls
    print(f"  latency falls from 8 to 64 GPUs: {'yes' if falls else 'NO'}")
    print("The planner's own best moerun plans, Table 3's training cases (samples/s)")
    own_train = {}
    for label, model, gpus, batch, _, published in TRAINING:
        p = costed(model, gpus, "train", batch, Fix(), "moerun")
        own_train[label] = batch / p.predicted.step_time_s
        moe = next((layer for layer in p.layers if layer.kind == "moe"), None)
        experts = f", ep={moe.ep} es={moe.es} edp={moe.edp} {moe.a2a}" if moe else ""
        recompute = " recompute" if p.parallel.activation_checkpointing else ""
        print(f"  {label:14s} {own_train[label]:7.2f} samples/s (tp={p.parallel.tp} "
              f"dp={p.parallel.dp} micro-batch {p.workload.micro_batch}{recompute}{experts}; "
              f"the published run {published:g})")
    own_ratio = own_train["1.3B+MoE-128"] / own_train["6.7B dense"]
    print(f"  MoE / dense throughput {own_ratio:.2f}x")

    print("Today's DeepSpeed (--runtime deepspeed-sparse: index dispatch, v0.19.4 on), the "
          "same configurations; nothing published to compare with")
    sparse = {}
    for label, model, gpus, batch, fix, _ in TRAINING:
        p = costed(model, gpus, "train", batch, fix, "deepspeed-sparse")
        sparse[f"train {label}"] = batch / p.predicted.step_time_s
        print(f"  {label:14s} {sparse[f'train {label}']:7.2f} samples/s "
              f"({sparse[f'train {label}'] / train[label]:.2f}x the einsum runtime's)")
    for gpus, _ in INFERENCE:
        ms = latency_ms(gpus, runtime="deepspeed-sparse")
        sparse[f"infer 52B {gpus} GPUs"] = ms
        print(f"  52B {gpus:2d} GPUs    {ms:7.2f} ms per token ({ms / latency[gpus]:.2f}x)")
    out = {"cluster": CLUSTER, "rows": rows, "bounds": bounds, "train_ratio": speedup,
           "latency_8_over_64": fall,
           "moerun_best_ms": own, "moerun_latency_falls": falls, "all_targets_met": ok,
           "moerun_best_train_samples_per_s": own_train, "moerun_best_train_ratio": own_ratio,
           "train_zero2_samples_per_s": zero2,
           "deepspeed_sparse": sparse,
           "fitted_to_published": {"op_overhead_s": FITTED}}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
            f.write("\n")
    print("all targets met" if ok else "targets missed (see MISS above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
