"""`moeplan profile`'s rank-side microbenchmarks (torch), started by torchrun on every rank.

    torchrun --nproc-per-node N -m moeplan.profiles.measure --out profile.json --gpus-per-node G

All ranks run every benchmark at the same time (after a barrier), so what is measured includes the
contention the plans will see: ranks sharing CPU cores, GPUs of a node sharing its NICs. Each
figure is the slowest rank of a repeat, reduced over repeats by `fit.robust_median`.
Benchmarks: GEMM sizes (efficiency curve), copy sizes (memory bandwidth and per-operation
overhead), and allreduce / allgather / reduce-scatter / all-to-all over message sizes, on the
intra-node groups (the G ranks of one node) and the inter-node groups (one rank per node).
Rank 0 fits them (`fit.py`) and writes a `ClusterProfile`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moeplan.files import write_atomic
from moeplan.profiles import fit
from moeplan.runtime.comm import all_gather_tensor, reduce_scatter_tensor

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "all_to_all")


def _sizes(lo: int, hi: int, per_octave: int = 1) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(int(s))
        s *= 2 ** (1 / per_octave)
    return sorted(set(out))


class Bench:
    def __init__(self, rank: int, world: int, device: torch.device, warmup: int, repeats: int):
        self.rank, self.world, self.device = rank, world, device
        self.warmup, self.repeats = warmup, repeats
        self.sample_s = 0.02

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, inner: int | None = None) -> float:
        """Seconds per call: slowest rank per repeat, robust median over repeats.

        A repeat runs the call `inner` times back to back, by default enough of them to last
        about `sample_s`: long enough that ranks sharing cores contend for them as they do in a
        training step, instead of each finishing inside its own scheduler time slice."""
        for _ in range(self.warmup):
            fn()
        if inner is None:
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            one = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            if self.world > 1:
                dist.all_reduce(one, op=dist.ReduceOp.MAX)  # the same count on every rank
            inner = max(1, min(1000, int(self.sample_s / max(float(one), 1e-7))))
        samples = []
        for _ in range(self.repeats):
            if self.world > 1:
                dist.barrier()
            self._sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            self._sync()
            t = torch.tensor([(time.perf_counter() - t0) / inner], dtype=torch.float64)
            if self.world > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            samples.append(float(t))
        return fit.robust_median(samples)


def gemms(b: Bench, dtype: torch.dtype, quick: bool) -> list[dict]:
    rows = []
    for m in _sizes(16, 1024 if quick else 4096):
        for n, k in ((256, 64), (64, 256), (256, 256)):
            x = torch.randn(m, k, device=b.device, dtype=dtype)
            w = torch.randn(k, n, device=b.device, dtype=dtype)
            rows.append({"m": m, "n": n, "k": k, "flops": 2.0 * m * n * k,
                         "time_s": b.time(lambda: x @ w)})
    return rows


def copies(b: Bench, quick: bool) -> list[dict]:
    rows = []
    for n in _sizes(1 << 12, (1 << 22) if quick else (1 << 24)):
        src = torch.empty(n // 4, device=b.device)
        dst = torch.empty_like(src)
        rows.append({"bytes": 2.0 * n, "time_s": b.time(lambda: dst.copy_(src))})
    return rows


def _collective(name: str, group, size: int, nbytes: int, device) -> callable:
    n = max(size, nbytes // 4 // size * size)  # elements, divisible by the group size
    if name == "allreduce":
        x = torch.ones(n, device=device)
        return lambda: dist.all_reduce(x, group=group)
    if name == "allgather":  # nbytes is the gathered size
        x, out = torch.ones(n // size, device=device), torch.empty(n, device=device)
        return lambda: all_gather_tensor(out, x, group=group)
    if name == "reduce_scatter":
        x, out = torch.ones(n, device=device), torch.empty(n // size, device=device)
        return lambda: reduce_scatter_tensor(out, x, group=group)
    x, out = torch.ones(n, device=device), torch.empty(n, device=device)
    return lambda: dist.all_to_all_single(out, x, group=group)


def collectives(b: Bench, gpus_per_node: int, quick: bool, progress) -> list[dict]:
    G, world = gpus_per_node, b.world
    nodes = world // G
    tiers = {}
    if G > 1:
        tiers["intra"] = [[n * G + l for l in range(G)] for n in range(nodes)]
    if nodes > 1:
        tiers["inter"] = [[n * G + l for n in range(nodes)] for l in range(G)]
    rows = []
    sizes = _sizes(1 << 12, (1 << 20) if quick else (1 << 23))
    for tier, groups in tiers.items():
        made = [dist.new_group(g) for g in groups]  # every rank creates every group, in order
        mine = next(i for i, g in enumerate(groups) if b.rank in g)
        size = len(groups[0])
        for name in COLLECTIVES:
            for nbytes in sizes:
                fn = _collective(name, made[mine], size, nbytes, b.device)
                rows.append({"collective": name, "tier": tier, "group_size": size,
                             "bytes": float(nbytes), "time_s": b.time(fn)})
                progress()
    return rows


def op_overhead(b: Bench) -> float:
    """One small operation with autograd: the floor under every phase of a tiny model."""
    x = torch.ones(8, device=b.device, requires_grad=True)
    return b.time(lambda: (x * 2).sum().backward()) / 4  # mul, sum, and their two backward ops


def _probe_model(device: torch.device, size: str):
    """The runtime's own GPT (one dense and two MoE layers) at one of `build.PROBE_SIZES`."""
    from moeplan.profiles.build import probe_spec
    from moeplan.runtime.model import GPT

    torch.manual_seed(0)
    return GPT(probe_spec(size)).to(device)


