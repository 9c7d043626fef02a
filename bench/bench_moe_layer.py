"""Benchmark one MoE layer, forward + backward, on CPU ranks (gloo): moeplan vs DeepSpeed-MoE.

Both implementations run in the same torch.distributed world, one after the other (their timed
repeats interleaved), on identical inputs, with the same hidden size, expert FFN (h -> f -> h,
GELU, biases), number of experts E, expert-parallel size ep (= world size), top-k and capacity
factor. DeepSpeed's layer gets moeplan's router and expert weights copied in, so both route the
same tokens; `check` in each record gives the forward difference between the two.

Loss per step: out.sum() + aux_loss_coef * aux_loss, backward into the input, the router and the
experts. Step time of one repeat = the slowest rank's wall time over `--iters` steps / iters;
tokens/s = world * tokens_per_rank / median step time over `--repeats` repeats (after
`--warmup` untimed steps). Per configuration:
  ratio_moeplan_over_deepspeed  moeplan / deepspeed tokens/s from the medians (> 1: moeplan faster)
  ratio_best_repeat             the same from each side's fastest repeat
  ratio_cpu_time                deepspeed / moeplan CPU seconds per step per rank (process time,
                                gloo threads included; not inflated by time spent preempted)
  check                         output / aux-loss / input-gradient differences between the two
foreign_cpu_share is the share of the machine's CPU time used by other processes during each
world's run; when it is not near 0 the wall-clock medians are disturbed.

Prints one JSON object on stdout (progress goes to stderr). DeepSpeed runs with
DS_ACCELERATOR=cpu (set here unless already set); when it cannot be imported or set up, its
entries say why and moeplan's figures are still printed.

Run:  python bench/bench_moe_layer.py [--world 2 4] [--iters 2] [--repeats 7] [--quick]
      [--k 1 2] [--cf 1.0 1.25] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _busy_cpu_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the ranks)."""
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# --------------------------------------------------------------------------------------------
# the two layers


def layer_spec(a, k: int, cf: float):
    """The layer as a one-layer ModelSpec, with DeepSpeed's gating switches as the bench sets
    them (no random token selection, no Gumbel sampling of top-2's second expert)."""
    from moeplan.spec.model import ModelSpec

    return ModelSpec(name="bench-moe-layer", num_layers=1, hidden=a.hidden, heads=a.hidden // 64,
                     ffn_hidden=a.ffn, vocab_size=256, max_seq_len=a.seq, experts=[a.experts],
                     residual=False, top_k=k, capacity_factor=cf, eval_capacity_factor=cf,
                     min_capacity=a.min_capacity, drop_tokens=True, use_rts=False,
                     second_expert_sampling=False)


def deepspeed_runtime(version: str | None) -> str:
    """The `--runtime` that models this DeepSpeed: index dispatch from v0.19.4 on."""
    try:
        parts = tuple(int(x) for x in (version or "0").split("+")[0].split(".")[:3])
    except ValueError:
        return "deepspeed"
    return "deepspeed-sparse" if parts >= (0, 19, 4) else "deepspeed"


