"""One GPU, one short run: what CPU ranks cannot check.

    python bench/gpu_check.py [--out DIR] [--model tiny-pr-moe] [--cluster dgx-h100-80gb]

Steps, each in its own process with a time limit, in order of what they cost:
  trace     one decode step of MODEL in bf16 on the Triton fast path: kernels launched, copies,
            host syncs (torch.profiler), against the operations the cost model charges a moerun
            decode step on a GPU; seconds per token eager and replayed from a CUDA graph
  graph     tests/test_fastpath.py's CUDA-graph test (replay == eager)
  train     moeplan search (1 GPU, --mode train, bf16) -> moerun (5 steps) -> moeplan validate
  infer     the same for --mode infer
  profiled  moeplan profile (1 GPU, --quick) -> a plan of PROFILED_MODEL costed on that measured
            profile -> moerun -> validate: the measured profile's probe runs at hidden 256 to
            2,048 with 1,024 to 8,192 tokens on a GPU, so this checks its work scales on a model
            inside that range (hidden 1024, 2,048-token sequences); the first GPU run of the
            probe at those sizes (shapes.PROBE_SIZES["gpu"])
  kernels   bench/bench_kernels_gpu.py at a small size: Triton vs reference vs one-hot einsum
Writes DIR/summary.json (each step's exit code, seconds and last lines) and each step's own
output; `--step NAME` runs only the steps named (the device time is short). Without CUDA it
says so and exits 0: it never reports a figure it did not measure.
Prepared for a session with a GPU; not yet run on one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = {"trace": 240, "graph": 240, "train": 300, "infer": 300, "profiled": 480,
           "kernels": 240}
PROFILED_MODEL = "350m-pr-moe"  # hidden 1024, sequences of 2,048: inside the GPU probe's sizes


def trace_decode(model_name: str, batch: int, prompt: int, tokens: int) -> dict:
    """Kernels and seconds of one decode step (see the module's docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moeplan.cost_models.runtimes import operations
    from moeplan.runtime.infer import WARMUP_STEPS, Decoder, generate
    from moeplan.runtime.kernels import select, use_kernels
    from moeplan.runtime.model import GPT
    from moeplan.spec import load_model
    from moeplan.spec.phases import Phase

    spec = load_model(model_name)
    dev = torch.device("cuda")
    model = GPT(spec).to(dev, torch.bfloat16).eval()
    kernels = select(dev)
    use_kernels(model, kernels)
    g = torch.Generator(device=dev).manual_seed(0)
    prompts = torch.randint(0, spec.vocab_size, (batch, prompt), device=dev, generator=g)

    def per_token(graph: bool) -> float:
        stamps = []

        def on_token(_: int) -> None:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            stamps.append(e)
        generate(model, prompts, tokens, on_token, graph=graph)
        torch.cuda.synchronize()
        first = WARMUP_STEPS + 1  # from the first replayed step on, eager timed alike
        return stamps[first].elapsed_time(stamps[-1]) / 1e3 / (len(stamps) - 1 - first)

    per_token(False), per_token(True)  # compile the Triton kernels, settle cuBLAS
    eager_s, graph_s = per_token(False), per_token(True)

    with torch.no_grad():
        cache = model.new_cache(batch, prompt + 4)
        logits, _ = model(prompts, cache)
        step = Decoder(model, cache, logits[:, -1].argmax(-1), prompt)
        step.advance(step.eager())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step.advance(step.eager())
            torch.cuda.synchronize()
    device_events = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    copies = [n for n in device_events if n.startswith(("Memcpy", "Memset"))]
    # reads back to the host (the profiled region's own closing synchronize is a device sync)
    syncs = [e.name for e in prof.events() if e.name in ("cudaStreamSynchronize", "cudaMemcpy")]

    charged = 0.0  # what runtimes.operations charges the step (the head and every layer)
    for i, E in enumerate(spec.experts):
        phases = ([Phase.ATTENTION, Phase.MLP] if not E else
                  [Phase.ATTENTION, Phase.GATE, Phase.DISPATCH, Phase.EXPERTS, Phase.COMBINE]
                  + (["residual_mlp"] if spec.residual or spec.shared_ffn_hidden else []))
        charged += sum(operations("moerun", "gpu", ph, False, E, spec) for ph in phases)
    charged += operations("moerun", "gpu", Phase.HEAD, False, 0, spec)
    return {"model": model_name, "batch": batch, "prompt": prompt, "tokens": tokens,
            "device": torch.cuda.get_device_name(), "kernels": kernels.name,
            "kernels_per_step": len(device_events) - len(copies), "copies_per_step": len(copies),
            "host_syncs_per_step": len(syncs),
            "operations_charged_per_step": charged,
            "seconds_per_token": {"eager": eager_s, "cuda_graph": graph_s}}


def run_step(name: str, argv: list[str], out: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=out, env=env, capture_output=True, text=True,
                           timeout=LIMIT_S[name])
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"over {LIMIT_S[name]} s\n{e.stdout or ''}"
    (out / f"{name}.log").write_text(text)
    print(f"{name}: rc {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "tail": text.strip().splitlines()[-8:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check"),
                    help="folder for the results [default: $OUT, else ./gpu-check]")
    ap.add_argument("--model", default="tiny-pr-moe")
    ap.add_argument("--cluster", default="dgx-h100-80gb",
                    help="the profile the plans are costed on (a GPU of this machine's kind)")
    ap.add_argument("--step", action="append", choices=list(LIMIT_S), default=None,
                    help="run only this step (repeatable) [default: all, in order]")
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)  # the trace step
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing run (it measures a GPU only)")
        return 0
    out = Path(a.out).resolve()
    if a.trace:
        print(json.dumps(trace_decode(a.model, batch=8, prompt=64, tokens=32), indent=2))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py, me = sys.executable, str(Path(__file__).resolve())
    plan = [py, "-m", "moeplan.cli.main", "search", "--model", a.model, "--gpus", "1",
            "--cluster", a.cluster, "--dtype", "bf16"]
    moerun = [py, "-m", "moeplan.cli.moerun", "--steps", "5", "--warmup", "2"]
    validate = [py, "-m", "moeplan.cli.main", "validate"]
    steps = {
        "trace": [py, me, "--trace", "--model", a.model, "--out", str(out)],
        "graph": [py, "-m", "pytest", "-q", str(ROOT / "tests" / "test_fastpath.py"),
                  "-k", "cuda_graph", "-p", "no:cacheprovider"],
        "train": ["sh", "-c", " && ".join(" ".join(c) for c in (
            plan + ["--mode", "train", "--out", "train-plan.json"],
            moerun + ["--plan", "train-plan.json", "--out", "train-run.json"],
            validate + ["train-plan.json", "train-run.json"]))],
        "infer": ["sh", "-c", " && ".join(" ".join(c) for c in (
            plan + ["--mode", "infer", "--out", "infer-plan.json"],
            moerun + ["--plan", "infer-plan.json", "--out", "infer-run.json"],
            validate + ["infer-plan.json", "infer-run.json"]))],
        "profiled": ["sh", "-c", " && ".join(" ".join(c) for c in (
            [py, "-m", "moeplan.cli.main", "profile", "--nproc", "1", "--quick", "--out",
             "profile.json"],
            [py, "-m", "moeplan.cli.main", "search", "--model", PROFILED_MODEL, "--gpus", "1",
             "--profile", "profile.json", "--dtype", "bf16", "--mode", "train",
             "--global-batch", "8", "--out", "profiled-plan.json"],
            moerun + ["--plan", "profiled-plan.json", "--out", "profiled-run.json"],
            validate + ["profiled-plan.json", "profiled-run.json"]))],
        "kernels": [py, str(ROOT / "bench" / "bench_kernels_gpu.py"), "--tokens", "4096",
                    "--experts", "8", "64", "--reps", "10"],
    }
    summary = {name: run_step(name, argv, out, env) for name, argv in steps.items()
               if a.step is None or name in a.step}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(s["rc"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