def _slowest(b: Bench, values: dict) -> dict:
    """Each value's maximum over ranks (every rank holds the same keys, in the same order)."""
    keys = sorted(values, key=str)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if b.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def _phase_table(b: Bench, run_once, inner: int) -> dict:
    """Per (layer, phase): seconds per call of `run_once(timer)`, robust median over repeats of
    `inner` calls (all ranks at once, slowest rank per repeat)."""
    from moeplan.runtime.timers import PhaseTimer

    samples: dict = {}
    for rep in range(b.warmup + b.repeats):
        if b.world > 1:
            dist.barrier()
        timer = PhaseTimer(b.device.type == "cuda")
        for _ in range(inner):
            run_once(timer)
        if rep < b.warmup:
            continue
        tables = {f"{d}:{k[0]}:{k[1]}": v / inner
                  for d, table in (("f", timer.forward_s), ("b", timer.backward_s))
                  for k, v in table.items()}
        for k, v in _slowest(b, tables).items():
            samples.setdefault(k, []).append(v)
    return {k: fit.robust_median(v) for k, v in samples.items()}


def _train_table(b: Bench, size: str, inner: int) -> dict:
    """Forward + backward with autograd, as `moerun` trains, timed by the runtime's timer."""
    from moeplan.runtime.timers import NULL_TIMER, instrument

    from moeplan.profiles.build import PROBE_SIZES

    model = _probe_model(b.device, size)
    _, _, _, B, S = PROBE_SIZES[size]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (B, S + 1), generator=g).to(b.device)

    def train_once(timer) -> None:
        instrument(model, timer)
        timer.begin()
        loss, _ = model.loss(idx[:, :-1], idx[:, 1:])
        timer.end()
        timer.begin_backward()
        loss.backward()
        timer.end_backward()
        model.zero_grad(set_to_none=True)

    table = _phase_table(b, train_once, inner)
    instrument(model, NULL_TIMER)
    return table


def framework(b: Bench, quick: bool) -> dict:
    """The runtime's fixed cost per layer phase and how its kernels compare with the roofline:
    the probe model trained at both `PROBE_SIZES` and served (greedy decoding with the KV cache,
    as `moerun --mode infer` serves) at the small one, timed by the runtime's own phase timer;
    plus the optimizer (AdamW step, gradient clipping, zero_grad) per parameter tensor."""
    from moeplan.runtime.infer import generate
    from moeplan.runtime.run import clip_grads
    from moeplan.runtime.timers import NULL_TIMER, instrument

    inner = 10 if quick else 30
    train = _train_table(b, "fixed", inner)
    work = _train_table(b, "work", max(2, inner // 5))

    model = _probe_model(b.device, "fixed")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (1, 9), generator=g).to(b.device)
    new_tokens = 12

    def infer_once(timer) -> None:
        instrument(model, timer)

        def on_token(i: int) -> None:
            if i == 0:  # decode tokens only, as `moerun --mode infer` reports them
                timer.reset()
                timer.begin()

        generate(model, idx[:, :2], new_tokens, on_token)

    infer = _phase_table(b, infer_once, 1)  # the timer keeps the last generation's decode
    instrument(model, NULL_TIMER)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    loss, _ = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()

    def optimizer() -> None:
        clip_grads(model, numel, 1, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)

    opt_s = b.time(optimizer)
    return {"train": train, "work": work, "infer": infer, "decode_tokens": new_tokens - 1,
            "optimizer_s": opt_s, "tensors": len(numel)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moeplan.profiles.measure")
    p.add_argument("--out", required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", default="auto")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--topology", help="NVML topology (JSON) recorded by `moeplan profile`")
    a = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and a.backend != "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    backend = "nccl" if cuda else "gloo"
    if world > 1:
        dist.init_process_group(backend, timeout=timedelta(seconds=a.timeout))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    quick = a.quick
    b = Bench(rank, world, device, warmup=2 if quick else 3, repeats=5 if quick else 9)
    from moeplan.profiles.progress import Progress

    n_coll = (4 * len(_sizes(1 << 12, (1 << 20) if quick else (1 << 23)))
              * ((a.gpus_per_node > 1) + (world // a.gpus_per_node > 1)))
    with Progress(rank == 0, total=3 + n_coll) as bar:
        dtype = torch.bfloat16 if cuda else torch.float32
        g = gemms(b, dtype, quick)
        bar.step("GEMM sweep")
        c = copies(b, quick)
        bar.step("memory bandwidth")
        ov = op_overhead(b)
        fw = framework(b, quick)
        bar.step("framework overhead")
        coll = collectives(b, a.gpus_per_node, quick, lambda: bar.step("collectives"))
    if rank == 0:
        from moeplan.profiles.build import build_profile

        info = {"host": platform.node(), "ranks": world, "backend": backend,
                "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "dtype": "bf16" if cuda else "fp32"}
        if a.topology:
            import json

            info["topology"] = json.loads(Path(a.topology).read_text())
        if cuda:
            info["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        raw = {"gemm": g, "copy": c, "op_overhead_s": ov, "framework": fw, "collectives": coll}
        out = Path(a.out)
        import json

        out.with_suffix(".raw.json").write_text(json.dumps({"info": info, **raw}, indent=1))
        profile = build_profile(a.base, a.name, a.gpus_per_node, info, raw)
        write_atomic(out, profile.model_dump_json(indent=2) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
