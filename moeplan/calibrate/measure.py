"""`moeplan profile`'s rank-side microbenchmarks (torch), started by torchrun on every rank.

    torchrun --nproc-per-node N -m moeplan.calibrate.measure --out profile.json --gpus-per-node G

The device's own speed is measured on rank 0 alone (the others wait at a barrier): GEMM sizes
(efficiency curve), copy sizes (memory bandwidth), one small operation (per-operation overhead),
and the runtime's own model at two sizes (framework cost per layer phase, and how far each phase
runs from the roofline). What ranks cost each other is measured with all of them at once: the
same model on every rank (contention: ranks sharing CPU cores or memory bandwidth), the spread
of their step times (skew), allreduce / allgather / reduce-scatter / all-to-all over message
sizes on the intra-node groups (the G ranks of one node) and the inter-node groups (one rank per
node; GPUs of a node share its NICs), both all-to-all algorithms over the whole world where
it spans nodes, and the probe run by the runtime's own loops with its experts spread over every
rank (what exchanges and gradient sync take inside a running step). Each all-rank figure is the
slowest rank of a repeat; repeats are reduced by `fit.robust_median`. The probe is
`probe.py`, the sampling `sampling.py`.

The host's speed swings within seconds, so the calibrations (device sweeps, the model's tables,
skew, optimizer, the in-step probe) are sampled at several moments spread over the whole
profile, the collectives' and exchanges' sizes run between them, and each figure is reduced
over all its moments' samples (`Pool`). Rank 0 fits them (`fit.py`) and writes a
`ClusterProfile`.
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
import torch.nn.functional as F

from moeplan.calibrate.build import build_profile
from moeplan.calibrate.probe import Framework, InSitu
from moeplan.calibrate.progress import Progress
from moeplan.calibrate.sampling import Bench, Pool, moments, per_moment
from moeplan.runtime.a2a import FlatExchange, HierarchicalExchange
from moeplan.runtime.comm import Comm, all_gather_tensor, backend, reduce_scatter_tensor
from moeplan.runtime.launch import die_with_launcher, take_ctrl_c_once
from moeplan.spec.files import write_atomic
from moeplan.spec.layout import split_by_node

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "all_to_all")


def _sizes(lo: int, hi: int, per_octave: int = 1) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(int(s))
        s *= 2 ** (1 / per_octave)
    return sorted(set(out))


class DeviceSweeps:
    """The device's own speed on rank 0 alone: GEMM sizes (efficiency curve), copy sizes (memory
    bandwidth) and one small autograd operation (the floor under every phase of a tiny model),
    a pass over all of them per moment, pooled."""

    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool, warmup: int,
                 repeats: int):
        self.bench = Bench(0, 1, device, warmup, repeats)
        self.pool = Pool()
        gpu = device.type == "cuda"
        self.gemm: dict[tuple, callable] = {}
        # a GPU saturates only on large square-ish GEMMs (its half-efficiency point is near
        # 2 GFLOP) and its launch costs about as much as a CPU's whole small GEMM
        shapes = ([(m, m, m) for m in _sizes(256, 4096 if quick else 8192, per_octave=2)]
                  if gpu else [(m, n, k) for m in _sizes(16, 1024 if quick else 4096)
                               for n, k in ((256, 64), (64, 256), (256, 256))])
        for m, n, k in shapes:
            x = torch.randn(m, k, device=device, dtype=dtype)
            w = torch.randn(k, n, device=device, dtype=dtype)
            self.gemm[(m, n, k)] = lambda x=x, w=w: x @ w
        self.copy: dict[int, callable] = {}
        # copies far beyond a GPU's L2 cache (40-50 MB on A100/H100), or a CPU's
        lo, hi = ((1 << 26), (1 << 28) if quick else (1 << 30)) if gpu else \
            ((1 << 12), (1 << 22) if quick else (1 << 24))
        for n in _sizes(lo, hi):
            src = torch.empty(n // 4, device=device)
            dst = torch.empty_like(src)
            self.copy[n] = lambda src=src, dst=dst: dst.copy_(src)
        # attention's work per score element (scale, max, exp, sum): the runtime's attention at a
        # head dim of 4, where its matrix products are negligible, over S×S scores per head
        # (S = 64 on CPU ranks; 1024 on a GPU, whose launch would hide smaller ones)
        S = 1024 if gpu else 64
        self.scores: dict[int, callable] = {}
        for heads in _sizes(2, 16 if quick else 64):
            q = torch.randn(1, heads, S, 4, device=device, dtype=dtype)
            self.scores[heads * S * S] = lambda q=q: F.scaled_dot_product_attention(q, q, q)
        x = torch.ones(8, device=device, requires_grad=True)
        self.small_op = lambda: (x * 2).sum().backward()

    def sample(self, warmup: int) -> None:
        self.bench.warmup = warmup
        for key, fn in self.gemm.items():
            self.pool.add(("gemm", key), self.bench.samples(fn))
        for n, fn in self.copy.items():
            self.pool.add(("copy", n), self.bench.samples(fn))
        for n, fn in self.scores.items():
            self.pool.add(("scores", n), self.bench.samples(fn))
        self.pool.add("op", self.bench.samples(self.small_op))

    def ratios(self) -> list[float]:
        """Moment ratios of every GEMM and copy size: the device's speed between moments."""
        return self.pool.moment_ratios(k for k in self.pool.samples if k != "op")

    def result(self) -> tuple[list[dict], list[dict], list[dict], float]:
        gemm = [{"m": m, "n": n, "k": k, "flops": 2.0 * m * n * k,
                 "time_s": self.pool.median(("gemm", (m, n, k))),
                 "samples": len(self.pool.samples[("gemm", (m, n, k))])}
                for m, n, k in self.gemm]
        copy = [{"bytes": 2.0 * n, "time_s": self.pool.median(("copy", n))} for n in self.copy]
        scores = [{"elements": n, "time_s": self.pool.median(("scores", n))} for n in self.scores]
        # the small op: mul, sum, and their two backward ops
        return gemm, copy, scores, self.pool.median("op") / 4


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