def predicted_ms(a, k: int, cf: float, world: int, runtime: str, profile: str) -> float:
    """The cost model's forward + backward time of the layer's MoE phases (gate, dispatch, the
    two all-to-alls, experts, combine) for `runtime` on a profile of this host measured with
    `world` ranks, as `step.train_passes` charges them, the ranks' waits for each other taken
    over this layer's compute alone."""
    from pathlib import Path

    from moeplan.cost_models.env import Env, LayerChoice, LayerCost
    from moeplan.cost_models.layer import forward
    from moeplan.cost_models.step import train_pass, train_passes
    from moeplan.spec.cluster import ClusterProfile
    from moeplan.spec.phases import Phase
    from moeplan.spec.workload import Setting, Workload

    cluster = ClusterProfile.model_validate_json(Path(profile).read_text())
    w = Workload(mode="train", global_batch=world * a.batch, micro_batch=a.batch, seq_len=a.seq,
                 dtype="fp32", zero_stage=0)
    env = Env(layer_spec(a, k, cf), cluster, w, world, runtime=runtime)
    s = Setting(tp=1, dp=world, micro_batch=a.batch, recompute=False)
    fwd = forward(env, s, 0, LayerChoice(ep=world, es=1, a2a="flat", coordinated=False),
                  train_pass(env, s))
    moe = (Phase.GATE, Phase.DISPATCH, Phase.DISPATCH_A2A, Phase.EXPERTS, Phase.COMBINE_A2A,
           Phase.COMBINE)
    only = LayerCost(phases={p: fwd.phases.get(p, 0.0) for p in moe},
                     fixed={p: t for p, t in fwd.fixed.items() if p in moe})
    return 1e3 * sum(train_passes(env, s, only, exchanges=world > 1).phases.values())


def build_moeplan(a, k: int, cf: float, world: int, rank: int, group):
    from moeplan.runtime.a2a import FlatExchange
    from moeplan.runtime.comm import Comm
    from moeplan.runtime.model import MoE, MoEParallel

    spec = layer_spec(a, k, cf)
    ep = Comm(group=group, ranks=tuple(range(world)), rank_in_group=rank)
    par = MoEParallel(ep=ep, es=Comm.solo(), exchange=FlatExchange(ep), coordinated=False)
    torch.manual_seed(a.seed + rank)  # experts differ by rank (each rank holds E/ep of them)
    mod = MoE(spec, a.experts, Comm.solo(), par)
    with torch.no_grad():  # the router is replicated, as in data-parallel training
        dist.broadcast(mod.router.weight, src=0, group=group)
    return mod, spec


def build_deepspeed(a, k: int, cf: float, world: int, ref):
    """DeepSpeed's MoE with the same shapes and gating switches, weights copied from `ref`."""
    from deepspeed.moe.layer import MoE as DSMoE

    expert = nn.Sequential(nn.Linear(a.hidden, a.ffn), nn.GELU(), nn.Linear(a.ffn, a.hidden))
    mod = DSMoE(a.hidden, expert=expert, num_experts=a.experts, ep_size=world, k=k,
                capacity_factor=cf, eval_capacity_factor=cf, min_capacity=a.min_capacity,
                use_residual=False, noisy_gate_policy=None, drop_tokens=True, use_rts=False,
                use_tutel=False, enable_expert_tensor_parallelism=False,
                top2_2nd_expert_sampling=False)
    mod.set_deepspeed_parallelism()
    with torch.no_grad():
        mod.deepspeed_moe.gate.wg.weight.copy_(ref.router.weight)
        ex = ref.experts
        for i, e in enumerate(mod.deepspeed_moe.experts.deepspeed_experts):
            e[0].weight.copy_(ex.w1[i].t())
            e[0].bias.copy_(ex.b1[i])
            e[2].weight.copy_(ex.w2[i].t())
            e[2].bias.copy_(ex.b2[i])
    return mod


def _fwd(impl: str, mod, x):
    if impl == "moeplan":
        out, aux = mod(x)
    else:
        out, aux, _counts = mod(x)
    return out, aux


def _step(impl: str, mod, x, coef: float) -> None:
    mod.zero_grad(set_to_none=True)
    x.grad = None
    out, aux = _fwd(impl, mod, x)
    (out.sum() + coef * aux).backward()


