"""Model quality at toy scale: DeepSpeed-MoE's design claims, each variant trained on the same
tokens on CPU.

    python bench/bench_quality.py [--steps 300] [--jobs 2] [--seed 0]
                                  [--out bench/results/quality.json]

Every variant shares the base (8 layers, hidden 64, 4 heads, FFN 256, byte vocabulary, 128
tokens; MoE on every other layer), moerun's recipe (AdamW 0.9/0.95, weight decay 0.1, clip 1,
warm-up then cosine decay, lr 3e-3, DeepSpeed's random token selection), the same seed and so
the same batches: 16 sequences of 128 bytes of the standard-library corpus per step, one CPU
rank. Held-out loss: the mean over 128 held-out windows.
  dense        the base, no experts
  moe-top1     8 experts per MoE layer, top-1 (sampled, RSample: argmax routers collapse at
               this scale, see docs/moerun.md)
  moe-top2     the same, top-2
  residual     8 experts, top-1, plus the residual MLP (Residual-MoE)
  pr-moe       Pyramid-Residual: 4/4/4/8 experts and the residual MLP
  mos-*        the PR-MoE's Mixture-of-Students: 6 layers (4/4/8), from scratch without KD,
               with KD from the trained pr-moe throughout, and staged KD (stopped after
               `--kd-stop` of the steps)
Checks the paper's claims that fit this scale and prints whether each holds: MoE beats its
dense base; residual ≈ top-2 (within 1%), both better than top-1; PR-MoE within 1% of the MoE
with fewer parameters; the staged-KD student keeps ≥ 99% of its teacher (teacher loss /
student loss) and beats the same student without KD. Nothing is asserted; claims that do not
reproduce here are reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

BASE = {"num_layers": 8, "hidden": 64, "heads": 4, "ffn_hidden": 256, "vocab_size": 256,
        "max_seq_len": 128, "residual": False, "top_k": 1, "capacity_factor": 1.0,
        "eval_capacity_factor": 1.0, "min_capacity": 4, "aux_loss_coef": 0.01,
        "noisy_gate_policy": "rsample",
        "source": "moeplan quality benchmark model (toy scale, not from the paper)"}
VARIANTS = {
    "dense": {"experts": [0] * 8},
    "moe-top1": {"experts": [0, 8] * 4},
    "moe-top2": {"experts": [0, 8] * 4, "top_k": 2},
    "residual": {"experts": [0, 8] * 4, "residual": True},
    "pr-moe": {"experts": [0, 4, 0, 4, 0, 4, 0, 8], "residual": True},
}
STUDENT = {"num_layers": 6, "experts": [0, 4, 0, 4, 0, 8], "residual": True}
BATCH, SEQ, EVAL_WINDOWS = 16, 128, 128


def spec_doc(name: str, update: dict) -> dict:
    return {"name": f"quality-{name}", **BASE, **update}


def train(job: dict) -> dict:
    """One variant on one CPU rank: train, save, and evaluate on the held-out windows."""
    import torch

    torch.set_num_threads(1)
    from moeplan.cost_models.env import LayerChoice
    from moeplan.planner.planning import Request, fixed_plan
    from moeplan.runtime import checkpoint
    from moeplan.runtime.data import Batches, open_corpus
    from moeplan.runtime.model import GPT
    from moeplan.runtime.parallel import load_full_state
    from moeplan.runtime.run import RunConfig, execute
    from moeplan.spec import load_cluster, load_model

    spec = load_model(job["spec"])
    req = Request(gpus=1, mode="train", global_batch=BATCH, micro_batch=BATCH, seq_len=SEQ)
    choices = {i: LayerChoice(1, 1, "flat", False) for i in spec.moe_layers}
    plan = fixed_plan(spec, load_cluster("local-cpu"), req, 1, choices)
    t0 = time.perf_counter()
    record = execute(plan, RunConfig(mode="train", steps=job["steps"], warmup=0, lr=3e-3,
                                     seed=job["seed"], save=job["save"],
                                     teacher=job.get("teacher"), kd_steps=job.get("kd_steps")),
                     0, 1, log=lambda *_: None)
    wall = time.perf_counter() - t0
    model = GPT(spec)
    load_full_state(model, checkpoint.split(checkpoint.load_full(job["save"])[0])[0])
    model.eval()
    data = Batches(open_corpus(None, None, spec.vocab_size, SEQ), SEQ, seed=0)  # one held-out set
    windows = data.eval_batch(EVAL_WINDOWS)
    with torch.no_grad():
        losses = [float(model.loss(w[:, :-1], w[:, 1:])[0]) for w in windows.split(BATCH)]
    return {"name": job["name"], "held_out_loss": sum(losses) / len(losses),
            "params": sum(p.numel() for p in model.parameters()),
            "first_train_loss": record.losses[0], "last_train_loss": record.losses[-1],
            "train_s": round(wall, 1)}


def claims(r: dict) -> list[dict]:
    loss = {k: v["held_out_loss"] for k, v in r.items()}
    params = {k: v["params"] for k, v in r.items()}

    def rel(a: str, b: str) -> float:
        return abs(loss[a] - loss[b]) / loss[b]

    retained = loss["pr-moe"] / loss["mos-staged-kd"]
    return [
        {"claim": "MoE (top-1) beats its dense base", "holds": loss["moe-top1"] < loss["dense"],
         "figures": f"{loss['moe-top1']:.4f} vs {loss['dense']:.4f}"},
        {"claim": "top-2 beats top-1", "holds": loss["moe-top2"] < loss["moe-top1"],
         "figures": f"{loss['moe-top2']:.4f} vs {loss['moe-top1']:.4f}"},
        {"claim": "residual beats top-1", "holds": loss["residual"] < loss["moe-top1"],
         "figures": f"{loss['residual']:.4f} vs {loss['moe-top1']:.4f}"},
        {"claim": "residual ≈ top-2 (within 1%)", "holds": rel("residual", "moe-top2") <= 0.01,
         "figures": f"{rel('residual', 'moe-top2'):.2%} apart"},
        {"claim": "PR-MoE within 1% of the MoE with fewer parameters",
         "holds": rel("pr-moe", "moe-top1") <= 0.01 and params["pr-moe"] < params["moe-top1"],
         "figures": f"{loss['pr-moe']:.4f} vs {loss['moe-top1']:.4f}, "
                    f"{params['pr-moe']:,} vs {params['moe-top1']:,} parameters"},
        {"claim": "staged-KD student keeps >= 99% of its teacher (teacher / student loss)",
         "holds": retained >= 0.99, "figures": f"{retained:.2%}"},
        {"claim": "staged-KD student beats the same student without KD",
         "holds": loss["mos-staged-kd"] < loss["mos-no-kd"],
         "figures": f"{loss['mos-staged-kd']:.4f} vs {loss['mos-no-kd']:.4f}"},
        {"claim": "KD throughout beats no KD",
         "holds": loss["mos-kd"] < loss["mos-no-kd"],
         "figures": f"{loss['mos-kd']:.4f} vs {loss['mos-no-kd']:.4f}"},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--kd-stop", type=float, default=0.6,
                    help="staged KD: the share of the steps distilled [0.6]")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0,
                    help="weight initialisation and data order of every variant [0]")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            a.jobs, mp_context=get_context("spawn")) as pool:
        work = Path(tmp)

        def job(name: str, doc: dict, **kw) -> dict:
            path = work / f"{name}.json"
            path.write_text(json.dumps(doc))
            return {"name": name, "spec": str(path), "steps": a.steps, "seed": a.seed,
                    "save": str(work / f"{name}.ckpt"), **kw}

        first = [job(n, spec_doc(n, u)) for n, u in VARIANTS.items()]
        for r in pool.map(train, first):
            results[r["name"]] = r
        teacher = str(work / "pr-moe.json")
        student = {**STUDENT, "distillation": {"teacher": teacher, "alpha": 1.0,
                                               "temperature": 1.0, "source": "bench"}}
        second = [job("mos-no-kd", spec_doc("mos", student), kd_steps=0),
                  job("mos-kd", spec_doc("mos", student), teacher=str(work / "pr-moe.ckpt")),
                  job("mos-staged-kd", spec_doc("mos", student),
                      teacher=str(work / "pr-moe.ckpt"),
                      kd_steps=max(1, math.floor(a.kd_stop * a.steps)))]
        for r in pool.map(train, second):
            results[r["name"]] = r
    print(f"{a.steps} steps of {BATCH} x {SEQ} bytes each, held-out loss over {EVAL_WINDOWS} "
          "windows (nats per byte)")
    for name, r in results.items():
        print(f"  {name:14s} held-out {r['held_out_loss']:.4f}  train {r['first_train_loss']:.3f}"
              f" -> {r['last_train_loss']:.3f}  {r['params']:>9,} parameters  {r['train_s']} s")
    checks = claims(results)
    for c in checks:
        print(f"  {'holds' if c['holds'] else 'DOES NOT HOLD':13s} {c['claim']}: {c['figures']}")
    if a.out:
        Path(a.out).write_text(json.dumps(
            {"bench": "quality", "steps": a.steps, "seed": a.seed, "batch": BATCH, "seq_len": SEQ,
             "kd_stop": a.kd_stop, "eval_windows": EVAL_WINDOWS, "variants": results,
             "claims": checks, "wall_s": round(time.perf_counter() - t0, 1)},
            indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