def tier_groups(world: int, gpus_per_node: int) -> dict[str, list[list[int]]]:
    """The intra-node groups (the G ranks of each node) and the inter-node groups (one rank of
    each node, same local index), where there are more than one rank to a group."""
    intra, inter = split_by_node(list(range(world)), gpus_per_node)
    tiers = {}
    if len(intra[0]) > 1:
        tiers["intra"] = intra
    if len(intra) > 1:
        tiers["inter"] = inter
    return tiers


# Idle before a rested exchange: longer than a rate limiter's bucket takes to refill (tc tbf's
# 256 KB at 200 Mbit/s: 10 ms; cloud NICs' bandwidth allowances are larger, but are refilled by
# the seconds a step's compute lasts, and a few tens of ms show what one exchange gets back).
REST_S = 0.05


def tier_comms(b: Bench, gpus_per_node: int) -> dict:
    """This rank's group of each tier (`tier_groups`) as a `runtime.comm.Comm`; every rank
    creates every group, in the same order, so call it on every rank at the same point."""

    out = {}
    for tier, groups in tier_groups(b.world, gpus_per_node).items():
        handles = [dist.new_group(g) for g in groups]
        mine = next(i for i, g in enumerate(groups) if b.rank in g)
        out[tier] = Comm(group=handles[mine], ranks=tuple(groups[mine]),
                         rank_in_group=groups[mine].index(b.rank))
    return out


def message_sizes(device: torch.device, quick: bool) -> list[int]:
    """Message sizes of the collective and exchange sweeps: 4 KiB up to 8 MiB on CPU ranks
    (1 MiB quick); on GPUs up to 256 MiB (64 MiB quick), where NCCL reaches its bus bandwidth
    (its small messages are latency- and protocol-bound)."""
    if device.type == "cuda":
        return _sizes(1 << 12, (1 << 26) if quick else (1 << 28))
    return _sizes(1 << 12, (1 << 20) if quick else (1 << 23))


def collective_jobs(b: Bench, comms: dict, quick: bool) -> list:
    """allreduce / allgather / reduce-scatter / all-to-all over message sizes on each tier's
    groups (`tier_comms`): one job (a call returning its rows) per collective, tier and size,
    so the profile can spread them between its moments."""
    jobs = []
    sizes = message_sizes(b.device, quick)
    for tier, comm in comms.items():
        group, size = comm.group, len(comm.ranks)
        for name in COLLECTIVES:
            for nbytes in sizes:
                def job(name=name, tier=tier, nbytes=nbytes, group=group, size=size) -> list:
                    fn = _collective(name, group, size, nbytes, b.device)
                    return [{"collective": name, "tier": tier, "group_size": size,
                             "bytes": float(nbytes), "time_s": b.time(fn)}]
                jobs.append(job)
    return jobs