def _timed(impl: str, mod, x, coef: float, iters: int) -> tuple[float, float]:
    """(slowest rank's wall seconds per step, mean over ranks of the process's CPU seconds per
    step) over `iters` steps. CPU time (all threads of a rank, gloo's included) does not count
    time spent preempted or blocked, so it is steadier than wall time on a busy machine."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        _step(impl, mod, x, coef)
    wall = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    cpu = torch.tensor([(time.process_time() - c0) / iters], dtype=torch.float64)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu)
    return float(wall), float(cpu) / dist.get_world_size()


def _check(mp_mod, ds_mod, x, coef: float) -> dict:
    """moeplan vs DeepSpeed on the same input and weights: output, aux loss and input-gradient
    differences (max over ranks), the share of routes moeplan dropped, the capacity."""
    res = {}
    for name, mod in (("moeplan", mp_mod), ("deepspeed", ds_mod)):
        mod.zero_grad(set_to_none=True)
        x.grad = None
        out, aux = _fwd(name, mod, x)
        (out.sum() + coef * aux).backward()
        res[name] = (out.detach(), aux.detach(), x.grad.clone())
    (o1, a1, g1), (o2, a2, g2) = res["moeplan"], res["deepspeed"]
    x.grad = None
    mp_mod.zero_grad(set_to_none=True)
    ds_mod.zero_grad(set_to_none=True)
    r = mp_mod.last
    diff = torch.tensor([(o1 - o2).abs().max().item(), (a1 - a2).abs().item(),
                         (g1 - g2).abs().max().item()], dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    drop = torch.tensor([r.dropped, r.keep_TK.numel()], dtype=torch.float64)
    dist.all_reduce(drop)
    return {"out_max_abs_diff": float(diff[0]), "aux_abs_diff": float(diff[1]),
            "dx_max_abs_diff": float(diff[2]),
            "moeplan_dropped_fraction": round(float(drop[0] / drop[1]), 4),
            "capacity": r.capacity}


def _profile(impl: str, mod, x, coef: float, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            _step(impl, mod, x, coef)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------------------------
# one rank


def worker(rank: int, world: int, a, port: int, queue) -> None:
    os.dup2(2, 1)  # anything printed by the libraries goes to stderr; stdout is the JSON
    sys.stdout = sys.stderr
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=a.timeout))
    group = dist.new_group(list(range(world)))

    ds_error = None
    try:
        import logging

        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        ds_version = deepspeed.__version__
    except BaseException as e:  # noqa: BLE001 - any failure means "unavailable", with the reason
        ds_error, ds_version = f"{type(e).__name__}: {e}".strip()[:500], None
    ok = torch.tensor([0 if ds_error else 1])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ds_error is None and not ok.item():
        ds_error = "deepspeed failed to import or initialise on another rank"

    tokens = a.batch * a.seq
    records = []
    for k in a.k:
        for cf in a.cf:
            rec = {"world": world, "ep": world, "hidden": a.hidden, "ffn": a.ffn,
                   "experts": a.experts, "local_experts": a.experts // world, "top_k": k,
                   "capacity_factor": cf, "min_capacity": a.min_capacity,
                   "tokens_per_rank": tokens, "batch": a.batch, "seq": a.seq}
            mp_mod, spec = build_moeplan(a, k, cf, world, rank, group)
            coef = spec.aux_loss_coef
            mp_mod.train()
            g = torch.Generator().manual_seed(a.seed * 1000 + rank)
            x = torch.randn(a.batch, a.seq, a.hidden, generator=g).requires_grad_(True)
            impls = {"moeplan": mp_mod}
            if ds_error is None:
                try:
                    ds_mod = build_deepspeed(a, k, cf, world, mp_mod)
                    ds_mod.train()
                    rec["check"] = _check(mp_mod, ds_mod, x, coef)
                    impls["deepspeed"] = ds_mod
                except Exception as e:  # noqa: BLE001
                    rec["deepspeed"] = {"unavailable": f"{type(e).__name__}: {e}"[:500]}
                    if rank == 0:
                        traceback.print_exc()
            else:
                rec["deepspeed"] = {"unavailable": ds_error}
            for name, mod in impls.items():
                for _ in range(a.warmup):
                    _step(name, mod, x, coef)
            times = {name: [] for name in impls}
            cpus = {name: [] for name in impls}
            for _ in range(a.repeats):  # interleaved, so drift hits both alike
                for name, mod in impls.items():
                    wall, cpu = _timed(name, mod, x, coef, a.iters)
                    times[name].append(wall)
                    cpus[name].append(cpu)
            for name, ts in times.items():
                med = statistics.median(ts)
                rec[name] = {"tokens_per_s": round(world * tokens / med, 1),
                             "tokens_per_s_per_rank": round(tokens / med, 1),
                             "step_ms_median": round(med * 1e3, 3),
                             "step_ms_min": round(min(ts) * 1e3, 3),
                             "step_ms_all": [round(t * 1e3, 3) for t in ts],
                             "cpu_ms_per_step_per_rank_median":
                                 round(statistics.median(cpus[name]) * 1e3, 3)}
            if "tokens_per_s" in rec.get("deepspeed", {}):
                m, d = rec["moeplan"], rec["deepspeed"]
                rec["ratio_moeplan_over_deepspeed"] = round(m["tokens_per_s"] / d["tokens_per_s"],
                                                            3)
                # from the fastest repeat of each: less sensitive to other load on the machine
                rec["ratio_best_repeat"] = round(d["step_ms_min"] / m["step_ms_min"], 3)
                # CPU cost per step (deepspeed / moeplan): > 1 means moeplan needs less CPU
                rec["ratio_cpu_time"] = round(d["cpu_ms_per_step_per_rank_median"]
                                              / m["cpu_ms_per_step_per_rank_median"], 3)
            if a.profile and rank == 0:
                for name, mod in impls.items():
                    print(f"\n=== profile rank 0, world {world}, k={k}, cf={cf}: {name} ===\n"
                          + _profile(name, mod, x, coef, a.profile_rows), file=sys.stderr)
            elif a.profile:
                for name, mod in impls.items():
                    for _ in range(2):
                        _step(name, mod, x, coef)
            if rank == 0:
                print(f"[world {world}] k={k} cf={cf}: moeplan "
                      f"{rec['moeplan']['tokens_per_s']:.0f} tok/s, deepspeed "
                      f"{rec.get('deepspeed', {}).get('tokens_per_s', 'n/a')} tok/s",
                      file=sys.stderr, flush=True)
            records.append(rec)
    if rank == 0:
        queue.put({"records": records, "deepspeed_version": ds_version,
                   "deepspeed_error": ds_error})
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4],
                    help="world sizes (ranks; ep = world), one world each (default: 2 4)")
    ap.add_argument("--iters", type=int, default=2, help="timed steps per repeat (default 2)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="timed repeats, the two implementations interleaved; median reported "
                         "(default 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    ap.add_argument("--quick", action="store_true",
                    help="k=1 and k=2 at cf 1.0 only, 1 timed step x 3 repeats, 1 warm-up")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--cf", type=float, nargs="+", default=[1.0, 1.25],
                    help="capacity factors (train and eval alike)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--min-capacity", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=300, help="process-group timeout, seconds")
    ap.add_argument("--profile", action="store_true",
                    help="also print a torch.profiler table per implementation (rank 0, stderr)")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--cluster-profile", action="append", default=[], metavar="WORLD=FILE",
                    help="a `moeplan profile --nproc WORLD` of this host: each record of that "
                         "world also gets the cost model's predicted step time of both layers "
                         "(repeatable)")
    a = ap.parse_args()
    if a.quick:
        a.cf, a.iters, a.repeats, a.warmup = [1.0], 1, 3, 1
    for w in a.world:
        if w < 1 or a.experts % w:
            ap.error(f"--experts {a.experts} is not divisible by world size {w}")
    if a.hidden % 64:
        ap.error("--hidden must be a multiple of 64 (ModelSpec needs hidden % heads == 0)")
    profiles = {}
    for item in a.cluster_profile:
        world, _, path = item.partition("=")
        if not world.isdigit() or not os.path.isfile(path):
            ap.error(f"--cluster-profile {item!r}: give WORLD=FILE of an existing profile")
        profiles[int(world)] = path

    cores = os.cpu_count() or 1
    notes = ["CPU only, gloo, torch.set_num_threads(1) per rank; ep = world size, es = tp = 1.",
             "Weights: moeplan's router and experts copied into DeepSpeed's layer, so both route "
             "the same tokens; the input is identical for both (different per rank); neither "
             "samples (no random token selection, no Gumbel noise).",
             "DeepSpeed: use_rts=False, drop_tokens=True, noisy_gate_policy=None, "
             "top2_2nd_expert_sampling=False (no Gumbel noise), use_tutel=False."]
    over = [w for w in a.world if w > cores]
    if over:
        notes.append(f"world size(s) {over} oversubscribe this machine's {cores} cores: ranks "
                     "time-share cores, so those figures measure contention as much as the layer.")

    out = {"bench": "moe_layer_fwd_bwd_cpu", "torch": torch.__version__,
           "python": platform.python_version(), "cpu_cores": cores,
           "settings": {"iters": a.iters, "repeats": a.repeats, "warmup": a.warmup,
                        "k": a.k, "capacity_factor": a.cf, "hidden": a.hidden, "ffn": a.ffn,
                        "experts": a.experts, "batch": a.batch, "seq": a.seq,
                        "min_capacity": a.min_capacity,
                        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR")},
           "notes": notes, "results": []}
    t_all = time.perf_counter()
    ctx = mp.get_context("spawn")
    for w in a.world:
        queue = ctx.SimpleQueue()
        t0, busy0, own0 = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
        try:
            mp.spawn(worker, args=(w, a, _free_port(), queue), nprocs=w, join=True)
        except Exception as e:  # noqa: BLE001
            out["results"].append({"world": w, "error": f"{type(e).__name__}: {e}"[:2000]})
            continue
        wall = time.perf_counter() - t0
        if busy0 is not None:
            foreign = (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0)
            out.setdefault("foreign_cpu_share", {})[str(w)] = round(
                max(foreign, 0.0) / (wall * cores), 3)
        got = queue.get()
        out["deepspeed_version"] = got["deepspeed_version"] or out.get("deepspeed_version")
        if got["deepspeed_error"]:
            out["deepspeed_unavailable"] = got["deepspeed_error"]
        out["results"].extend(got["records"])
        out.setdefault("wall_s_per_world", {})[str(w)] = round(time.perf_counter() - t0, 1)
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    ds_runtime = deepspeed_runtime(out.get("deepspeed_version"))
    for rec in out["results"]:
        profile = profiles.get(rec.get("world"))
        if profile is None:
            continue
        for name, runtime in (("moeplan", "moerun"), ("deepspeed", ds_runtime)):
            if "step_ms_median" not in rec.get(name, {}):
                continue
            ms = predicted_ms(a, rec["top_k"], rec["capacity_factor"], rec["world"], runtime,
                              profile)
            rec[name]["predicted_ms"] = round(ms, 3)
            rec[name]["prediction_error"] = round(ms / rec[name]["step_ms_median"] - 1, 4)
    if profiles:
        notes.append("predicted_ms: the cost model (`--runtime moerun` for moeplan's layer, "
                     f"`--runtime {ds_runtime}` for DeepSpeed's) on the profiles given, the MoE "
                     "phases of one training step's layer; prediction_error against the "
                     "median step.")
        out["cluster_profiles"] = {str(k): v for k, v in profiles.items()}
    if any(v > 0.05 for v in out.get("foreign_cpu_share", {}).values()):
        notes.append("Other processes used a noticeable share of the CPUs during the run "
                     "(foreign_cpu_share): medians are noisy; ratio_best_repeat is the steadier "
                     "figure.")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
