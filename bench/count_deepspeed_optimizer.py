"""Count what DeepSpeed's engine does around the optimizer, by running it: operations, bytes and
host reads per parameter tensor and element, to check the counts `moeplan/cost_models/runtimes.py`
charges for `--runtime deepspeed` (which were first read off DeepSpeed's code).

    pip install deepspeed==0.16.4      # in an environment of its own: not a moeplan dependency
    python bench/count_deepspeed_optimizer.py [--out bench/results/deepspeed-optimizer-counts.json]

DeepSpeed's real engine (DS_ACCELERATOR=cpu, gloo, 1 and 2 ranks) trains a chain of bias-free
square Linear layers — T weight tensors of d² elements — with two micro-steps a step, for bf16
without ZeRO (its BF16 optimizer), fp32 without ZeRO, and bf16 under ZeRO 1 and 2 (fp16 needs a
GPU: its counts stay read from the code). The counting mode of bench/op_count.py records the
second step's launches, bytes and host reads. Three windows per step:
  micro     the engine's backward on the first micro-step, less the bare autograd backward of
            the same module (counted on a copy, gradients unset): what the engine adds to every
            micro-step but the last (gradient accumulation, ZeRO-2's bucket copies)
  boundary  the same on the last micro-step (adds the gradient reduction's local copies)
  step      `engine.step()` less the wrapped optimizer's own update (a stand-in torch optimizer
            whose step is not counted: on a GPU DeepSpeed's fused Adam runs there, counted from
            its kernels in runtimes.py)
Per window, launches = a·T + b and bytes = c·T·d² + e are solved from T in {8, 16} and d in
{64, 128}; the record holds a (per tensor), c (per element), the host reads at T = 8 (device
syncs: `host_reads`, and how many of them come per tensor: `host_reads_per_tensor`; reads of
host scalars, no sync on a GPU: `host_scalar_reads` — see bench/op_count.py), and the
collectives seen (not charged here: `update.grad_sync_s` charges them). With 2 ranks each rank
steps its half: the per-tensor and per-element figures then mix the rank's whole ("local") and its
partition ("share") terms, which the 1-rank figures separate.

The CPU's aten operations stand for the GPU's kernels: on CUDA the same operations launch one
kernel each, except where a fused CUDA kernel does more at once (not the case for the ops seen).
"""

from __future__ import annotations

import argparse
import os
import sys

from op_count import counter, rank_env, run_world, save_json

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SHAPES = ((8, 64), (16, 64), (8, 128))  # (tensors T, width d): tensors of d² elements
CONFIGS = (("bf16", 0), ("fp32", 0), ("bf16", 1), ("bf16", 2))
WINDOWS = ("micro", "boundary", "step")


def _rank(rank: int, world: int, port: int, queue) -> None:
    rank_env(rank, world, port)
    import copy
    import logging

    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    count_cls = counter()
    quiet: list = []

    class Unc(torch.optim.SGD):
        """The wrapped optimizer: its own update is not counted (see the module's docstring)."""

        def step(self, closure=None):
            for c in quiet:
                c.on = False
            try:
                return super().step(closure)
            finally:
                for c in quiet:
                    c.on = True

    results = {}
    for dtype, zero in CONFIGS:
        for T, d in SHAPES:
            torch.manual_seed(0)
            model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(T)])
            bare = copy.deepcopy(model)
            cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                   "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
                   "zero_optimization": {"stage": zero}, "bf16": {"enabled": dtype == "bf16"},
                   "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
            eng, *_ = deepspeed.initialize(model=model, optimizer=Unc(model.parameters(), lr=0.0),
                                           config=cfg)
            tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
            bare = bare.to(tdt)
            x = torch.randn(4, d, dtype=tdt)
            got = {}
            for step in range(2):
                for micro in range(2):
                    loss = eng(x).float().pow(2).mean()
                    c = count_cls()
                    quiet[:] = [c]
                    with c:
                        eng.backward(loss)
                    if step == 1:
                        window = "boundary" if micro == 1 else "micro"
                        got[window] = c
                    c = count_cls()
                    quiet[:] = [c]
                    with c:
                        eng.step()
                    if step == 1 and micro == 1:
                        got["step"] = c
            for p in bare.parameters():
                p.grad = None
            loss = bare(x).float().pow(2).mean()
            c = count_cls()
            with c:
                loss.backward()
            for w in ("micro", "boundary"):  # less the bare autograd backward
                got[w].launches.subtract(c.launches)
                got[w].bytes.subtract(c.bytes)
                got[w].ops["all"].subtract(c.ops["all"])
            results[f"{dtype} zero{zero} T{T} d{d}"] = {
                w: {"launches": g.launches["all"], "bytes": g.bytes["all"],
                    "syncs": g.syncs["all"], "host_scalar_reads": g.host_reads["all"],
                    "collectives": dict(g.collectives["all"]),
                    "ops": {k: v for k, v in g.ops["all"].items() if v}}
                for w, g in got.items()}
            eng.destroy()
    if rank == 0:
        queue.put(results)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _coefficients(raw: dict) -> dict:
    """Per tensor and per element figures of each window, solved from the three shapes."""
    (t0, d0), (t1, _), (_, d2) = SHAPES
    out = {}
    for dtype, zero in CONFIGS:
        key = f"{dtype} zero{zero}"
        a, b, c = (raw[f"{key} T{t} d{d}"] for t, d in SHAPES)
        out[key] = {}
        for w in WINDOWS:
            per_tensor = (b[w]["launches"] - a[w]["launches"]) / (t1 - t0)
            per_element = (c[w]["bytes"] - a[w]["bytes"]) / (t0 * (d2 ** 2 - d0 ** 2))
            out[key][w] = {"launches_per_tensor": per_tensor, "bytes_per_element": per_element,
                           "host_reads": a[w]["syncs"],
                           "host_reads_per_tensor": (b[w]["syncs"] - a[w]["syncs"]) / (t1 - t0),
                           "host_scalar_reads": a[w]["host_scalar_reads"],
                           "collectives": a[w]["collectives"],
                           "ops_T8_d64": a[w]["ops"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args(argv)
    try:
        import deepspeed
        import torch
    except ImportError as e:
        print(f"count_deepspeed_optimizer: needs deepspeed (pip install deepspeed==0.16.4): {e}",
              file=sys.stderr)
        return 2
    record = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
              "shapes": [list(s) for s in SHAPES], "worlds": {}}
    for world in a.world:
        raw = run_world(_rank, world)
        record["worlds"][str(world)] = _coefficients(raw)
        for key, windows in record["worlds"][str(world)].items():
            for w, v in windows.items():
                print(f"{world} rank(s) {key:11s} {w:8s} {v['launches_per_tensor']:5.2f} launches "
                      f"a tensor, {v['bytes_per_element']:6.2f} bytes an element, "
                      f"{v['host_reads']} host reads, collectives {v['collectives']}")
    save_json(record, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
