"""Today's blocks against DeepSpeed-MoE's on CPU ranks: what they cost, measured and predicted.

    python bench/bench_blocks.py [--gpus 4] [--steps 10] [--out bench/results/blocks.json]

Two models of the same shapes (4 layers, hidden 128, 4 heads, 4 experts of width 256, top-2,
dropless, vocabulary 256, sequences of 256): one with DeepSpeed-MoE's blocks (LayerNorm, learned
positions, multi-head attention, GELU, biases), one a Mixtral-like config read as Hugging Face
writes it (RMSNorm, rotary positions, 2 kv heads, SwiGLU, no biases). `moeplan profile` measures
this host once; each model is planned on that profile and run by `moerun`; the bench prints each
model's predicted and measured step and the ratio of today's blocks to DeepSpeed-MoE's, predicted
and measured — what the cost model's counts of the blocks' operations and elementwise passes are
for, apart from how well the profile's calibration carries to these shapes (which shows in both
models' absolute errors alike).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moeplan.spec import load_model
from moeplan.spec.plan import Plan
from moeplan.spec.record import RunRecord

MOEPLAN = [sys.executable, "-c", "from moeplan.cli.main import main; main()"]
MOERUN = [sys.executable, "-c", "from moeplan.cli.moerun import main; main()"]
# Mixtral-8x7B's config.json (mistralai/Mixtral-8x7B-v0.1) at toy sizes
TINY_MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 256, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.02, "output_router_logits": False, "torch_dtype": "bfloat16"}


def classic_twin(path: Path) -> dict:
    """The same shapes with DeepSpeed-MoE's blocks (a ModelSpec document)."""
    s = load_model(str(path))
    return json.loads(load_model("tiny-pr-moe").model_copy(update={
        "name": "tiny-classic", "num_layers": s.num_layers, "hidden": s.hidden,
        "heads": s.heads, "ffn_hidden": s.expert_ffn, "vocab_size": s.vocab_size,
        "max_seq_len": s.max_seq_len, "experts": s.experts, "residual": False,
        "top_k": s.top_k, "use_rts": False, "noisy_gate_policy": "none",
        "second_expert_sampling": False, "capacity_factor": s.capacity_factor,
        "drop_tokens": s.drop_tokens, "min_capacity": s.min_capacity}).model_dump_json())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    out = {"bench": "blocks", "gpus": a.gpus, "steps": a.steps, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "tiny-mixtral.json").write_text(json.dumps(TINY_MIXTRAL))
        (t / "tiny-classic.json").write_text(json.dumps(classic_twin(t / "tiny-mixtral.json")))
        print(f"profiling this host for {a.gpus} CPU ranks ...", flush=True)
        subprocess.run(MOEPLAN + ["profile", "--nproc", str(a.gpus), "--out",
                                  str(t / "local.json")], check=True, capture_output=True)
        for name in ("tiny-classic", "tiny-mixtral"):
            plan_path, run_path = t / f"plan-{name}.json", t / f"run-{name}.json"
            subprocess.run(MOEPLAN + ["search", "--model", str(t / f"{name}.json"), "--gpus",
                                      str(a.gpus), "--profile", str(t / "local.json"),
                                      "--out", str(plan_path)], check=True, capture_output=True)
            subprocess.run(MOERUN + ["--plan", str(plan_path), "--steps", str(a.steps),
                                     "--out", str(run_path)], check=True, capture_output=True)
            plan = Plan.model_validate_json(plan_path.read_text())
            run = RunRecord.model_validate_json(run_path.read_text())
            predicted, measured = plan.predicted.step_time_s, run.measured.step_time_s
            out["models"][name] = {
                "predicted_step_s": predicted, "measured_step_s": measured,
                "error": predicted / measured - 1,
                "phases_predicted_s": {k: sum(lay.predicted.phases_s.get(k, 0.0)
                                              for lay in plan.layers)
                                       for k in ("attention", "mlp", "gate", "experts")},
                "plan": f"tp={plan.parallel.tp} micro-batch {plan.workload.micro_batch} "
                        + " ".join(f"ep={lay.ep}" for lay in plan.layers if lay.kind == "moe")}
            print(f"  {name:13s} predicted {predicted:7.3f} s  measured {measured:7.3f} s  "
                  f"error {out['models'][name]['error']:+.1%}", flush=True)
    m = out["models"]
    out["ratio_predicted"] = m["tiny-mixtral"]["predicted_step_s"] / m["tiny-classic"][
        "predicted_step_s"]
    out["ratio_measured"] = m["tiny-mixtral"]["measured_step_s"] / m["tiny-classic"][
        "measured_step_s"]
    print(f"today's blocks / DeepSpeed-MoE's: predicted {out['ratio_predicted']:.3f}x, "
          f"measured {out['ratio_measured']:.3f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