def exchange_jobs(b: Bench, comms: dict, quick: bool) -> list:
    """Both all-to-all algorithms of the runtime (`runtime.a2a`) over the whole world, where it
    spans nodes with several ranks on each: the flat exchange (one message per peer) and the
    hierarchical one (intra-node exchange, regrouping, inter-node exchange), over message sizes,
    back to back and after the ranks idled (`rested`); one job per algorithm and size. The
    per-tier fits say what one message and one byte cost; these say how the algorithms combine
    them (overlapping messages, a second call, the regrouping copies) and what idle links give
    back."""

    if not {"intra", "inter"} <= comms.keys():  # one node, or one rank a node
        return []
    G, world = len(comms["intra"].ranks), b.world
    algorithms = {"flat": FlatExchange(Comm(group=dist.group.WORLD, ranks=tuple(range(world)),
                                            rank_in_group=b.rank)),
                  "hierarchical": HierarchicalExchange(comms["intra"], comms["inter"])}
    jobs = []
    for name, exchange in algorithms.items():
        for nbytes in message_sizes(b.device, quick):
            def job(name=name, exchange=exchange, nbytes=nbytes) -> list:
                x = torch.ones(world, max(1, nbytes // 4 // world), device=b.device)
                row = {"algorithm": name, "group_size": world, "per_node": G,
                       "bytes": float(x.numel() * 4)}
                return [{**row, "time_s": b.time(lambda: exchange(x))},
                        {**row, "rested": True,
                         "time_s": b.time_rested(lambda: exchange(x), REST_S)}]
            jobs.append(job)
    return jobs


def exchanges(b: Bench, gpus_per_node: int, quick: bool, progress) -> list[dict]:
    """Every job of `exchange_jobs` in turn."""
    rows = []
    for job in exchange_jobs(b, tier_comms(b, gpus_per_node), quick):
        rows += job()
        progress()
    return rows


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    take_ctrl_c_once()
    p = argparse.ArgumentParser(prog="moeplan.calibrate.measure")
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
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise SystemExit(f"rank {rank}: local rank {local} but torch sees "
                             f"{torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local)
    else:
        torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(backend(cuda), timeout=timedelta(seconds=a.timeout))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    quick = a.quick
    b = Bench(rank, world, device, warmup=2 if quick else 3, repeats=5 if quick else 9)

    dtype = torch.bfloat16 if cuda else torch.float32
    # every rank creates every group, in the same order, before any job runs
    comms = tier_comms(b, a.gpus_per_node)
    jobs = collective_jobs(b, comms, quick) + exchange_jobs(b, comms, quick)
    situ = InSitu(b, a.base, a.gpus_per_node, quick)
    fw = Framework(b, quick)
    # one rank alone (the others wait): the device's own speed; what ranks cost each other
    # when they share cores is measured apart, as the framework's `contention`
    sweeps = (DeviceSweeps(device, dtype, quick, b.warmup, per_moment(b.repeats, quick))
              if rank == 0 else None)
    M = moments(quick)
    coll, samples = [], []
    with Progress(rank == 0, total=3 * M + len(jobs)) as bar:
        # every calibration a share at each of M moments, the collectives' and exchanges' jobs
        # between them: the host's speed swings within seconds, so each figure is pooled over
        # the whole profile (`Pool`), not one stretch of it
        for moment in range(M):
            warmup = b.warmup if moment == 0 else 1
            fw.pool.moment = moment
            if sweeps is not None:
                sweeps.pool.moment = moment
                sweeps.sample(warmup)
            if world > 1:
                dist.barrier()
            bar.step("device sweeps")
            fw.sample(warmup)
            bar.step("framework overhead")
            samples.append(situ.sample())
            bar.step("exchanges in a step")
            for job in jobs[moment * len(jobs) // M:(moment + 1) * len(jobs) // M]:
                coll += job()
                bar.step("collectives")
    spread = fw.spread(sweeps.ratios() if sweeps is not None else [], samples)
    fw = fw.result()
    if rank == 0:

        info = {"host": platform.node(), "ranks": world, "backend": "nccl" if cuda else "gloo",
                "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "dtype": "bf16" if cuda else "fp32"}
        if a.topology:
            import json

            info["topology"] = json.loads(Path(a.topology).read_text())
        if cuda:
            info["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        g, c, sc, ov = sweeps.result()
        raw = {"gemm": g, "copy": c, "scores": sc, "op_overhead_s": ov, "framework": fw,
               "collectives": [r for r in coll if "collective" in r],
               "exchanges": [r for r in coll if "algorithm" in r],
               "in_situ": situ.result(samples), "spread": spread}
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
